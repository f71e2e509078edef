"""The code behind first.py and second.py, in layers; each imports only the layers above it.

    errors.py, names.py, distributed.py   the bottom: user errors, the one list of names, processes
    config/    the run's configuration: schema, loading, rules, flags
    data/      long-tailed datasets, their splits and the on-device augmentation
    engine/    the training step, objective, parameters, evaluation passes and metrics
    run/       a run of a stage: planning its directory, the epoch loop, checkpoints, outputs
    viz/       figures and tables drawn from the files a run wrote
    cli.py     the command lines (parse -> run -> draw figures); nothing imports it

``python -m utils.plots`` and ``python -m utils.report`` are the commands of viz/.
"""
