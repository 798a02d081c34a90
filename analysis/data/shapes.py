"""dSprites-style synthetic shapes: one white sprite on black, with known latents.

Latents follow dSprites (Matthey et al. 2017): shape in {square, ellipse, heart},
6 scales linspace(0.5, 1), 40 orientations in [0, 2*pi), 32 x- and 32 y-positions
in [0, 1]. Images are rendered here (not downloaded) by an implicit inside-test on
the pixel grid: every pixel centre is mapped into the sprite's own frame (shift,
inverse-rotate, divide by size) and kept when it falls inside the unit shape.
Rendering is vectorized over a chunk of images at once, so 20k images take seconds.

The known latents are what make the data useful for interpretability: a feature
found in the mouse ViT can be checked against shape, scale, rotation and position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal, NamedTuple, get_args

import numpy as np
import pyarrow as pa

from analysis.data.images import first_copies, image_sha256, split_unique

SHAPES = ("square", "ellipse", "heart")
IMAGE_SIZE = 64
N_SCALES, N_ORIENTATIONS, N_POSITIONS = 6, 40, 32
SCALE_VALUES = np.linspace(0.5, 1.0, N_SCALES)
ORIENTATION_VALUES = np.linspace(0.0, 2 * np.pi, N_ORIENTATIONS, endpoint=False)
POSITION_VALUES = np.linspace(0.0, 1.0, N_POSITIONS)

# Half-size of a scale-1 sprite in pixels, and the band of the image the sprite
# centre moves in. Chosen so a scale-1 square rotated by 45 deg (half-diagonal
# ~13.6 px) stays inside the 64 px frame at every position.
_HALF_SIZE_PX = 9.6
_CENTER_LO, _CENTER_HI = 14.0, 50.0
_ELLIPSE_MINOR = 0.5  # minor/major axis ratio; elongated so its rotation is visible

Task = Literal["shape", "quadrant", "shape_quadrant", "scale"]
TASKS: tuple[str, ...] = get_args(Task)
SplitBy = Literal["content", "image"]
SPLIT_BY: tuple[str, ...] = get_args(SplitBy)
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class ShapesConfig:
    """What to render and which latent the "label" column holds.

    The default (shape identity on the three largest scales, any orientation and
    position) is the task the default mouse ViT learns to >= 0.9 held-out accuracy
    inside the pipeline's time budget; see `analysis.models.mouse`.
    """

    n_images: int = 20000
    """Number of images to render."""
    seed: int = 0
    """Seed of the latent sampling and of the train/eval split; same seed, same bytes."""
    task: Task = "shape"
    """Which class the "label" column holds: "shape" (3 classes), "quadrant" of the
    sprite centre (4: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right),
    "shape_quadrant" (12 = shape * 4 + quadrant) or "scale" (index among `scales`)."""
    scales: tuple[int, ...] = (3, 4, 5)
    """Indices into the 6 scales linspace(0.5, 1) that may be sampled. Large sprites
    keep the shapes distinguishable at 8 px patches."""
    orientations: tuple[int, ...] | None = None
    """Indices into the 40 orientations that may be sampled; None allows all 40."""
    eval_fraction: float = 0.2
    """Fraction held out in the "eval" split: of the distinct images with split_by="content",
    of all images with split_by="image"."""
    split_by: SplitBy = "content"
    """"content": the split is drawn over distinct images and a copy (the sampled latents repeat,
    and e.g. every orientation of a circle renders alike) goes where its first went, so no
    held-out image equals a training image. "image": each image drawn on its own, as before; about
    a tenth of the default held-out images then equal a training image."""

    def __post_init__(self) -> None:
        if self.n_images < 1:
            raise ValueError(f"n_images={self.n_images}: expected a positive count; pass e.g. 20000")
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: expected one of {TASKS}; pick one of those")
        _check_indices("scales", self.scales, N_SCALES)
        if self.orientations is not None:
            _check_indices("orientations", self.orientations, N_ORIENTATIONS)
        if self.split_by not in SPLIT_BY:
            raise ValueError(f"split_by={self.split_by!r}: expected one of {SPLIT_BY}; \"content\" keeps copies "
                             "of training images out of the held-out split")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(
                f"eval_fraction={self.eval_fraction}: expected a fraction in [0, 1); e.g. 0.2"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShapesConfig":
        """Inverse of to_dict; accepts lists (from JSON/YAML) where tuples are expected."""
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown ShapesConfig keys {sorted(set(d) - known)}; expected {sorted(known)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    @property
    def class_names(self) -> list[str]:
        quadrants = ["top_left", "top_right", "bottom_left", "bottom_right"]
        if self.task == "shape":
            return list(SHAPES)
        if self.task == "quadrant":
            return quadrants
        if self.task == "shape_quadrant":
            return [f"{s}_{q}" for s in SHAPES for q in quadrants]
        return [f"scale_{SCALE_VALUES[i]:.1f}" for i in self.scales]


def _check_indices(name: str, values: tuple[int, ...], n: int) -> None:
    if len(values) == 0 or any(not 0 <= int(v) < n for v in values) or len(set(values)) != len(values):
        raise ValueError(
            f"{name}={values!r}: expected distinct indices in [0, {n}); e.g. {tuple(range(min(n, 3)))}"
        )


class ShapesData(NamedTuple):
    images: np.ndarray
    """uint8 (N, 64, 64, 1), values 0 or 255."""
    labels: dict[str, np.ndarray]
    """"label" (int64 task class), "shape", "scale", "orientation", "pos_x", "pos_y"
    (int64 latent indices into the full dSprites grids), "split" (str per image) and
    "duplicate_of" (the first image with the same pixels, null for a first)."""
    class_names: list[str]
    """Name of each "label" class, by index."""


def render_shapes(
    shape: np.ndarray,
    scale: np.ndarray,
    orientation: np.ndarray,
    pos_x: np.ndarray,
    pos_y: np.ndarray,
    *,
    chunk: int = 1024,
) -> np.ndarray:
    """Render sprites from latent indices (each int array (N,)) -> uint8 (N, 64, 64, 1)."""
    n = len(shape)
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8)
    # Pixel centres; y grows downwards like image rows.
    grid = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    gy, gx = grid[None, :, None], grid[None, None, :]
    for lo in range(0, n, chunk):
        sl = slice(lo, min(lo + chunk, n))
        cx = _CENTER_LO + (_CENTER_HI - _CENTER_LO) * POSITION_VALUES[pos_x[sl]]
        cy = _CENTER_LO + (_CENTER_HI - _CENTER_LO) * POSITION_VALUES[pos_y[sl]]
        theta = ORIENTATION_VALUES[orientation[sl]]
        size = (_HALF_SIZE_PX * SCALE_VALUES[scale[sl]]).astype(np.float32)[:, None, None]
        cos = np.cos(theta).astype(np.float32)[:, None, None]
        sin = np.sin(theta).astype(np.float32)[:, None, None]
        dx = gx - cx.astype(np.float32)[:, None, None]
        # Flip y so the sprite frame is y-up (the heart points down, lobes up) and
        # positive angles turn counter-clockwise on screen.
        dy = cy.astype(np.float32)[:, None, None] - gy
        u = (cos * dx + sin * dy) / size
        v = (-sin * dx + cos * dy) / size
        out[sl, :, :, 0] = np.where(_inside(shape[sl], u, v), 255, 0).astype(np.uint8)
    return out


def _inside(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean (B, H, W): is each sprite-frame point inside that image's unit shape."""
    out = np.zeros(u.shape, dtype=bool)
    # Evaluate each test only on its own images: the heart's polynomial is the costly one.
    for s, test in enumerate((_in_square, _in_ellipse, _in_heart)):
        mask = shape == s
        if mask.any():
            out[mask] = test(u[mask], v[mask])
    return out


def _in_square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 1.0


def _in_ellipse(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    w = v / _ELLIPSE_MINOR
    return u * u + w * w <= 1.0


def _in_heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Classic implicit heart (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0. It spans x in
    # [-1.14, 1.14], y in [-1, 1.25]; rescale and recentre it to the unit box.
    x, y = u * 1.14, v * 1.12 + 0.12
    x2, y2 = x * x, y * y
    r = x2 + y2 - 1.0
    return r * r * r <= x2 * y2 * y  # products, not **3: numpy's pow is ~10x slower


def _task_labels(cfg: ShapesConfig, shape: np.ndarray, scale: np.ndarray, pos_x, pos_y) -> np.ndarray:
    right = pos_x >= N_POSITIONS // 2
    bottom = pos_y >= N_POSITIONS // 2
    quadrant = right.astype(np.int64) + 2 * bottom.astype(np.int64)
    if cfg.task == "shape":
        return shape.copy()
    if cfg.task == "quadrant":
        return quadrant
    if cfg.task == "shape_quadrant":
        return shape * 4 + quadrant
    lookup = {s: i for i, s in enumerate(cfg.scales)}
    return np.array([lookup[int(s)] for s in scale], dtype=np.int64)


def generate_shapes(cfg: ShapesConfig) -> ShapesData:
    """Sample latents uniformly from the allowed values, render, label and split."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_images
    orientations = np.arange(N_ORIENTATIONS) if cfg.orientations is None else np.array(cfg.orientations)
    shape = rng.integers(0, len(SHAPES), n).astype(np.int64)
    scale = rng.choice(np.asarray(cfg.scales, dtype=np.int64), n)
    orientation = rng.choice(orientations.astype(np.int64), n)
    pos_x = rng.integers(0, N_POSITIONS, n).astype(np.int64)
    pos_y = rng.integers(0, N_POSITIONS, n).astype(np.int64)
    # Exact eval count (not a per-image coin flip) so the fraction is what was asked.
    is_eval = np.zeros(n, dtype=bool)
    is_eval[rng.permutation(n)[: int(round(cfg.eval_fraction * n))]] = True
    images = render_shapes(shape, scale, orientation, pos_x, pos_y)
    shas = [image_sha256(img) for img in images]
    if cfg.split_by == "content" and cfg.eval_fraction > 0:
        is_eval = split_unique(shas, cfg.eval_fraction, cfg.seed) == "eval"
    labels = {
        "label": _task_labels(cfg, shape, scale, pos_x, pos_y),
        "shape": shape,
        "scale": scale,
        "orientation": orientation,
        "pos_x": pos_x,
        "pos_y": pos_y,
        "split": np.where(is_eval, "eval", "train"),
        "duplicate_of": pa.array(first_copies(shas), pa.int64()),
    }
    return ShapesData(images=images, labels=labels, class_names=cfg.class_names)
