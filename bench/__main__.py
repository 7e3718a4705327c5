"""``python -m bench``: the end-to-end benchmark (:mod:`bench.e2e`); ``python -m bench.decode``: decode speed."""

import sys

from bench.e2e import main

sys.exit(main())
