"""Procedurally generated demo clips: one coloured shape moving over a coloured background, with a caption."""
from __future__ import annotations

import random

import torch

from stdit.data.sample import Sample

# RGB in [0, 1]; every pair is far enough apart that a caption's colour words are learnable from pixels
COLOURS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
    "orange": (1.0, 0.5, 0.0), "purple": (0.5, 0.0, 0.6),
}
SHAPES = ("square", "circle", "triangle", "diamond")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx), y grows downwards


def _shape_mask(shape: str, ys: torch.Tensor, xs: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, r: float):
    """Boolean [T, H, W] mask of `shape` with half-size r centred at (cy[t], cx[t]); ys [H], xs [W] pixel centres."""
    # separable offsets [T, H, 1] and [T, 1, W]: broadcasting them is much faster than expanded meshgrid views
    dy, dx = ys[None, :, None] - cy[:, None, None], xs[None, None, :] - cx[:, None, None]
    if shape == "square":
        return (dy.abs() <= r) & (dx.abs() <= r)
    if shape == "circle":
        return dy ** 2 + dx ** 2 <= r ** 2
    if shape == "diamond":
        return dy.abs() + dx.abs() <= r
    if shape == "triangle":  # apex up: between apex and base rows, within the sides that widen downwards
        return (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


class SyntheticClips:
    """A deterministic dataset of captioned clips; sample i depends only on (seed, i), never on access order."""

    def __init__(self, num_samples: int, resolutions, frame_counts, fps_choices, seed: int = 0,
                 round_trips: float = 0.0, round_trip_frames: int = 0):
        self.num_samples, self.seed, self.round_trips = int(num_samples), seed, float(round_trips)
        self.round_trip_frames = int(round_trip_frames)  # round trips only in clips of at most this many frames
        self.resolutions = [tuple(int(x) for x in r) for r in resolutions]
        self.frame_counts, self.fps_choices = [int(t) for t in frame_counts], [float(f) for f in fps_choices]
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if not self.resolutions or any(len(r) != 2 or min(r) < 1 for r in self.resolutions):
            raise ValueError(f"resolutions must be a non-empty list of positive (H, W), got {resolutions}")
        if not self.frame_counts or min(self.frame_counts) < 1:
            raise ValueError(f"frame_counts must be a non-empty list of positive ints, got {frame_counts}")
        if not self.fps_choices or min(self.fps_choices) <= 0:
            raise ValueError(f"fps_choices must be a non-empty list of positive numbers, got {fps_choices}")
        if not 0.0 <= self.round_trips <= 1.0:
            raise ValueError(f"round_trips must be in [0, 1], got {round_trips}")

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, i: int) -> random.Random:
        """The generator of sample i. Seeding with a string hashes it (SHA-512), stable across runs and machines."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} outside [0, {self.num_samples})")
        return random.Random(f"{self.seed}/{i}")

    def shape_of(self, i: int) -> tuple[int, int, int]:
        """(T, H, W) of sample i without rendering it: the first draws of __getitem__, in the same order."""
        rng = self._rng(i)
        h, w = rng.choice(self.resolutions)
        return rng.choice(self.frame_counts), h, w

    def __getitem__(self, i: int) -> Sample:
        """Render sample i: [3, T, H, W] float32 in [-1, 1] and a caption that names shape, colours and motion.
        A round trip (a `round_trips` share of the moving clips of at most `round_trip_frames` frames, 0: of all)
        goes out for the first half and back for the second."""
        rng = self._rng(i)
        h, w = rng.choice(self.resolutions)
        t = rng.choice(self.frame_counts)  # same first draws as shape_of
        fps = rng.choice(self.fps_choices)
        shape = rng.choice(SHAPES)
        bg, fg = rng.sample(sorted(COLOURS), 2)  # two distinct colours
        direction = rng.choice(sorted(DIRECTIONS))
        r = rng.uniform(0.15, 0.25) * min(h, w)
        fits = t > 1 and self.round_trips > 0 and (self.round_trip_frames == 0 or t <= self.round_trip_frames)
        back = fits and rng.random() < self.round_trips  # no draw without round trips
        vy, vx = DIRECTIONS[direction]
        # the centre sweeps 80% of the room it has along the motion axis, so the shape stays in view; a still
        # image puts it at a random point of that sweep
        span_y, span_x = (h - 2 * r) * 0.8, (w - 2 * r) * 0.8
        progress = torch.linspace(0, 1, t) if t > 1 else torch.full((1,), rng.random())
        if back:
            progress = 1 - (2 * progress - 1).abs()
        y0 = h / 2 + rng.uniform(-0.2, 0.2) * h * (vy == 0)  # random offset across the motion axis only
        x0 = w / 2 + rng.uniform(-0.2, 0.2) * w * (vx == 0)
        cy = y0 + vy * span_y * (progress - 0.5)
        cx = x0 + vx * span_x * (progress - 0.5)
        mask = _shape_mask(shape, torch.arange(h) + 0.5, torch.arange(w) + 0.5, cy, cx, r)  # [T, H, W]
        bg_c = torch.tensor(COLOURS[bg]) * 2 - 1
        fg_c = torch.tensor(COLOURS[fg]) * 2 - 1
        video = torch.where(mask[None], fg_c[:, None, None, None], bg_c[:, None, None, None])  # [3, T, H, W]
        motion = f" moving {direction}{' and back' if back else ''}" if t > 1 else ""
        article = "an" if fg[0] in "aeiou" else "a"
        caption = f"{article} {fg} {shape}{motion} on a {bg} background"
        return Sample(sample_id=i, video=video.float().contiguous(), caption=caption, fps=fps)
