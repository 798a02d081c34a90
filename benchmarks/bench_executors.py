"""A whole suite from an empty root: Dagster's multiprocess executor (`make run`'s default: steps
as processes, `--runs` partition runs at once, the `gpu` pool) against one process running
every run in turn (`--executor in_process`), in the same session.

Each is `python -m pipelines.run` in a subprocess on a fresh root, so both pay for everything
(the mouse, extraction, every member, the report); the executors alternate between repeats so
drift falls on both. The result holds the wall times, their ratio, and whether the two roots
hold the same artifacts (every file's checksum, wall-time records aside).

Writes benchmarks/results/executors.json.

    .venv/bin/python benchmarks/bench_executors.py [--suite default] [--runs 1] [--repeats 1]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import machine, median_ratio, write  # noqa: E402

# files holding wall times, the lock files, the Dagster instance and DuckDB's own file
VOLATILE = {"result.json", "train_summary.json", "toolkit.done.json", "mouse_history",
            ".locks", "dagster_home", "wandb", "catalog.duckdb", "catalog.duckdb.wal"}


def run(suite: str, root: Path, executor: str, runs: int) -> float:
    env = {**os.environ, "SPECTRA_ROOT": str(root), "DAGSTER_HOME": str(root / "dagster_home"),
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipelines.run", "--suite", suite, "--root", str(root),
                           "--executor", executor, "--runs", str(runs)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{executor} run failed:\n{proc.stdout[-4000:]}")
    return seconds


def checksums(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not VOLATILE & set(rel.parts) and not (rel.parts[0] == "tables"
                                                                     and rel.parts[1] == "dictionaries"):
            out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="default")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "executors.json"))
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="spectra-bench-executors-"))
    times: dict[str, list[float]] = {"in_process": [], "multiprocess": []}
    same = None
    try:
        for r in range(args.repeats):
            order = ["in_process", "multiprocess"] if r % 2 == 0 else ["multiprocess", "in_process"]
            roots = {}
            for executor in order:
                roots[executor] = base / f"{executor}{r}"
                times[executor].append(run(args.suite, roots[executor], executor, args.runs))
                print(f"repeat {r + 1}: {executor} {times[executor][-1]:.1f} s", flush=True)
            a, b = checksums(roots["in_process"]), checksums(roots["multiprocess"])
            same = a == b if same is None else same and a == b
            if a != b:
                print("differing files:", sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))[:20])
            for root in roots.values():
                shutil.rmtree(root)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    write(args.out, {"machine": machine(), "suite": args.suite, "runs_in_flight": args.runs,
                     "seconds": times, "multiprocess_over_in_process": median_ratio(times["multiprocess"],
                                                                                    times["in_process"]),
                     "same_artifacts": same}, runs_key="seconds")


if __name__ == "__main__":
    main()
