"""Static plots written to <root>/reports/ (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (no display on servers and CI), imported on
    first use: every process that imports the asset definitions (each Dagster step process, the
    UI's code server) would otherwise pay its ~0.6 s import, plotting or not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fvu_vs_l0(evaluations: pa.Table, path: str | Path) -> Path:
    """One line per (hook, architecture, expansion): FVU against L0, log-x, the sparsity frontier.

    A transcoder's line is labelled `in -> out` (its FVU is of the predicted hook), a crosscoder's
    `a + b` (its FVU pooled over its hooks)."""
    rows = evaluations.to_pylist()
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        hook = f"{r['hook']} -> {r['out_hook']}" if r.get("out_hook") else r["hook"]
        if r.get("hooks"):
            hook = " + ".join(r["hooks"])
        kind = r.get("kind") or "sae"
        arch = r["architecture"] + ("" if kind == "sae" else f" {kind}") + (" +skip" if r.get("skip") else "")
        groups.setdefault((hook, arch, r["expansion"]), []).append(r)
    fig, ax = pyplot().subplots(figsize=(6, 4), dpi=120)
    for (hook, arch, expansion), members in sorted(groups.items()):
        points = _over_seeds(members)
        line = ax.errorbar([p["l0"] for p in points], [p["fvu"] for p in points],
                           xerr=[[p["l0"] - p["l0_min"] for p in points], [p["l0_max"] - p["l0"] for p in points]],
                           yerr=[[p["fvu"] - p["fvu_min"] for p in points], [p["fvu_max"] - p["fvu"] for p in points]],
                           marker="o", capsize=2, label=f"{hook} {arch} ×{expansion}")
        for p in points:
            label = f"k={p['k']}" if p.get("k") is not None else f"λ={p.get('sparsity_coef'):g}"
            label += f" ({p['n_seeds']} seeds)" if p["n_seeds"] > 1 else ""
            ax.annotate(label, (p["l0"], p["fvu"]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=line[0].get_color())
    ax.set_xscale("log")
    ax.set_title("Sparsity–reconstruction frontier (mean, bars: min–max over seeds)")
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel("FVU (held-out, mean-centred)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_training_curve(log_rows: list[dict], path: str | Path, title: str = "") -> Path:
    """A training log (rows of the train_log table) as a small PNG: the batch loss and, where the
    run had held-out tokens, the held-out FVU against the step (log y), L0 on the right axis."""
    steps = [r["step"] for r in log_rows]
    fig, ax = pyplot().subplots(figsize=(4.5, 2.6), dpi=100)
    ax.plot(steps, [r["loss"] for r in log_rows], label="loss (batch FVU + penalties)")
    if any(r.get("eval_fvu") is not None for r in log_rows):
        ax.plot(steps, [r.get("eval_fvu") for r in log_rows], label="held-out FVU")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(True, which="both", alpha=0.3)
    right = ax.twinx()
    right.plot(steps, [r["l0"] for r in log_rows], color="grey", linestyle=":", label="L0")
    right.set_ylabel("L0", color="grey")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title, fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    pyplot().close(fig)
    return path


def _over_seeds(members: list[dict]) -> list[dict]:
    """One point per k (or coefficient): mean FVU and L0 over the seeds, with their min and max."""
    by_setting: dict = {}
    for r in members:
        by_setting.setdefault((r.get("k"), r.get("sparsity_coef")), []).append(r)
    points = []
    for (k, coef), rows in by_setting.items():
        point = {"k": k, "sparsity_coef": coef, "n_seeds": len(rows)}
        for metric in ("l0", "fvu"):
            values = [r[metric] for r in rows]
            point.update({metric: float(np.mean(values)), f"{metric}_min": min(values), f"{metric}_max": max(values)})
        points.append(point)
    return sorted(points, key=lambda p: p["l0"])
