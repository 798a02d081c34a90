"""The toolkit's PNGs: identifiability per layer, attributions per class, a patching heatmap,
patch class maps over their images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.evaluation.plots import pyplot, save_figure

READING_STYLE = {"cls": ("class token", "-o"), "patches": ("patch tokens", "-s"), "stream": ("model head on the stream", ":^")}


def plot_identifiability(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Rows of `lens.identifiability_table`: identifiability (solid) and top-1 (faint) per layer."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    for token, (label, style) in READING_STYLE.items():
        mine = sorted((r for r in rows if r["token"] == token), key=lambda r: r["layer"])
        if not mine:
            continue
        layers = [r["layer"] for r in mine]
        line = ax.plot(layers, [r["identifiability"] for r in mine], style, label=label)[0]
        ax.plot(layers, [r["top1"] for r in mine], style, color=line.get_color(), alpha=0.3)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("layer (stream after l blocks; 0 = embeddings)")
    ax.set_ylabel("true-class identifiability (faint: top-1)")
    ax.set_ylim(0, 1.02)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "Class-embedding lens", fontsize=9)
    return save_figure(fig, path)


def plot_attribution(components: list[str], by_class: dict[str, np.ndarray], path: str | Path,
                     title: str = "") -> Path:
    """Grouped bars: each component's mean direct contribution to its class's logit, per class."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(components) * max(1, len(by_class)) ** 0.5), 3.4), dpi=110)
    width = 0.8 / max(1, len(by_class))
    x = np.arange(len(components))
    for i, (name, values) in enumerate(by_class.items()):
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
    ax.set_xticks(x, components, rotation=60, ha="right", fontsize=7)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("mean direct logit contribution")
    ax.legend(fontsize=7, title="class", title_fontsize=7)
    ax.set_title(title or "Direct logit attribution (frozen final-norm scale)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_patching(values: np.ndarray, row_labels: list[str], col_labels: list[str], path: str | Path,
                  title: str = "") -> Path:
    """A normalised patching sweep (rows x columns; 1 = clean restored, 0 = corrupted) as a heatmap."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(col_labels) + 1.5), max(2.2, 0.35 * len(row_labels) + 1.2)),
                           dpi=110)
    lim = max(1.0, float(np.nanmax(np.abs(values))) if values.size else 1.0)
    im = ax.imshow(values, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    step = max(1, len(col_labels) // 24)
    ax.set_xticks(range(0, len(col_labels), step), col_labels[::step], rotation=90, fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.04, label="restored (1 = clean)")
    ax.set_title(title or "Activation patching", fontsize=9)
    return save_figure(fig, path)


def plot_patch_class_maps(images: np.ndarray, top: np.ndarray, class_names: list[str], path: str | Path,
                          title: str = "") -> Path:
    """Each image beside its per-patch top class (one colour per class) at one layer."""
    plt = pyplot()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), dpi=110, squeeze=False)
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for i in range(n):
        img = images[i]
        axes[0, i].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        axes[1, i].imshow(top[i], cmap=cmap, vmin=0, vmax=cmap.N - 1, interpolation="nearest")
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    shown = sorted({int(c) for c in np.unique(top)})
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(c % cmap.N)) for c in shown]
    fig.legend(handles, [class_names[c] for c in shown], fontsize=7, loc="lower center", ncol=min(6, len(shown)))
    fig.suptitle(title or "Top class of each patch", fontsize=9)
    fig.subplots_adjust(bottom=0.15)
    return save_figure(fig, path)


def plot_perturbation(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Rows of `perturbation.perturbation_table`: accuracy and the true class's identifiability
    (output, class token, patches) under each condition."""
    plt = pyplot()
    measures = [("accuracy", "accuracy"), ("identifiability", "identifiability (output)"),
                ("cls_identifiability", "class token"), ("patch_identifiability", "patch tokens")]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(rows) + 1), 3.2), dpi=110)
    x = np.arange(len(rows))
    width = 0.8 / len(measures)
    for i, (key, label) in enumerate(measures):
        values = [np.nan if r.get(key) is None else r[key] for r in rows]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=label)
    ax.set_xticks(x, [r["condition"] for r in rows], fontsize=8)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title or "Perturbations (Vilas et al. 2023); dashed: identifiability at chance", fontsize=9)
    return save_figure(fig, path)
