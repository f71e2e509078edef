"""A run of a stage, as a story (pipeline.py): plan its directory, prepare the model and data, the
epoch loop, checkpoints and resume, the non-finite guard, signals, and the final files."""
