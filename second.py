#!/usr/bin/env python
"""Stage 2: retrain the classifier or adjust its logits.  See `python second.py --help`."""
import sys

from utils.cli import main

if __name__ == "__main__":
    sys.exit(main("second"))
