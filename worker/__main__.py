"""``python -m worker`` runs the worker; ``python -m worker COMMAND …`` is the ``angelstream`` command."""

import sys

from worker.cli import main

sys.exit(main())
