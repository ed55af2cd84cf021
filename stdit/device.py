"""Which torch device `run.device` / `--device` (auto | cpu | cuda) means here.

Its own module so that the commands and the autoencoder library pick a device without importing the trainer."""
from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """auto: cuda when one is visible, else cpu; an explicit cuda without a visible GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        from stdit.config import ConfigError
        raise ConfigError("run.device=cuda (or --device cuda) but no CUDA device is visible here "
                          "(torch.cuda.is_available() is false); use auto or cpu")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))
