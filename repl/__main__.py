"""``python -m repl``: the same as the ``textgen-repl`` command."""

import sys

from repl.cli import main

sys.exit(main())
