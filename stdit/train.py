"""The Trainer: build, restore, then per step: global batch -> micro-batches -> forward/backward -> clip -> step
-> EMA -> log -> maybe checkpoint.

`python -m stdit.train RECIPE [key=value ...]` is the same as `stdit train RECIPE [key=value ...]`.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from parallel import checkpoint
from stdit.config import Config, load_config, to_yaml
from stdit.data.loader import GlobalBatches, build_dataset
from stdit.data.video import to_uint8, write_video
from stdit.diffusion.rectified_flow import draw, flow_loss_sum, noisy_inputs
from stdit.diffusion.sampler import sample_videos
from stdit.metrics import MetricsLogger
from stdit.models.stdit import build_model
from stdit.models.text import TextEncoder
from stdit.ops import resolve_backend
from stdit.packing import pack, plan_microbatches, token_counts


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible; use run.device=auto or cpu")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def forward_backward(model, text_encoder, samples, step: int, cfg: Config, device: torch.device) -> dict:
    """Loss and accumulated gradients of one global batch, split into packed micro-batches of the token budget.

    The loss is the mean over all loss tokens of the global batch: each micro-batch adds its sum divided by the
    global count, so the split changes neither the loss nor the gradients.
    """
    patch, budget = cfg.model.patch_size, cfg.data.token_budget
    counts = token_counts([s.video.shape[1:] for s in samples], patch)
    token_dim = samples[0].video.shape[0] * math.prod(patch)
    draws = [draw(cfg.run.seed, step, s.sample_id, n, token_dim, cfg.diffusion) for s, n in zip(samples, counts)]
    texts = text_encoder.encode(["" if d.drop_caption else s.caption for s, d in zip(samples, draws)])
    plans = plan_microbatches(counts, budget)
    batches = [pack([samples[i].video for i in idx], [texts[i] for i in idx], [samples[i].fps for i in idx],
                    patch, budget, sample_ids=[samples[i].sample_id for i in idx]) for idx in plans]
    total_loss_tokens = sum(int(b.loss_mask.sum()) for b in batches)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss = 0.0
    for idx, batch in zip(plans, batches):
        batch = batch.to(device)
        x_t, t_frame, target = noisy_inputs(batch, [draws[i] for i in idx])
        with autocast:
            pred = model(x_t, t_frame, batch)
        mb_loss = flow_loss_sum(pred, target, batch.loss_mask) / total_loss_tokens
        mb_loss.backward()
        loss += mb_loss.item()
    real = sum(counts)
    return {"loss": loss, "tokens": real, "micro_batches": len(batches),
            "padding_fraction": 1.0 - real / (len(batches) * budget)}


def lr_lambda(cfg: Config):
    """Linear warmup, then cosine decay to lr * min_lr_ratio at run.steps."""
    warm, total, floor = cfg.optim.warmup_steps, cfg.run.steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min((step - warm) / max(total - warm, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


class Trainer:
    """Single-process trainer over the packed STDiT."""

    def __init__(self, cfg: Config):
        for key in ("tp", "pp", "cp"):
            if getattr(cfg.parallel, key) != 1:
                raise NotImplementedError(f"parallel.{key}={getattr(cfg.parallel, key)} is not supported by the "
                                          f"single-process trainer yet; set parallel.{key}=1")
        self.cfg = cfg
        self.device = resolve_device(cfg.run.device)
        resolve_backend(cfg.model.attention_backend, self.device)  # fail now, not in the first forward
        self.run_dir = Path(cfg.run.dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_yaml = to_yaml(cfg)
        (self.run_dir / "config.yaml").write_text(self.config_yaml)

        torch.manual_seed(cfg.run.seed)
        self.text_encoder = TextEncoder.from_config(cfg.text).to(self.device)
        self.model = build_model(cfg.model, self.text_encoder.dim).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.batches = GlobalBatches(build_dataset(cfg.data, cfg.run.seed), cfg.data.batch_size, cfg.run.seed)
        self.logger = MetricsLogger(self.run_dir)
        self.step, self.tokens_seen = 0, 0

    def restore(self) -> None:
        mode = self.cfg.checkpoint.resume
        path = None if mode == "never" else (checkpoint.latest(self.run_dir) if mode == "auto" else Path(mode))
        if path is None:
            return
        state = checkpoint.load(path, self.model, self.ema, self.optimizer, self.scheduler)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        print(f"resumed from {path} at step {self.step}", file=sys.stderr)

    def save(self) -> Path:
        return checkpoint.save(self.run_dir, self.step, self.model, self.ema, self.optimizer, self.scheduler,
                               {"tokens_seen": self.tokens_seen}, self.config_yaml, self.cfg.checkpoint.keep)

    def train_step(self) -> dict:
        cfg, start = self.cfg, time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        stats = forward_backward(self.model, self.text_encoder, self.batches.samples(self.step), self.step, cfg,
                                 self.device)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        update_ema(self.ema, self.model, min(cfg.optim.ema_decay, (1 + self.step) / (10 + self.step)))
        self.step += 1
        self.tokens_seen += stats["tokens"]
        dt = time.perf_counter() - start
        return {"step": self.step, "loss": stats["loss"], "grad_norm": grad_norm, "lr": lr, "tokens": stats["tokens"],
                "tokens_seen": self.tokens_seen, "tokens_per_s": stats["tokens"] / dt, "step_time_s": dt,
                "padding_fraction": stats["padding_fraction"], "micro_batches": stats["micro_batches"]}

    def train(self) -> list[dict]:
        cfg = self.cfg
        self.restore()
        history = []
        bar = tqdm(total=cfg.run.steps, initial=self.step, desc="train", mininterval=2.0, dynamic_ncols=True)
        while self.step < cfg.run.steps:
            metrics = self.train_step()
            history.append(metrics)
            if self.step % cfg.run.log_every == 0 or self.step == cfg.run.steps:
                self.logger.log(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update(1)
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.run.steps:
                self.save()
        bar.close()
        self.save()
        self.log_samples()
        self.logger.close()
        return history

    def log_samples(self) -> None:
        """Generate a few videos with the EMA weights into RUN_DIR/samples and TensorBoard."""
        n = self.cfg.run.samples_at_end
        if n <= 0:
            return
        dataset = self.batches.dataset
        picks = [dataset[i] for i in range(min(n, len(dataset)))]
        videos = sample_videos(self.ema, self.text_encoder, [s.caption for s in picks],
                               [tuple(s.video.shape[1:]) for s in picks], self.cfg.model, self.cfg.diffusion,
                               seed=self.cfg.run.seed, fps=picks[0].fps)
        for i, (s, v) in enumerate(zip(picks, videos)):
            frames = to_uint8(v)
            self.logger.video(f"samples/{i}: {s.caption}", frames, self.step)
            write_video(self.run_dir / "samples" / f"step{self.step:08d}_{i}.mp4", frames, fps=s.fps, upscale=4)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: stdit train RECIPE [key=value ...]   (or python -m stdit.train RECIPE [key=value ...])")
        raise SystemExit(0 if argv else 2)
    cfg = load_config(argv[0], argv[1:])
    history = Trainer(cfg).train()
    if history:
        first, last = history[0], history[-1]
        print(f"done: step {last['step']}, loss {first['loss']:.4f} -> {last['loss']:.4f}; run dir {cfg.run.dir}")


if __name__ == "__main__":
    from stdit.cli import main as cli_main  # same error handling as `stdit train`
    cli_main(["train"] + sys.argv[1:])
