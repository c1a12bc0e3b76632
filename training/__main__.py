"""``python -m training``: the same as ``lookalike train``."""

import sys

from training.cli import main

if __name__ == "__main__":
    sys.exit(main())
