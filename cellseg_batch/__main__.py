"""``python -m cellseg_batch`` is ``cellseg-batch``."""

import sys

from .cli import main

sys.exit(main())
