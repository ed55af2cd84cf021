"""Procedurally generated demo clips: one coloured shape moving over a coloured background, with a caption."""
from __future__ import annotations

import random

import torch

from stdit.data.sample import Sample

COLOURS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
    "orange": (1.0, 0.5, 0.0), "purple": (0.5, 0.0, 0.6),
}
SHAPES = ("square", "circle", "triangle", "diamond")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def _shape_mask(shape: str, yy: torch.Tensor, xx: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, r: float):
    """Boolean [T, H, W] mask of `shape` of half-size r centred at (cy[t], cx[t])."""
    dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
    if shape == "square":
        return (dy.abs() <= r) & (dx.abs() <= r)
    if shape == "circle":
        return dy ** 2 + dx ** 2 <= r ** 2
    if shape == "diamond":
        return dy.abs() + dx.abs() <= r
    # triangle, apex up: inside when below the apex and within the widening sides
    return (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)


class SyntheticClips:
    """A deterministic dataset of captioned clips; sample i depends only on (seed, i)."""

    def __init__(self, num_samples: int, resolutions, frame_counts, fps_choices, seed: int = 0):
        self.num_samples, self.seed = num_samples, seed
        self.resolutions = [tuple(r) for r in resolutions]
        self.frame_counts, self.fps_choices = list(frame_counts), list(fps_choices)

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, i: int) -> random.Random:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} outside [0, {self.num_samples})")
        return random.Random(f"{self.seed}/{i}")

    def shape_of(self, i: int) -> tuple[int, int, int]:
        """(T, H, W) of sample i without rendering it."""
        rng = self._rng(i)
        h, w = rng.choice(self.resolutions)
        return rng.choice(self.frame_counts), h, w

    def __getitem__(self, i: int) -> Sample:
        rng = self._rng(i)
        h, w = rng.choice(self.resolutions)
        t = rng.choice(self.frame_counts)  # same first draws as shape_of
        fps = rng.choice(self.fps_choices)
        shape = rng.choice(SHAPES)
        bg, fg = rng.sample(sorted(COLOURS), 2)
        direction = rng.choice(sorted(DIRECTIONS))
        r = rng.uniform(0.15, 0.25) * min(h, w)
        vy, vx = DIRECTIONS[direction]
        # travel along the direction across the middle part of the frame, start opposite to where it goes
        span_y, span_x = (h - 2 * r) * 0.8, (w - 2 * r) * 0.8
        progress = torch.linspace(0, 1, t) if t > 1 else torch.full((1,), rng.random())
        y0 = h / 2 + rng.uniform(-0.2, 0.2) * h * (vy == 0)
        x0 = w / 2 + rng.uniform(-0.2, 0.2) * w * (vx == 0)
        cy = y0 + vy * span_y * (progress - 0.5)
        cx = x0 + vx * span_x * (progress - 0.5)
        yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        mask = _shape_mask(shape, yy, xx, cy, cx, r)                       # [T, H, W]
        bg_c, fg_c = torch.tensor(COLOURS[bg]), torch.tensor(COLOURS[fg])
        video = torch.where(mask[None], fg_c[:, None, None, None], bg_c[:, None, None, None])
        video = video * 2 - 1                                              # [3, T, H, W] in [-1, 1]
        motion = f" moving {direction}" if t > 1 else ""
        article = "an" if fg[0] in "aeiou" else "a"
        caption = f"{article} {fg} {shape}{motion} on a {bg} background"
        return Sample(sample_id=i, video=video.float().contiguous(), caption=caption, fps=float(fps))
