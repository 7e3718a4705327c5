"""``python -m worker …`` is the ``angelstream`` command."""

import sys

from worker.cli import main

sys.exit(main())
