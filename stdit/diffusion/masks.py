"""Conditioning masks: which token frames of a sample are given clean (timestep 0, out of the loss).

One strategy per sample is drawn from the configured mix (data.masks) with a generator private to (seed, step,
sample id), like the timestep and the noise, so it is the same on every layout:
  none           text-to-video, every frame is generated
  first_frame    image-to-video: the first frame is given
  first_frames   video continuation: the first k frames, k in [1, T/2]
  last_frames    backward extension: the last k frames, k in [1, T/2]
  first_last     looping / connecting clips: the first and the last frame
  random_frames  k frames at random positions, k in [1, T/2] (interpolation, infilling)
A sample of one token frame (an image) is never conditioned: nothing would be left to learn from it.
"""
from __future__ import annotations

import torch

from stdit.diffusion.rectified_flow import sample_generator

STRATEGIES = ("none", "first_frame", "first_frames", "last_frames", "first_last", "random_frames")


def draw_mask(mix: dict, seed: int, step: int, sample_id: int, frames: int) -> tuple[str, torch.Tensor]:
    """(strategy, bool [frames]): True where the token frame is conditioning."""
    cond = torch.zeros(frames, dtype=torch.bool)
    names = [k for k in STRATEGIES if mix.get(k, 0) > 0]
    g = sample_generator(seed, step, sample_id, "mask")
    weights = torch.tensor([float(mix[k]) for k in names], dtype=torch.float64)
    name = names[int(torch.multinomial(weights, 1, generator=g))]
    if name == "first_last" and frames < 3:  # both ends of a 2-frame clip would leave nothing to learn
        name = "first_frame"
    if frames < 2 or name == "none":
        return "none", cond
    k = int(torch.randint(1, max(1, frames // 2) + 1, (), generator=g))
    if name == "first_frame":
        cond[0] = True
    elif name == "first_frames":
        cond[:k] = True
    elif name == "last_frames":
        cond[frames - k:] = True
    elif name == "first_last":
        cond[0] = cond[-1] = True
    else:
        cond[torch.randperm(frames, generator=g)[:k]] = True
    return name, cond
