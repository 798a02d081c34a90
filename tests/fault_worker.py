"""A process that runs the fault suite and kills itself with SIGKILL at a chosen point, for
tests/test_faults.py (not a test module).

    python tests/fault_worker.py ROOT [KILL_POINT]

KILL_POINT is one of `KILL_POINTS`; without one the suite runs to the end. The kill is a real
SIGKILL (no cleanup, no finally blocks, no atexit), sent from inside at a chosen line so the test
is deterministic instead of racing a timer.
"""

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)  # as tests/conftest.py: float results depend on it


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _after_call(module, name: str, nth: int = 1, when=lambda *a, **k: True):
    """Kill the process right after the nth call of module.name (that satisfies `when`)."""
    original, calls = getattr(module, name), [0]

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        if when(*args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:
                _die()
        return out

    setattr(module, name, wrapper)


def _kill_during_extraction():
    """Mid-shard: shard 1's second file is written, its other files and its marker are not."""
    from analysis.activations import shard_file

    _after_call(shard_file.ShardFileWriter, "write", nth=2,
                when=lambda self, start, data: start >= 256 and self.array.basename == "acts")


def _kill_during_training():
    """After the first resumable training state is saved, mid-run."""
    from analysis.dictionaries.training import loop

    _after_call(loop, "save_train_state")


def _kill_before_weights_rename():
    """The weights written to their temporary file, not yet renamed into place."""
    from analysis import integrity

    original = integrity.os.replace

    class _Os:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            if str(dst).endswith("weights.safetensors"):
                _die()
            return original(src, dst)

    integrity.os = _Os()


def _kill_during_catalog():
    """The catalog's first view created, the others not."""
    from analysis import catalog

    _after_call(catalog, "_create_view")


KILL_POINTS = {"extraction": _kill_during_extraction, "training": _kill_during_training,
               "weights_rename": _kill_before_weights_rename, "catalog": _kill_during_catalog}


def main(root: str, kill_point: str | None = None) -> int:
    from analysis.paths import DataRoot
    from test_faults import run_fault_suite

    if kill_point:
        KILL_POINTS[kill_point]()
    run_fault_suite(DataRoot(root))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
