"""Static plots written to <root>/reports/ (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402


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
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for (hook, arch, expansion), members in sorted(groups.items()):
        members.sort(key=lambda r: r["l0"])
        ax.plot([r["l0"] for r in members], [r["fvu"] for r in members], marker="o",
                label=f"{hook} {arch} ×{expansion}")
        for r in members:
            label = f"k={r['k']}" if r.get("k") is not None else f"λ={r.get('sparsity_coef'):g}"
            ax.annotate(label, (r["l0"], r["fvu"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel("FVU (held-out, mean-centred)")
    ax.set_title("Sparsity–reconstruction frontier")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
