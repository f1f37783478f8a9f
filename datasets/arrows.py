"""Arrow-pointing extrapolation (pLSTM paper, section 5.1): an arrow and a circle; does the arrow point at it?

Written from the paper's description (the generator itself is not published with this repository):
a black image holds one arrow (shaft + two-barbed head) and one filled circle at random positions, sizes,
orientations and colours; the label is 1 when the ray leaving the arrow's tip in its direction hits the
circle. The task needs long-range directional information, and models are trained at one resolution and
tested at larger ones.

Scenes live in the unit square (``x`` right, ``y`` down) and are rasterised (anti-aliased) at any
resolution, so sample ``i`` of a seed is *the same scene* at 32 px and at 64 px. Sample ``i`` is drawn from
``numpy.random.default_rng([seed, i])`` and has label ``i % 2`` (exactly balanced for even sizes); the
geometry is rejection-sampled given the label, with a margin around the decision boundary (a positive ray
passes within ``0.8 r`` of the centre, a negative one stays beyond ``1.25 r``) so that labels stay
unambiguous at low resolution.

Example:
    >>> from plstm_graph.datasets.arrows import ArrowPointing
    >>> ds = ArrowPointing(num_samples=4, resolution=32, seed=0)
    >>> image, label = ds[1]
    >>> image.shape, label
    (torch.Size([3, 32, 32]), 1)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

__all__ = ["ArrowScene", "points_at", "sample_scene", "render", "ArrowPointing", "make_arrow_dataset",
           "sample_scenes", "render_batch", "make_arrow_dataset_fast"]

_MARGIN = 0.05  # keep shapes this far from the image border
_THICKNESS = 0.045  # line width of the arrow, in image widths (~1.5 px at 32 px)
_HEAD = 0.3  # barb length as a fraction of the arrow length
_BARB_ANGLE = np.deg2rad(30.0)


@dataclass(frozen=True)
class ArrowScene:
    """One scene in unit-square coordinates."""

    tail: Tuple[float, float]
    tip: Tuple[float, float]
    center: Tuple[float, float]
    radius: float
    arrow_color: Tuple[float, float, float]
    circle_color: Tuple[float, float, float]

    @property
    def label(self) -> int:
        return int(points_at(self.tail, self.tip, self.center, self.radius))


def _ray_offsets(tail, tip, center):
    """Distance along the arrow's ray from the tip to the foot of the perpendicular from ``center``, and
    the perpendicular distance."""
    tail, tip, center = (np.asarray(p, dtype=np.float64) for p in (tail, tip, center))
    d = tip - tail
    d = d / np.linalg.norm(d)
    w = center - tip
    along = float(w @ d)
    perp = float(np.linalg.norm(w - along * d))
    return along, perp


def points_at(tail, tip, center, radius: float) -> bool:
    """Whether the ray from ``tip`` in direction ``tip - tail`` hits the disk ``(center, radius)``.

    >>> points_at((0.1, 0.5), (0.3, 0.5), (0.8, 0.55), 0.1), points_at((0.3, 0.5), (0.1, 0.5), (0.8, 0.5), 0.1)
    (True, False)
    """
    along, perp = _ray_offsets(tail, tip, center)
    if along <= 0:
        return float(np.hypot(along, perp)) <= radius
    return perp <= radius


def _segments(scene: ArrowScene):
    tail, tip = np.asarray(scene.tail), np.asarray(scene.tip)
    d = tip - tail
    length = np.linalg.norm(d)
    back = -d / length * _HEAD * length
    segs = [(tail, tip)]
    for sign in (1, -1):
        c, s = np.cos(sign * _BARB_ANGLE), np.sin(sign * _BARB_ANGLE)
        segs.append((tip, tip + np.array([c * back[0] - s * back[1], s * back[0] + c * back[1]])))
    return segs


def _segment_distance(px, py, a, b):
    """Distance of points ``(px, py)`` (arrays) to segment ``a - b``."""
    ab = b - a
    t = np.clip(((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / (ab @ ab), 0.0, 1.0)
    return np.hypot(px - (a[0] + t * ab[0]), py - (a[1] + t * ab[1]))


def sample_scene(rng: np.random.Generator, label: int, max_tries: int = 10000) -> ArrowScene:
    """Rejection-sample a scene with the given label (see the module docstring for the distribution)."""
    for _ in range(max_tries):
        radius = rng.uniform(0.06, 0.12)
        length = rng.uniform(0.2, 0.35)
        theta = rng.uniform(0.0, 2 * np.pi)
        tail = rng.uniform(_MARGIN, 1 - _MARGIN, size=2)
        tip = tail + length * np.array([np.cos(theta), np.sin(theta)])
        if tip.min() < _MARGIN or tip.max() > 1 - _MARGIN:
            continue
        center = rng.uniform(_MARGIN + radius, 1 - _MARGIN - radius, size=2)
        along, perp = _ray_offsets(tail, tip, center)
        if label == 1 and not (along > 0 and perp <= 0.8 * radius):
            continue
        if label == 0 and not (along <= 0 or perp >= 1.25 * radius):
            continue
        scene = ArrowScene(tuple(tail), tuple(tip), tuple(center), float(radius),
                           tuple(rng.uniform(0.5, 1.0, size=3)), tuple(rng.uniform(0.5, 1.0, size=3)))
        # keep the circle well clear of the arrow (shaft and head)
        gap = min(float(_segment_distance(np.array(center[0]), np.array(center[1]), a, b)) for a, b in _segments(scene))
        if gap < radius + 2 * _THICKNESS:
            continue
        assert scene.label == label
        return scene
    raise RuntimeError("could not sample an arrow scene; this should not happen")  # pragma: no cover


def render(scene: ArrowScene, resolution: int) -> np.ndarray:
    """Anti-aliased rasterisation: ``float32 [3, resolution, resolution]`` in ``[0, 1]``, black background."""
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
    coords = (np.arange(resolution) + 0.5) / resolution
    px, py = np.meshgrid(coords, coords)  # [R, R]; rows are y
    dist = np.min([_segment_distance(px, py, a, b) for a, b in _segments(scene)], axis=0)
    arrow = np.clip((_THICKNESS / 2 - dist) * resolution + 0.5, 0.0, 1.0)
    circle = np.clip((scene.radius - np.hypot(px - scene.center[0], py - scene.center[1])) * resolution + 0.5, 0, 1)
    img = arrow[None] * np.asarray(scene.arrow_color)[:, None, None] \
        + circle[None] * np.asarray(scene.circle_color)[:, None, None]
    return np.clip(img, 0.0, 1.0).astype(np.float32)


class ArrowPointing(torch.utils.data.Dataset):
    """``num_samples`` scenes of ``seed`` rendered at ``resolution``; item ``i`` is ``(image [3, R, R], label)``.

    Use different seeds for training and evaluation sets; the same seed at another resolution gives the
    same scenes, larger.
    """

    def __init__(self, num_samples: int, resolution: int, seed: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples, self.resolution, self.seed = num_samples, resolution, seed

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, i: int) -> ArrowScene:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        return sample_scene(np.random.default_rng([self.seed, i]), label=i % 2)

    def __getitem__(self, i: int):
        scene = self.scene(i)
        return torch.from_numpy(render(scene, self.resolution)), scene.label


def make_arrow_dataset(num_samples: int, resolution: int, seed: int = 0, progress: bool = False):
    """Materialise :class:`ArrowPointing` as tensors ``(images [n, 3, R, R] float32, labels [n] long)``."""
    ds = ArrowPointing(num_samples, resolution, seed)
    it = range(num_samples)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"arrows {resolution}px seed {seed}", leave=False)
    images = torch.empty(num_samples, 3, resolution, resolution)
    labels = torch.empty(num_samples, dtype=torch.long)
    for i in it:
        images[i], labels[i] = ds[i]
    return images, labels


# ---------------------------------------------------------------------------------------------------------
# Vectorised generation (fast path). Same scene distribution and rasteriser as above, but all scenes of a
# seed are drawn from ONE generator in vectorised rejection rounds, so scene ``i`` differs from
# ``ArrowPointing(seed)[i]``. Scenes still do not depend on the resolution: the same seed gives the same
# scenes at 32 px and at 64 px. ``render`` / ``sample_scene`` above are the readable reference; the tests
# check that ``render_batch`` equals ``render`` scene by scene and that every label matches the geometry.
# ---------------------------------------------------------------------------------------------------------


def sample_scenes(num_samples: int, seed: int = 0) -> dict:
    """Draw ``num_samples`` scenes (label ``i % 2``) as arrays: ``tail, tip, center [n, 2]``, ``radius [n]``,
    ``arrow_color, circle_color [n, 3]``, ``label [n]``. Same acceptance rules as :func:`sample_scene`."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    rng = np.random.default_rng([seed, 0x5CE7E])
    labels = np.arange(num_samples) % 2
    out = {k: np.zeros((num_samples, d)) for k, d in
           (("tail", 2), ("tip", 2), ("center", 2), ("radius", 1), ("arrow_color", 3), ("circle_color", 3))}
    todo = {0: list(np.flatnonzero(labels == 0)), 1: list(np.flatnonzero(labels == 1))}
    while todo[0] or todo[1]:
        m = 4 * (len(todo[0]) + len(todo[1])) + 256
        radius = rng.uniform(0.06, 0.12, m)
        length = rng.uniform(0.2, 0.35, m)
        theta = rng.uniform(0.0, 2 * np.pi, m)
        tail = rng.uniform(_MARGIN, 1 - _MARGIN, (m, 2))
        d = np.stack([np.cos(theta), np.sin(theta)], 1)
        tip = tail + length[:, None] * d
        center = _MARGIN + radius[:, None] + rng.uniform(0, 1, (m, 2)) * (1 - 2 * _MARGIN - 2 * radius[:, None])
        acol, ccol = rng.uniform(0.5, 1.0, (m, 3)), rng.uniform(0.5, 1.0, (m, 3))
        ok = (tip.min(1) >= _MARGIN) & (tip.max(1) <= 1 - _MARGIN)
        w = center - tip
        along = (w * d).sum(1)
        perp = np.linalg.norm(w - along[:, None] * d, axis=1)
        pos = (along > 0) & (perp <= 0.8 * radius)
        neg = (along <= 0) | (perp >= 1.25 * radius)
        gap = np.min([_point_segment_distance(center, a, b) for a, b in _segments_batch(tail, tip)], axis=0)
        ok &= gap >= radius + 2 * _THICKNESS
        for lab, cond in ((1, pos), (0, neg)):
            idx = np.flatnonzero(ok & cond)[:len(todo[lab])]
            dst, todo[lab] = todo[lab][:len(idx)], todo[lab][len(idx):]
            for k, v in (("tail", tail), ("tip", tip), ("center", center), ("radius", radius[:, None]),
                         ("arrow_color", acol), ("circle_color", ccol)):
                out[k][dst] = v[idx]
    out["radius"] = out["radius"][:, 0]
    out["label"] = labels
    return out


def _segments_batch(tail: np.ndarray, tip: np.ndarray):
    """Shaft and two barbs for ``n`` arrows: three ``(a [n, 2], b [n, 2])`` pairs (as :func:`_segments`)."""
    back = -(tip - tail) * _HEAD
    segs = [(tail, tip)]
    for sign in (1, -1):
        c, s = np.cos(sign * _BARB_ANGLE), np.sin(sign * _BARB_ANGLE)
        segs.append((tip, tip + np.stack([c * back[:, 0] - s * back[:, 1], s * back[:, 0] + c * back[:, 1]], 1)))
    return segs


def _point_segment_distance(p, a, b):
    """Row-wise distance of points ``p [n, 2]`` to segments ``a - b`` (``[n, 2]`` each) -> ``[n]``."""
    ab = b - a
    t = np.clip(((p - a) * ab).sum(1) / (ab * ab).sum(1), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[:, None] * ab), axis=1)


def _segment_distance_batch(px, py, a, b):
    """``px, py [R, R]``, ``a, b [n, 2]`` -> distances ``[n, R, R]``."""
    ab = b - a
    ax, ay, bx, by = (t[:, None, None] for t in (a[:, 0], a[:, 1], ab[:, 0], ab[:, 1]))
    t = np.clip(((px - ax) * bx + (py - ay) * by) / (bx * bx + by * by), 0.0, 1.0)
    return np.hypot(px - (ax + t * bx), py - (ay + t * by))


def render_batch(scenes: dict, resolution: int, chunk: int = 256) -> np.ndarray:
    """Vectorised :func:`render` of :func:`sample_scenes` output: ``float32 [n, 3, R, R]``."""
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
    n = scenes["radius"].shape[0]
    coords = (np.arange(resolution) + 0.5) / resolution
    px, py = np.meshgrid(coords, coords)
    images = np.empty((n, 3, resolution, resolution), dtype=np.float32)
    for lo in range(0, n, chunk):
        sl = slice(lo, lo + chunk)
        tail, tip, center, radius = scenes["tail"][sl], scenes["tip"][sl], scenes["center"][sl], scenes["radius"][sl]
        dist = np.min([_segment_distance_batch(px, py, a, b) for a, b in _segments_batch(tail, tip)], axis=0)
        arrow = np.clip((_THICKNESS / 2 - dist) * resolution + 0.5, 0.0, 1.0)
        circle = np.clip((radius[:, None, None] - np.hypot(px - center[:, 0, None, None], py - center[:, 1, None, None]))
                         * resolution + 0.5, 0, 1)
        img = arrow[:, None] * scenes["arrow_color"][sl][:, :, None, None] \
            + circle[:, None] * scenes["circle_color"][sl][:, :, None, None]
        images[sl] = np.clip(img, 0.0, 1.0)
    return images


def make_arrow_dataset_fast(num_samples: int, resolution: int, seed: int = 0):
    """Vectorised :func:`make_arrow_dataset` (~100x faster; different scenes for a seed, same distribution):
    ``(images [n, 3, R, R] float32, labels [n] long)``; the same seed gives the same scenes at any resolution.

    >>> x, y = make_arrow_dataset_fast(6, 32, seed=0)
    >>> x.shape, y.tolist()
    (torch.Size([6, 3, 32, 32]), [0, 1, 0, 1, 0, 1])
    """
    scenes = sample_scenes(num_samples, seed)
    return torch.from_numpy(render_batch(scenes, resolution)), torch.from_numpy(scenes["label"]).long()
