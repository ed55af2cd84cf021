"""One training example as the data path hands it to packing."""
from dataclasses import dataclass

import torch


@dataclass
class Sample:
    """A (video, caption) pair. `video` is [C, T, H, W] float32 in [-1, 1]; an image is T=1."""

    sample_id: int
    video: torch.Tensor
    caption: str
    fps: float = 8.0
