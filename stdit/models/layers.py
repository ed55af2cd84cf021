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
        # statistics in fp32; the scaling in x's dtype (no fp32 copy of x under bf16)
        rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return x * rms.to(x.dtype) * self.weight.to(x.dtype)


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


def rope_cos_sin(coords: torch.Tensor, head_dim: int, theta: float,
                 dims: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, 3] integer (t, h, w) -> cos, sin of shape [L, 1, head_dim/2] (fp32); `dims` are the head dims rotated
    by each axis (default: rope_axis_dims)."""
    angles = []
    for axis, d in enumerate(dims or rope_axis_dims(head_dim)):
        inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float32, device=coords.device) / d)
        angles.append(coords[:, axis, None].float() * inv[None])
    ang = torch.cat(angles, dim=-1)[:, None, :]
    return ang.cos(), ang.sin()


def rope_tables(coords: torch.Tensor, head_dim: int, theta: float, per_attention: bool) -> dict:
    """RoPE angles of each self-attention kind: {"spatial" | "temporal" | "full": (cos, sin)}. Shared: every kind
    uses the one 3D table (head dims split over time, row, column). Per attention: each kind rotates all head dims
    by the axes it compares -- spatial by (row, column), temporal by time, full by all three -- since inside a frame
    the time rotation is the same for every token (and across frames the row/column one), a shared table spends
    those dims on nothing."""
    full = rope_cos_sin(coords, head_dim, theta)
    if not per_attention:
        return {"spatial": full, "temporal": full, "full": full}
    return {"spatial": rope_cos_sin(coords, head_dim, theta, (0, head_dim // 2, head_dim // 2)),
            "temporal": rope_cos_sin(coords, head_dim, theta, (head_dim, 0, 0)), "full": full}


def sincos_2d(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """[L, 3] integer (t, h, w) -> [L, dim] fixed sinusoidal embedding of (row, column), DiT's absolute 2D one
    (dim % 4 == 0)."""
    return torch.cat([sinusoidal(coords[:, 1], dim // 2), sinusoidal(coords[:, 2], dim // 2)], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [L, H, D] by per-token angles (rotate-half pairing: i with i + D/2)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # the rotation in x's dtype: bf16 under autocast
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
