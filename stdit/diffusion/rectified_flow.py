"""Rectified flow: x_t = (1 - t) x0 + t noise, the model predicts the velocity noise - x0; t=0 is clean.

Everything random about a sample (timestep, noise, caption drop) derives from (seed, step, sample id), never
from a process's RNG stream, so a step is the same whatever the parallel layout or micro-batch split.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from stdit.packing import PackedBatch


def sample_generator(seed: int, step: int, sample_id: int, stream: str = "") -> torch.Generator:
    """A CPU generator private to (seed, step, sample id, stream)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{sample_id}/{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def timestep_shift(num_tokens: int, cfg) -> float:
    """Larger (longer, higher-resolution) samples need more noise: shift = sqrt(tokens / base), clamped."""
    return min(max(math.sqrt(num_tokens / cfg.shift_base_tokens), 1.0), cfg.max_shift)


def shift_t(t: torch.Tensor | float, shift: float):
    """SD3 / Open-Sora time shift: t' = s t / (1 + (s - 1) t); s > 1 moves t toward noise."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class SampleDraw:
    """The random choices of one sample in one step."""

    t: float
    noise: torch.Tensor      # [N_i, C*pt*ph*pw] in the sample's token order
    drop_caption: bool


def draw(seed: int, step: int, sample_id: int, num_tokens: int, token_dim: int, cfg) -> SampleDraw:
    """Logit-normal timestep shifted by the sample's token count, Gaussian noise, caption dropout."""
    g = sample_generator(seed, step, sample_id)
    u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn((), generator=g)).item()
    t = float(shift_t(u, timestep_shift(num_tokens, cfg)))
    drop = bool(torch.rand((), generator=g).item() < cfg.caption_dropout)
    noise = torch.randn(num_tokens, token_dim, generator=g)
    return SampleDraw(t=t, noise=noise, drop_caption=drop)


def noisy_inputs(batch: PackedBatch, draws: list[SampleDraw]):
    """x_t tokens, per-frame timesteps [F] (0 for conditioning and padding frames) and the velocity target."""
    x0 = batch.tokens
    noise = torch.zeros_like(x0)
    for d, off in zip(draws, batch.offsets):
        noise[off:off + d.noise.shape[0]] = d.noise.to(x0.device, x0.dtype)
    t_sample = torch.tensor([d.t for d in draws] + [0.0], device=x0.device)  # slot B: padding
    t_frame = torch.where(batch.frame_cond, torch.zeros((), device=x0.device), t_sample[batch.frame_sample])
    t_tok = t_frame[batch.token_frame][:, None].to(x0.dtype)
    x_t = (1 - t_tok) * x0 + t_tok * noise
    return x_t, t_frame, noise - x0


def flow_loss_sum(pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum over loss tokens of the per-token mean squared velocity error (divide by the global count later)."""
    per_token = (pred.float() - target.float()).pow(2).mean(-1)
    return (per_token * loss_mask).sum()
