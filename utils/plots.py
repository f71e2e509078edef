"""``python -m utils.plots redraw RUN_DIR`` / ``compare RUN_DIR ...``: see utils/viz/plots.py."""
from utils.viz.plots import main

if __name__ == "__main__":
    raise SystemExit(main())
