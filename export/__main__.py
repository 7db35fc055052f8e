"""`python -m export --checkpoint lstm.bin [--output lstm.onnx] [--opset N] [--tolerance 1e-4]`."""

import sys

from export.cli import main

sys.exit(main())
