"""User-facing errors: each message is one line; the command lines print it and exit with code 2.

Kept free of heavy imports so that a bad command line is refused at once.
"""


class UserError(Exception):
    """Bad input from the user (config, data files, stage-1 run, output folder)."""


class ConfigError(UserError):
    """An invalid configuration key or value."""


class DataError(UserError):
    """Dataset files missing, corrupt, or not matching the config."""


class Stage1Error(UserError):
    """The stage-1 run cannot be used by stage 2."""


class RunDirError(UserError):
    """The run directory cannot be used (escapes exp/, not writable...)."""


class CheckpointError(UserError):
    """checkpoint.ckpt cannot be used to resume (unsafe, truncated, another config...)."""


class TrainingDiverged(Exception):
    """The training loss became NaN or infinite (exit code 3; the last good checkpoint is kept)."""


class RunInterrupted(Exception):
    """Ctrl-C / SIGTERM stopped the run at a clean point after saving the checkpoint (exit code 130)."""

    def __init__(self, message: str, run_dir=None):
        super().__init__(message)
        self.run_dir = run_dir
