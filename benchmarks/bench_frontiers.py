"""FVU-L0 frontier of every SAE architecture (TopK, BatchTopK, ReLU-L1, JumpReLU) with its defaults.

Two places, one script:
- the ground truth of `bench_sae_peers.py` (3072 known unit directions in d=384, 6144 latents,
  the same activations): held-out FVU, L0, dead fraction and the fraction of true directions
  recovered at cosine > 0.9 for each architecture at several sparsities;
- the default suite's store (`--suite`): the suite `pipelines/suites/frontiers.yaml` (the
  default dataset, mouse and store; every architecture at several sparsities on both residual
  streams) is run through the pipeline and its catalog's evaluations are copied in, so the
  frontier is measured by the same evaluation a user reads.

For each penalty architecture the result states, at each of its points, the TopK FVU at the same
L0 (linear interpolation in log L0 between TopK's points) and the difference: JumpReLU at
matched L0 is meant to be no worse than TopK. Only the sparsity knob varies; every other setting
is the trainer's default.

    .venv/bin/python benchmarks/bench_frontiers.py [--threads 2] [--suite] [--out ...]

`--variants FILE` trains, on the same ground truth, each entry of a JSON file of name ->
{architecture, its k or sparsity_coef, optional steps (256 by default), any other SAETrainConfig
field}: a recipe tried against the frontier. Each row states TopK's FVU at its L0 from the TopK rows
of `--reference` (a frontier result of the same configuration) and the difference.

    .venv/bin/python benchmarks/bench_frontiers.py --d 128 --n-features 1024 --pool-tokens 131072 \
        --eval-tokens 16384 --skip-ground-truth --variants benchmarks/frontier_variants.json \
        --reference benchmarks/results/frontiers_d128.json --out benchmarks/results/frontier_variants.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import machine, write  # noqa: E402
from ground_truth import DRAWS, MIN_MAGNITUDE, eval_batches, make_activations, recovery, train_batches  # noqa: E402

from analysis.dictionaries.training.sae import SAETrainConfig, train_sae  # noqa: E402
from analysis.evaluation.metrics import reconstruction_metrics  # noqa: E402
from analysis.stages.dictionaries import dictionary_id  # noqa: E402
from analysis.stages.suite import load_suite  # noqa: E402

# the sparsity each architecture is swept over (k, or the penalty coefficient λ)
# (ReLU's L1 at λ = 10 already shrinks every true magnitude, 1.1-10 here, to almost nothing)
GROUND_TRUTH_GRID = {
    "topk": [4, 8, 16, 32, 64],
    "batchtopk": [8, 16, 32, 64],
    "relu": [1.0, 3.0, 10.0],
    "jumprelu": [0.3, 1.0, 3.0, 10.0],
}


GROUND_TRUTH_VERSION = 2
"""2: the data's generator seed is hashed (`bench_sae_peers.data_seed`); rows of version 1 (no
such key) started a seed-0 dictionary at the true directions and are never kept."""


class GroundTruth:
    """The ground truth's activations and the one way every row of this script is trained and scored."""

    def __init__(self, args):
        x, directions = make_activations(args.pool_tokens + args.eval_tokens, args.d, args.n_features, args.seed,
                                         args.draws, args.min_magnitude)
        x, self.directions = torch.from_numpy(x), torch.from_numpy(directions)
        self.train, self.held_out = x[:args.pool_tokens], x[args.pool_tokens:]
        self.mean_norm = float(self.train[:65536].norm(dim=1).mean())  # the store's statistic in production
        self.args = args

    def row(self, arch: str, **fields) -> dict:
        """Train one SAE of `arch` (SAETrainConfig `fields`; `n_train_tokens` defaults to the
        script's) and score it on the held-out tokens."""
        return self.row_with_model(arch, **fields)[1]

    def row_with_model(self, arch: str, **fields) -> tuple:
        """`row`, and the trained SAE (in eval mode)."""
        a = self.args
        fields = {"n_train_tokens": a.train_tokens, "seed": a.seed, **fields}
        cfg = SAETrainConfig(width=a.expansion * a.d, architecture=arch, batch_size=a.batch_size, **fields)
        t0 = time.perf_counter()
        result = train_sae(train_batches(self.train, a.batch_size, cfg.n_train_tokens), a.d, cfg,
                           mean_norm=self.mean_norm, init_batch=self.train[:a.batch_size], progress=False,
                           log_every=10**9)
        seconds = time.perf_counter() - t0
        sae = result.dictionary.eval()
        with torch.no_grad():
            m = reconstruction_metrics(sae, eval_batches(self.held_out))
            rec = recovery(self.directions, sae.W_dec)
        return sae, {"architecture": arch, "l0": m.l0, "fvu": m.fvu, "dead_fraction": m.dead_fraction,
                     "dense_fraction": m.dense_fraction, **rec, "lr": cfg.base_lr(), "seconds": seconds}


def _print_row(name: str, row: dict) -> None:
    print(f"ground truth {name:24s} L0 {row['l0']:6.1f}  FVU {row['fvu']:.4f}  dead {row['dead_fraction']:.2%}  "
          f"recovered {row['recovered_fraction']:.2%}  ({row['seconds']:.0f} s)", flush=True)


def ground_truth(args, on_row) -> list[dict]:
    data = GroundTruth(args)
    rows = []
    for arch in args.architectures:
        for value in GROUND_TRUTH_GRID[arch]:
            knob = {"k": value} if arch in ("topk", "batchtopk") else {"sparsity_coef": value}
            row = data.row(arch, **knob)
            rows.append({"architecture": arch, **knob, **row})
            on_row(rows)
            _print_row(f"{arch} {next(iter(knob))}={value:g}", row)
    return rows


def variants(args, on_row) -> list[dict]:
    """The rows of `--variants` (module docstring), each against TopK's FVU at its L0 in `--reference`."""
    reference = json.loads(Path(args.reference).read_text())
    same = {k: _recorded(reference["config"], k) for k in ("d", "expansion", "batch_size", "pool_tokens",
                                                           "eval_tokens", "n_features", "draws", "min_magnitude", "seed",
                                                           "threads",
                                                           "ground_truth_version")}
    now = {**{k: getattr(args, k) for k in same if k != "ground_truth_version"},
           "ground_truth_version": GROUND_TRUTH_VERSION}
    if same != now:
        raise SystemExit(f"--reference {args.reference} was measured with {same}, not {now}: pass a frontier "
                         "of the same ground truth")
    topk = sorted((r["l0"], r["fvu"]) for r in reference["ground_truth"] if r["architecture"] == "topk")
    data = GroundTruth(args)
    rows = []
    for name, spec in json.loads(Path(args.variants).read_text()).items():
        fields = dict(spec)
        arch = fields.pop("architecture")
        if "steps" in fields:
            fields["n_train_tokens"] = fields.pop("steps") * args.batch_size
        row = data.row(arch, **fields)
        ref = _interpolate(topk, row["l0"])
        rows.append({"variant": name, "settings": spec, **row, "topk_fvu_at_l0": ref,
                     "fvu_minus_topk": None if ref is None else row["fvu"] - ref})
        on_row(rows)
        _print_row(name, row)
    return rows


def default_suite(args) -> list[dict]:
    """Run pipelines/suites/frontiers.yaml into `--suite-root` and read its evaluations."""
    import duckdb

    root = Path(args.suite_root or tempfile.mkdtemp(prefix="spectra-frontiers-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1", "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "DAGSTER_HOME": str(root / "dagster_home")}
    subprocess.run([sys.executable, "-m", "pipelines.run", "--suite", "frontiers", "--root", str(root)],
                   cwd=ROOT, env=env, check=True)
    # only this code's members: a root that ran the suite under other defaults also holds the
    # evaluations of the dictionaries those defaults made (other ids, same suite name)
    spec = load_suite(ROOT / "pipelines" / "suites" / "frontiers.yaml")
    ids = [dictionary_id(spec, m) for m in spec.members()]
    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
    query = """SELECT hook, architecture, k, sparsity_coef, l0, fvu, dead_fraction, dense_fraction,
                      loss_recovered, n_dead_tokens
               FROM evaluations WHERE kind = 'sae' AND dict_id IN (SELECT unnest(?))
               ORDER BY hook, architecture, k, sparsity_coef"""
    cur = con.execute(query, [ids])
    names = [c[0] for c in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def matched_l0(rows: list[dict], group: tuple[str, ...] = ()) -> list[dict]:
    """Each non-TopK point against TopK's FVU at the same L0 (log-L0 interpolation, within range)."""
    out = []
    keys = sorted({tuple(r[g] for g in group) for r in rows})
    for key in keys:
        same = [r for r in rows if tuple(r[g] for g in group) == key]
        topk = sorted((r["l0"], r["fvu"]) for r in same if r["architecture"] == "topk")
        for r in same:
            if r["architecture"] == "topk":
                continue
            ref = _interpolate(topk, r["l0"])
            out.append({**dict(zip(group, key)), "architecture": r["architecture"],
                        "sparsity": r.get("k") if r.get("k") is not None else r.get("sparsity_coef"),
                        "l0": r["l0"], "fvu": r["fvu"], "topk_fvu_at_l0": ref,
                        "fvu_minus_topk": None if ref is None else r["fvu"] - ref})
    return out


def _interpolate(points: list[tuple[float, float]], l0: float) -> float | None:
    for (l0_a, fvu_a), (l0_b, fvu_b) in zip(points, points[1:]):
        if l0_a <= l0 <= l0_b and l0_a > 0:
            t = (math.log(l0) - math.log(l0_a)) / (math.log(l0_b) - math.log(l0_a)) if l0_b > l0_a else 0.0
            return fvu_a + t * (fvu_b - fvu_a)
    return None  # outside TopK's measured range: no claim


def _recorded(config: dict, key: str):
    """A result's setting; results from before `--draws` / `--min-magnitude` existed were all
    measured at DRAWS / MIN_MAGNITUDE."""
    return config.get(key, {"draws": DRAWS, "min_magnitude": MIN_MAGNITUDE}.get(key))


def kept_rows(args) -> list[dict]:
    """The rows of --out for the architectures not swept now, refused when they were measured
    with another configuration (another data, width or length would not compare)."""
    old = json.loads(Path(args.out).read_text())
    now = {k: v for k, v in vars(args).items() if k not in ("out", "architectures", "keep_others", "suite",
                                                             "suite_root", "skip_ground_truth", "variants",
                                                             "reference")}
    now["ground_truth_version"] = GROUND_TRUTH_VERSION
    then = {k: _recorded(old["config"], k) for k in now}
    if then != now:
        raise SystemExit(f"--keep-others: {args.out} was measured with {then}, not {now}; rerun every architecture")
    return [r for r in old.get("ground_truth", []) if r["architecture"] not in args.architectures]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--train-tokens", type=int, default=2**20)
    ap.add_argument("--pool-tokens", type=int, default=2**18)
    ap.add_argument("--eval-tokens", type=int, default=2**15)
    ap.add_argument("--n-features", type=int, default=3072)
    ap.add_argument("--draws", type=int, default=DRAWS,
                    help="directions drawn per token, about half of which fire (ground_truth.py)")
    ap.add_argument("--min-magnitude", type=float, default=MIN_MAGNITUDE,
                    help="smallest magnitude of an active direction, which are this + Exp(1) (ground_truth.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--suite", action="store_true", help="also run the frontiers suite on the default store")
    ap.add_argument("--suite-root", help="data root for --suite (default: a new temporary directory)")
    ap.add_argument("--skip-ground-truth", action="store_true")
    ap.add_argument("--architectures", default=",".join(GROUND_TRUTH_GRID),
                    help="comma-separated architectures to sweep on the ground truth")
    ap.add_argument("--keep-others", action="store_true",
                    help="keep the ground-truth rows of the architectures not in --architectures from --out "
                         "(same config), so a rerun of one architecture is still compared with TopK")
    ap.add_argument("--variants", help="JSON file of name -> recipe, each trained on the ground truth (module docstring)")
    ap.add_argument("--reference", default=str(Path(__file__).parent / "results" / "frontiers_d128.json"),
                    help="--variants: the frontier result whose TopK rows each variant is compared with")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "frontiers.json"))
    args = ap.parse_args()
    args.architectures = args.architectures.split(",")
    unknown = set(args.architectures) - set(GROUND_TRUTH_GRID)
    if unknown:
        raise SystemExit(f"unknown --architectures {sorted(unknown)}: choose from {list(GROUND_TRUTH_GRID)}")
    torch.set_num_threads(args.threads)

    result = {"machine": machine(), "config": {**{k: v for k, v in vars(args).items() if k != "out"},
                                               "ground_truth_version": GROUND_TRUTH_VERSION},
              "grid": {a: GROUND_TRUTH_GRID[a] for a in args.architectures}}

    def partial(rows):  # rewritten after every run, so an interrupted sweep keeps its rows
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**result, "ground_truth": rows, "complete": False}, indent=2))

    kept = kept_rows(args) if args.keep_others else []
    if not args.skip_ground_truth:
        rows = kept + ground_truth(args, lambda new: partial(kept + new))
        result["ground_truth"] = rows
        result["ground_truth_matched_l0"] = matched_l0(rows)
    if args.variants:
        result["variants"] = variants(args, lambda rows: Path(args.out).write_text(
            json.dumps({**result, "variants": rows, "complete": False}, indent=2)))
    if args.suite:
        rows = default_suite(args)
        result["default_suite"] = rows
        result["default_suite_matched_l0"] = matched_l0(rows, group=("hook",))
    write(args.out, {**result, "complete": True}, runs_key="ground_truth")


if __name__ == "__main__":
    main()
