"""A process that owns one Dagster run, for tests/test_stale_runs.py (not a test module).

    python tests/stale_run_worker.py STARTED RELEASE

Runs a one-op job in-process against the instance at $DAGSTER_HOME with the owner tags
`pipelines.run` uses; the op writes the run id to STARTED, then waits until RELEASE exists, so the
test can kill the process mid-run or let the run finish.
"""

import sys
import time
from pathlib import Path

import dagster as dg

from pipelines.stale_runs import owner_tags


def main(started: Path, release: Path) -> int:
    @dg.op
    def wait_for_release(context: dg.OpExecutionContext) -> None:
        tmp = started.with_suffix(".tmp")
        tmp.write_text(context.run_id)
        tmp.replace(started)  # whole or absent: the test reads it as soon as it appears
        while not release.exists():
            time.sleep(0.05)

    @dg.job
    def hold() -> None:
        wait_for_release()

    with dg.DagsterInstance.get() as instance:
        result = hold.execute_in_process(instance=instance, tags=owner_tags())
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
