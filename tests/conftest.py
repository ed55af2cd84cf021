import pytest
import torch

from stdit.config import ModelConfig


def tiny_model_cfg(**kw) -> ModelConfig:
    base = dict(in_channels=3, patch_size=[1, 2, 2], hidden_size=32, depth=2, num_heads=4, attention_backend="reference")
    base.update(kw)
    return ModelConfig(**base)


def randomize(model: torch.nn.Module, std: float = 0.15, seed: int = 0) -> torch.nn.Module:
    """Replace the zero init (which makes every output 0) by random weights, so comparisons can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)
    return model


def rand_videos(shapes, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(channels, *s, generator=g) for s in shapes]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
