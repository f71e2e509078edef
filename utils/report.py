"""``python -m utils.report DIR [DIR ...]``: tables over seeds; see utils/viz/report.py."""
import sys

from utils.viz.report import main

if __name__ == "__main__":
    sys.exit(main())
