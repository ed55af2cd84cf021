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

import torch

from parallel.checkpoint import load_weights
from stdit.autoencoder import compute_latent_stats
from stdit.config import ConfigError
from stdit.data.video import to_uint8, write_video
from stdit.diffusion.rectified_flow import sample_generator
from stdit.models.vae import VideoVAE, kl_divergence
from stdit.train import Trainer


class VAETrainer(Trainer):
    """Trainer for `run.stage=vae`: data parallel + ZeRO (tp, pp, cp are 1); one micro-batch per sample."""

    def build_model(self) -> torch.nn.Module:
        self.text_encoder, self.vae = None, None
        self.perceptual = None
        if self.cfg.vae.perceptual_weight > 0:
            if not self.cfg.vae.trust_perceptual_net:  # validate() says so too; never load it without the opt-in
                raise ConfigError(f"vae.perceptual_net: {self.cfg.vae.perceptual_net} is a TorchScript program; "
                                  "set vae.trust_perceptual_net=true only if you trust it")
            self.perceptual = torch.jit.load(self.cfg.vae.perceptual_net, map_location=self.device).eval()
            self.perceptual.requires_grad_(False)
        return VideoVAE(self.cfg.vae)

    def parallelize(self, model):
        return model

    def architecture_keys(self) -> list[str]:
        return [f"vae.{k}" for k in ("in_channels", "latent_channels", "base_channels", "channel_mult",
                                     "temporal_down", "num_res_blocks", "mid_attention", "norm_groups")]

    def plain_name(self, name: str) -> str:
        return name

    def token_grid(self, shape) -> tuple[int, int, int]:
        return (1, 1, 1)  # the autoencoder takes whole samples, never packed micro-batches of a token budget

    def data_share(self) -> tuple[int, int]:
        return 0, 1  # every rank loads the step's samples and takes every dp-th (micro_batches)

    def micro_batches(self, step: int) -> tuple[list, dict]:
        """Every dp-th sample of the step, as ((video, posterior noise), (video, weight)); ranks with fewer
        samples repeat one with weight 0 (ZeRO reduces per backward: equal counts everywhere)."""
        cfg = self.cfg
        samples = self.count_bad(self.batches.samples(step))
        n, dp, rank = len(samples), self.dims.dp, self.dims.rank("dp")
        self.step_bad *= rank == 0  # every rank loads the whole step: one counts
        mine = samples[rank::dp]
        weights = [1.0] * len(mine) + [0.0] * (-(-n // dp) - len(mine))
        mine += [samples[0]] * (len(weights) - len(mine))
        items = []
        for s, w in zip(mine, weights):
            x = s.video[None].to(self.device)
            latent = (cfg.vae.latent_channels, *self.engine.module.latent_shape(*x.shape[2:]))
            noise = torch.randn(latent, generator=sample_generator(cfg.run.seed, step, s.sample_id, "vae"))
            items.append(((x, noise[None].to(self.device)), (x, w / n)))
        return items, {"tokens": sum(s.video[0].numel() for s in samples)}

    def loss(self, out, labels) -> torch.Tensor:
        """(L1 + vae.kl_weight * KL [+ vae.perceptual_weight * perceptual]) of one sample, times its weight;
        the parts are summed into the step's metrics."""
        (recon, mean, logvar), (x, weight) = out, labels
        l1 = (recon - x).abs().mean()
        kl = kl_divergence(mean, logvar).mean()
        loss = l1 + self.cfg.vae.kl_weight * kl
        mse = torch.mean((recon.detach().clamp(-1, 1) - x) ** 2).double()
        parts = {"recon_l1": l1, "kl": kl, "psnr": 10 * torch.log10(4.0 / mse.clamp_min(1e-12))}
        if self.perceptual is not None:
            frames = lambda v: v[0].transpose(0, 1)  # noqa: E731  [T, C, H, W]: the network sees frames
            perc = (self.perceptual(frames(recon)) - self.perceptual(frames(x))).pow(2).mean()
            loss = loss + self.cfg.vae.perceptual_weight * perc
            parts["perceptual"] = perc
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + weight * v.detach().double()
        return loss * weight

    def metrics(self, totals: dict, stats: dict, grad_norm: float, lr: float, dt: float) -> dict:
        totals.pop("model_flops", None)
        pixels = stats["tokens"]
        self.tokens_seen += pixels
        return {"step": self.step, **totals, "grad_norm": grad_norm, "lr": lr, "tokens": pixels,
                "tokens_seen": self.tokens_seen, "pixels_per_s": pixels / dt, "tokens_per_s": pixels / dt,
                "step_time_s": dt, "padding_fraction": 0.0, "layout": self.dims.describe()}

    def log_samples(self, saved) -> None:
        """Latent statistics and a few reconstructions (input | output side by side) with the EMA weights."""
        ema = VideoVAE(self.cfg.vae)
        load_weights(ema, saved, "ema")
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
