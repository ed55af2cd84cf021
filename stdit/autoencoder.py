"""Using a trained autoencoder: load it (with its latent scaling), measure its latent statistics.

`stdit vae reconstruct --run RUN_DIR IN_VIDEO OUT_VIDEO`; `stdit vae stats --run RUN_DIR` (stdit/commands/vae.py).
Python: `vae = load_vae(RUN_DIR)`; `latents = vae.encode(video)`; `video = vae.decode(latents)` (videos
[B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of 8; latents scaled to unit variance).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from parallel import checkpoint
from stdit.config import vae_config_of
from stdit.models.vae import VideoVAE

STATS = "latent_stats.json"


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(where the weights are: checkpoint or export directory, where latent_stats.json is or None)."""
    path = Path(path)
    weights = path if (path / "ema.safetensors").is_file() else checkpoint.resolve(path)
    for d in (path, weights, weights.parent.parent):  # given dir, checkpoint dir, run dir of a checkpoint
        if (d / STATS).is_file():
            return weights, d / STATS
    return weights, None


def load_vae(path: str | Path, device: str | torch.device = "cpu", require_stats: bool = True) -> VideoVAE:
    """The EMA autoencoder of a VAE run directory, checkpoint or export, with its latent scaling, frozen."""
    weights, stats = _locate(Path(path))
    vae = VideoVAE(vae_config_of(weights))
    checkpoint.load_weights(vae, weights, "ema")
    if stats is not None:
        s = json.loads(stats.read_text())
        vae.latent_mean.copy_(torch.tensor(s["mean"]))
        vae.latent_std.copy_(torch.tensor(s["std"]))
    elif require_stats:
        raise FileNotFoundError(f"{path}: no {STATS} beside the autoencoder's weights; measure it with "
                                f"`stdit vae stats --run {path}` (training writes it at its end)")
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def compute_latent_stats(vae: VideoVAE, videos: list[torch.Tensor]) -> dict:
    """Per-channel mean and std of the posterior means of `videos` ([C, T, H, W] each), over every position."""
    device = next(vae.parameters()).device
    total, sq, count = 0.0, 0.0, 0
    for v in videos:
        mean = vae.posterior(v[None].to(device))[0].double()
        total = total + mean.sum(dim=(0, 2, 3, 4))
        sq = sq + (mean ** 2).sum(dim=(0, 2, 3, 4))
        count += mean[0, 0].numel()
    mu = total / count
    std = (sq / count - mu ** 2).clamp_min(1e-12).sqrt()
    return {"mean": mu.tolist(), "std": std.tolist(), "samples": len(videos)}
