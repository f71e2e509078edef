"""first.py / second.py with two hooks for bench/gpu_check.py: stop at a chosen
training step, and skip the figures.

    python bench/staged_run.py [--kill-at EPOCH:STEP] [--no-figures] first|second ARGS...

``--kill-at 2:80`` sends the process SIGKILL at the 80th training step of epoch 2
(counted by calls of the objective, which every step makes once): a crash at an
exact point mid-epoch, where a kill from outside would race a fast GPU epoch.
``--no-figures`` passes the command lines' own ``--no_figures`` (matplotlib, ~5 s a run;
figures are not a CUDA path and tests/test_plots.py covers them).  Everything else is
``utils.cli.main``, what first.py and second.py run; under torchrun this file is the
per-process script.

The step hook is also a context manager for in-process runs (:func:`stop_at`).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _replace_everywhere(original: Callable, replacement: Callable) -> Callable[[], None]:
    """Point every ``utils.*`` module global that is ``original`` (however the module
    imported it) at ``replacement``; returns the function that undoes it."""
    name = original.__name__
    patched = [m for key, m in list(sys.modules.items())
               if key.split(".")[0] == "utils" and getattr(m, name, None) is original]
    if not patched:
        raise RuntimeError(f"no utils module holds {original.__module__}.{name}: the hook has nothing to wrap")
    for module in patched:
        setattr(module, name, replacement)

    def undo() -> None:
        for module in patched:
            setattr(module, name, original)
    return undo


class _ActAtStep:
    """Wraps a training objective (called once per step) and acts before its ``step``-th call."""

    def __init__(self, inner, step: int, action: Callable[[], None]):
        self._inner, self._step, self._action, self._calls = inner, step, action, 0

    def __call__(self, *args, **kwargs):
        self._calls += 1
        if self._calls == self._step:
            self._action()
        return self._inner(*args, **kwargs)

    def __getattr__(self, name):  # set_epoch() and the rest of the objective
        return getattr(self._inner, name)


@contextlib.contextmanager
def stop_at(epoch: int, step: int, action: Callable[[], None]):
    """Run ``action`` (raise KeyboardInterrupt, SIGKILL this process...) at ``step`` of ``epoch``."""
    import utils.run.pipeline  # noqa: F401  (imports every module that calls the training loop)
    from utils.engine.train import train_one_epoch

    def train_one_epoch_with_stop(model, split, state, epoch_now, *args, **kwargs):
        if epoch_now != epoch:
            return train_one_epoch(model, split, state, epoch_now, *args, **kwargs)
        objective = state.objective
        state.objective = _ActAtStep(objective, step, action)
        try:
            return train_one_epoch(model, split, state, epoch_now, *args, **kwargs)
        finally:
            state.objective = objective

    undo = _replace_everywhere(train_one_epoch, train_one_epoch_with_stop)
    try:
        yield
    finally:
        undo()


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    kill_at, figures = None, True
    while argv and argv[0].startswith("--"):
        flag = argv.pop(0)
        if flag == "--kill-at":
            epoch, step = argv.pop(0).split(":")
            kill_at = (int(epoch), int(step))
        elif flag == "--no-figures":
            figures = False
        else:
            print(f"error: unknown option {flag}; use --kill-at EPOCH:STEP or --no-figures", file=sys.stderr)
            return 2
    if not argv or argv[0] not in ("first", "second"):
        print("error: give the stage, first or second, before its arguments", file=sys.stderr)
        return 2
    from utils.cli import main as stage_main
    with contextlib.ExitStack() as hooks:
        if kill_at is not None:
            hooks.enter_context(stop_at(*kill_at, kill_self))
        return stage_main(argv[0], argv[1:] + ([] if figures else ["--no_figures"]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
