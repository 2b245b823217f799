"""``python -m supervisor.cli`` keeps working now that the CLI is a package (``python -m supervisor`` too)."""

import sys

from . import main

sys.exit(main())
