#!/usr/bin/env python
"""Stage 1: train a backbone on long-tailed data.  See `python first.py --help`."""
import sys

from utils.cli import main

if __name__ == "__main__":
    sys.exit(main("first"))
