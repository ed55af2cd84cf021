"""Rectified flow: x_t = (1 - t) x0 + t noise, the model predicts the velocity noise - x0; t=0 is clean.

Everything random about a sample (timestep, noise, caption drop) derives from (seed, step, sample id), never
from a process's RNG stream, so a step is the same whatever the parallel layout or micro-batch split.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from stdit.packing import PackedBatch, to_device


def sample_seed(seed: int, step: int, sample_id: int, stream: str = "") -> int:
    """A 63-bit seed private to (seed, step, sample id, stream)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{sample_id}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_generator(seed: int, step: int, sample_id: int, stream: str = "") -> torch.Generator:
    """A CPU generator private to (seed, step, sample id, stream)."""
    return torch.Generator().manual_seed(sample_seed(seed, step, sample_id, stream))


def timestep_shift(num_tokens: int, cfg) -> float:
    """Larger (longer, higher-resolution) samples need more noise: shift = sqrt(tokens / base), clamped."""
    return min(max(math.sqrt(num_tokens / cfg.shift_base_tokens), 1.0), cfg.max_shift)


def shift_t(t: torch.Tensor | float, shift: float):
    """SD3 / Open-Sora time shift: t' = s t / (1 + (s - 1) t); s > 1 moves t toward noise."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class SampleDraw:
    """The random choices of one sample in one step. The noise is drawn where the batch is (`noise_of`), from
    `key` = (seed, step, sample id); a filler gives it as a tensor instead."""

    t: float
    drop_caption: bool
    key: tuple[int, int, int] | None = None
    shape: tuple[int, int] = (0, 0)  # [N_i, C*pt*ph*pw] in the sample's token order
    noise: torch.Tensor | None = None

    def __post_init__(self):
        if self.noise is not None:
            self.shape = tuple(self.noise.shape)


def draw(seed: int, step: int, sample_id: int, num_tokens: int, token_dim: int, cfg) -> SampleDraw:
    """Logit-normal timestep shifted by the sample's token count, caption dropout; the noise comes later."""
    g = sample_generator(seed, step, sample_id)
    u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn((), generator=g)).item()
    t = float(shift_t(u, timestep_shift(num_tokens, cfg)))
    drop = bool(torch.rand((), generator=g).item() < cfg.caption_dropout)
    return SampleDraw(t=t, drop_caption=drop, key=(seed, step, sample_id), shape=(num_tokens, token_dim))


def noise_of(d: SampleDraw, out: torch.Tensor | None = None) -> torch.Tensor:
    """The sample's Gaussian noise, written into `out` ([N_i, dim] on any device; default a new CPU tensor).
    On the CPU it continues draw()'s generator (the values the trainer has always drawn); on an accelerator a
    generator of that device, seeded from the same key, draws it there: no host copy, nothing to wait for."""
    out = torch.empty(d.shape) if out is None else out
    if d.noise is not None:
        return out.copy_(d.noise, non_blocking=True)
    if out.device.type == "cpu":
        g = sample_generator(*d.key)
        torch.randn((), generator=g), torch.rand((), generator=g)  # draw()'s timestep and caption dropout
        return out.copy_(torch.randn(d.shape, generator=g))
    g = torch.Generator(out.device).manual_seed(sample_seed(*d.key, "noise"))
    return out.normal_(generator=g)


def noisy_inputs(batch: PackedBatch, draws: list[SampleDraw]):
    """x_t tokens, per-frame timesteps [F] (0 for conditioning and padding frames) and the velocity target.
    Nothing here waits for the device: noise is drawn on it, the timesteps arrive by a non-blocking copy."""
    x0 = batch.tokens
    noise = torch.zeros_like(x0)
    for d, off in zip(draws, batch.offsets):
        noise_of(d, noise[off:off + d.shape[0]])
    t_sample = to_device(torch.tensor([d.t for d in draws] + [0.0]), x0.device)  # slot B: padding
    t_frame = torch.where(batch.frame_cond, torch.zeros((), device=x0.device), t_sample[batch.frame_sample])
    t_tok = t_frame[batch.token_frame][:, None].to(x0.dtype)
    x_t = (1 - t_tok) * x0 + t_tok * noise
    return x_t, t_frame, noise - x0


def velocity_of(out: torch.Tensor, x_t: torch.Tensor, t_tok: torch.Tensor, cfg) -> torch.Tensor:
    """The velocity (fp32) a network output stands for: itself, or with `diffusion.prediction=x0`
    (x_t - x0_hat) / t."""
    if cfg.prediction == "velocity":
        return out.float()
    return (x_t.float() - out.float()) / t_tok.float().clamp_min(cfg.x0_min_t)[:, None]


def prediction_target(batch: PackedBatch, velocity: torch.Tensor, t_frame: torch.Tensor, cfg):
    """The training target of the network's output and a per-token loss weight: the velocity with weight 1, or
    the clean tokens with weight 1 / t^2 (so the loss is still the velocity error of velocity_of's output)."""
    if cfg.prediction == "velocity":
        return velocity, None
    if cfg.prediction != "x0":
        raise ValueError(f"diffusion.prediction={cfg.prediction!r}; use velocity or x0")
    t_tok = t_frame[batch.token_frame].float().clamp_min(cfg.x0_min_t)
    return batch.tokens, t_tok.pow(-2)


def flow_loss_sum(pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum over loss tokens of the per-token mean squared velocity error (divide by the global count later)."""
    per_token = (pred.float() - target.float()).pow(2).mean(-1)
    return (per_token * loss_mask).sum()
