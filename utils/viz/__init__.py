"""Figures and tables drawn from the files a run wrote; nothing below this package imports it
(a training run never loads a plotting library)."""
