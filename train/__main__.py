"""``python -m train`` == ``textgen-train``."""

import sys

from train.cli import main

sys.exit(main())
