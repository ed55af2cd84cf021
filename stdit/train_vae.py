"""Stage 1: training the spacetime autoencoder (`run.stage=vae`).

The same Trainer (engine, ZeRO, EMA, checkpoints, signals, metrics) with another model and step: every sample
of the global batch (images and videos of mixed shapes, one forward each) adds
    (L1(recon, x) + vae.kl_weight * KL + vae.perceptual_weight * perceptual) / batch_size
to the loss. The posterior noise comes from (seed, step, sample id), samples are dealt to data-parallel ranks
(padded with zero-weight repeats so every rank runs as many backwards), so the loss curve is the layout's
invariant as for the DiT. At the end the latents' per-channel mean and std are measured on training samples
and written to RUN_DIR/latent_stats.json, next to the weights the DiT will use.
"""
from __future__ import annotations

import json
import math
import time

import torch
import torch.distributed as dist

from parallel import checkpoint
from stdit.autoencoder import compute_latent_stats
from stdit.data.video import to_uint8, write_video
from stdit.diffusion.rectified_flow import sample_generator
from stdit.models.vae import VideoVAE, kl_divergence
from stdit.train import Trainer


class VAETrainer(Trainer):
    """Trainer for `run.stage=vae`: data parallel + ZeRO (tp, pp, cp are 1)."""

    def build_model(self) -> torch.nn.Module:
        self.text_encoder, self.vae = None, None
        self.perceptual = None
        if self.cfg.vae.perceptual_weight > 0:
            self.perceptual = torch.jit.load(self.cfg.vae.perceptual_net, map_location=self.device).eval()
            self.perceptual.requires_grad_(False)
        return VideoVAE(self.cfg.vae)

    def parallelize(self, model):
        return model

    def token_grid(self, shape) -> tuple[int, int, int]:
        return (1, 1, 1)  # the autoencoder takes whole samples, never packed micro-batches of a token budget

    def data_share(self) -> tuple[int, int]:
        return 0, 1  # every rank loads the step's samples and takes every dp-th (train_step)

    def sample_loss(self, model, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss of one sample [1, C, T, H, W] and its parts."""
        recon, mean, logvar = model(x, noise)
        l1 = (recon - x).abs().mean()
        kl = kl_divergence(mean, logvar).mean()
        loss = l1 + self.cfg.vae.kl_weight * kl
        parts = {"recon_l1": l1.item(), "kl": kl.item(),
                 "psnr": 10 * math.log10(4.0 / max(torch.mean((recon.detach().clamp(-1, 1) - x) ** 2).item(), 1e-12))}
        if self.perceptual is not None:
            frames = lambda v: v[0].transpose(0, 1)  # noqa: E731  [T, C, H, W]: the network sees frames
            perc = (self.perceptual(frames(recon)) - self.perceptual(frames(x))).pow(2).mean()
            loss = loss + self.cfg.vae.perceptual_weight * perc
            parts["perceptual"] = perc.item()
        return loss, parts

    def train_step(self) -> dict:
        cfg, start = self.cfg, time.perf_counter()
        self.model.train()
        samples = self.batches.samples(self.step)
        n, dp, rank = len(samples), self.shard.dp_size, self.shard.dp_rank
        mine = samples[rank::dp]
        weights = [1.0] * len(mine) + [0.0] * (math.ceil(n / dp) - len(mine))
        mine += [samples[0]] * (len(weights) - len(mine))  # ZeRO reduces per backward: equal counts everywhere
        model = self.engine if self.engine is not None else self.model
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for s, w in zip(mine, weights):
            x = s.video[None].to(self.device)
            latent = (cfg.vae.latent_channels, *self.model.latent_shape(*x.shape[2:]))
            noise = torch.randn(latent, generator=sample_generator(cfg.run.seed, self.step, s.sample_id, "vae"))
            loss, parts = self.sample_loss(model, x, noise[None].to(self.device))
            scaled = loss * (w / n) * dp  # the engine averages gradients over dp
            if self.engine is None:
                scaled.backward()
            else:
                self.engine.backward(scaled, scale_wrt_gas=False)
            for k, v in {"loss": loss.item(), **parts}.items():
                totals[k] = totals.get(k, 0.0) + w * v / n
        keys = sorted(totals)
        if self.distributed:  # each rank held part of the global mean
            t = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(t)
            totals = dict(zip(keys, t.tolist()))
        grad_norm, lr = self.optimizer_step()
        self.finish_step()
        pixels = sum(s.video[0].numel() for s in samples)
        self.tokens_seen += pixels
        dt = time.perf_counter() - start
        return {"step": self.step, **totals, "grad_norm": grad_norm, "lr": lr, "tokens": pixels,
                "tokens_seen": self.tokens_seen, "pixels_per_s": pixels / dt, "tokens_per_s": pixels / dt,
                "step_time_s": dt, "padding_fraction": 0.0, "layout": self.dims.describe()}

    def log_samples(self, saved) -> None:
        """Latent statistics and a few reconstructions (input | output side by side) with the EMA weights."""
        if not self.is_main:
            return
        ema = VideoVAE(self.cfg.vae)
        checkpoint.load_weights(ema, saved, "ema")
        ema = ema.to(self.device).eval()
        dataset = self.batches.dataset
        picks = [dataset[i] for i in range(min(self.cfg.vae.stats_samples, len(dataset)))]
        stats = compute_latent_stats(ema, [s.video for s in picks])
        (self.run_dir / "latent_stats.json").write_text(json.dumps(stats, indent=1))
        for i, s in enumerate(picks[:self.cfg.run.samples_at_end]):
            with torch.no_grad():
                recon = ema(s.video[None].to(self.device))[0][0].cpu()
            frames = to_uint8(torch.cat([s.video, recon], dim=3))
            self.logger.video(f"reconstructions/{i}", frames, self.step)
            write_video(self.run_dir / "samples" / f"recon_step{self.step:08d}_{i}.mp4", frames, fps=s.fps, upscale=4)
