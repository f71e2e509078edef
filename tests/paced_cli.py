"""first.py / second.py with every optimiser step held for a fixed time, for the tests that
signal a run part-way through an epoch (tests/test_resume.py, tests/test_distributed.py):

    python tests/paced_cli.py SECONDS first|second ARGS...
    torchrun --nproc_per_node=2 tests/paced_cli.py SECONDS first ARGS...

The tiny network trains an epoch in milliseconds; held steps give a signal a window to land
in on any machine. The pause changes no number (a global optimiser pre-step hook that only
sleeps), so a paced run's outputs equal an unpaced one's.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402

from utils.cli import main  # noqa: E402


def pace(seconds: float) -> None:
    register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: time.sleep(seconds))


if __name__ == "__main__":
    pace(float(sys.argv[1]))
    sys.exit(main(sys.argv[2], sys.argv[3:]))
