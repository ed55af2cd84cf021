"""Building blocks of STDiT: norms, MLP, embedders, 3D RoPE, adaLN helpers."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class RMSNorm(nn.Module):
    """RMS norm over the last dim (used for QK-norm, per head)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear. `fc1`/`fc2` are the tensor-parallel column/row pair."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, out_dim or in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------------------------------------
# Embedding layers for timesteps, fps and captions
# ----------------------------------------------------------------------------------------------------------


def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N] scalars -> [N, dim] sinusoidal features (DiT/ADM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ScalarEmbedder(nn.Module):
    """Embeds scalars (timestep in [0, 1] scaled to [0, 1000], or fps) into vectors: sinusoid -> MLP."""

    def __init__(self, hidden_size: int, scale: float = 1.0, freq_dim: int = 256):
        super().__init__()
        self.scale, self.freq_dim = scale, freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal(x * self.scale, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


# ----------------------------------------------------------------------------------------------------------
# 3D rotary position embedding
# ----------------------------------------------------------------------------------------------------------


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split head_dim into even (time, row, column) parts; time takes the remainder."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_cos_sin(coords: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, 3] integer (t, h, w) -> cos, sin of shape [L, 1, head_dim/2] (fp32)."""
    angles = []
    for axis, d in enumerate(rope_axis_dims(head_dim)):
        inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float32, device=coords.device) / d)
        angles.append(coords[:, axis, None].float() * inv[None])
    ang = torch.cat(angles, dim=-1)[:, None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [L, H, D] by per-token angles (rotate-half pairing: i with i + D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
