"""One training example as the data path hands it to packing."""
from dataclasses import dataclass

import torch


@dataclass
class Sample:
    """A (video, caption) pair. `video` is [C, T, H, W]: pixels in [-1, 1] (an image is T=1), or, when `latent`,
    the autoencoder's scaled latents. `text`, when set, is the caption's cached unpadded embedding [n, D]."""

    sample_id: int
    video: torch.Tensor
    caption: str
    fps: float = 8.0
    text: torch.Tensor | None = None
    latent: bool = False
