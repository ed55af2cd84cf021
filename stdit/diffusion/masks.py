"""Conditioning masks: which token frames of a sample are given clean (timestep 0, out of the loss).

One strategy per sample is drawn from the configured mix (data.masks) with a generator private to (seed, step,
sample id), like the timestep and the noise, so it is the same on every layout:
  none           text-to-video, every frame is generated
  first_frame    image-to-video: the first frame is given
  first_frames   video continuation: the first k frames, k in [1, T/2]
  last_frames    backward extension: the last k frames, k in [1, T/2]
  first_last     looping: the first and the last frame
  ends           connecting two clips: the first k and the last j frames, k + j in [2, T/2 + 1]
  random_frames  k frames at random positions, k in [1, T/2] (keyframes, interpolation, infilling)
A sample of one token frame (an image) is never conditioned: nothing would be left to learn from it.

Long videos (FDM): a clip longer than data.window token frames trains on data.window of its frames, drawn by
`draw_frames` from a span of at most data.max_span frames, each keeping its time index; the masks above then pick
which of them are given. So the model learns to generate frames at any gaps from frames at any gaps, which is
what the long-video schedules of stdit/longvideo.py ask of it.
"""
from __future__ import annotations

import torch

from stdit.diffusion.rectified_flow import sample_generator

STRATEGIES = ("none", "first_frame", "first_frames", "last_frames", "first_last", "ends", "random_frames")


def draw_mask(mix: dict, seed: int, step: int, sample_id: int, frames: int) -> tuple[str, torch.Tensor]:
    """(strategy, bool [frames]): True where the token frame is conditioning."""
    cond = torch.zeros(frames, dtype=torch.bool)
    names = [k for k in STRATEGIES if mix.get(k, 0) > 0]
    g = sample_generator(seed, step, sample_id, "mask")
    weights = torch.tensor([float(mix[k]) for k in names], dtype=torch.float64)
    name = names[int(torch.multinomial(weights, 1, generator=g))]
    if name in ("first_last", "ends") and frames < 3:  # both ends of a 2-frame clip would leave nothing to learn
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
    elif name == "ends":
        first = int(torch.randint(1, max(1, k - 1) + 1, (), generator=g))
        cond[:first] = True
        cond[frames - max(1, k + 1 - first):] = True
    else:
        cond[torch.randperm(frames, generator=g)[:k]] = True
    return name, cond


def draw_frames(seed: int, step: int, sample_id: int, frames: int, window: int, max_span: int = 0) -> torch.Tensor:
    """Time indices (sorted) of the `window` frames a clip of `frames` token frames trains on in this step: a span
    of s frames, s uniform in [window, min(frames, max_span)] (max_span 0: frames), at a uniform start, its first
    and last frame and window - 2 others from inside it. A clip no longer than the window keeps every frame."""
    if frames <= window:
        return torch.arange(frames)
    g = sample_generator(seed, step, sample_id, "frames")
    longest = min(frames, max_span) if max_span > 0 else frames
    span = int(torch.randint(window, max(window, longest) + 1, (), generator=g))
    start = int(torch.randint(0, frames - span + 1, (), generator=g))
    inside = torch.randperm(span - 2, generator=g)[:window - 2] + 1
    return (start + torch.cat([torch.tensor([0, span - 1]), inside])).sort().values
