"""The Trainer: build, restore, then per step: global batch -> micro-batches -> forward/backward -> clip -> step
-> EMA -> log -> maybe checkpoint.

It drives components and branches on none of them: an engine (parallel/engine.py: plain torch on one process,
DeepSpeed with ZeRO / pipeline otherwise), a Checkpointer (parallel/checkpointer.py), the data sampler and the
step builder (stdit/data/). A model-specific trainer (the autoencoder's, stdit/train_vae.py) overrides what
differs: build_model, parallelize, micro_batches, loss, metrics, log_samples.

`python -m stdit.train RECIPE [key=value ...]` is the same as `stdit train RECIPE [key=value ...]`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from parallel.checkpoint import has_full, latest, load_weights
from parallel.checkpointer import Checkpointer
from parallel.dims import launch_env
from parallel.engine import build_engine
from stdit.autoencoder import load_vae
from stdit.config import Config, ConfigError, TrainingError, to_yaml, validate_layout
from stdit.data.cache import check_fingerprints
from stdit.data.loader import StepSampler, build_dataset
from stdit.data.steps import StepBuilder
from stdit.data.video import to_uint8, write_video
from stdit.device import resolve_device
from stdit.diffusion.rectified_flow import flow_loss_sum, noisy_inputs, prediction_target
from stdit.diffusion.sampler import sample_videos
from stdit.flops import peak_flops
from stdit.grid import latent_shape, token_grid
from stdit.init_from import find_source, init_weights
from stdit.metrics import MetricsLogger
from stdit.models.stdit import build_model
from stdit.models.text import TextEncoder
from stdit.ops import resolve_backend
from stdit.packing import to_device
from stdit.parallelize import apply_compile, cp_cut, cp_mode, cp_padding, model_inputs, parallelize_stdit, plain_name


def lr_lambda(cfg: Config):
    """Linear warmup, then cosine decay to lr * min_lr_ratio at run.steps."""
    warm, total, floor = cfg.optim.warmup_steps, cfg.run.steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min((step - warm) / max(total - warm, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def build_optimizer(model: torch.nn.Module, o) -> torch.optim.AdamW:
    """AdamW from `optim.*`: one fused kernel over all parameters on CUDA, the multi-tensor (foreach) one
    elsewhere; never a Python loop over parameters."""
    cuda = all(p.device.type == "cuda" for p in model.parameters())
    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay, **({"fused": True} if cuda else {"foreach": True}))


class Trainer:
    """Build, restore, loop: the DiT (stage 2) on any layout."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        rank, world, _ = launch_env()
        self.dims = validate_layout(cfg, world)  # before any process-group work
        self.is_main = rank == 0
        self.device = resolve_device(cfg.run.device)
        for backend in (cfg.model.attention_backend, cfg.model.temporal_attention_backend):
            resolve_backend(backend, self.device)  # fail now, not in the first forward
        self.run_dir = Path(cfg.run.dir)
        config_yaml = to_yaml(cfg)
        self.checkpointer = Checkpointer(self.run_dir, self.dims, cfg.checkpoint.keep, config_yaml,
                                         self.architecture_keys(), cfg.checkpoint.full_copy)
        resume = self.checkpointer.find(cfg.checkpoint.resume)  # checked before any process-group work
        init = self.init_source(resume, rank, world)  # checkpoint.init_from, when there is nothing to resume
        self.dims.init(cfg.parallel.timeout_s)  # process groups where the layout has them
        resume = self.checkpointer.agree()  # every rank hashed its share of the checkpoint's files
        torch.manual_seed(cfg.run.seed)  # every rank builds the same full model, then keeps its shard
        model = self.build_model().to(self.device)
        self.checkpointer.prepare(resume, model, {k: list(v.shape) for k, v in model.named_parameters()})
        if init is not None and resume is None:  # into the plain model, before it is sharded: any layout
            line = init_weights(model, init, cfg.checkpoint.init_weights)
            if self.is_main:
                print(line, file=sys.stderr)
        self.run_dir.mkdir(parents=True, exist_ok=True)  # only once the config and any checkpoint fit
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(config_yaml)
        if self.dims.distributed:
            model = self.parallelize(model)
        if cfg.model.compile:
            apply_compile(model)
        o = cfg.optim
        optimizer = build_optimizer(model, o)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        cuda = self.device.type == "cuda"
        bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and cuda)
        autocast = (functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16) if bf16
                    else contextlib.nullcontext)
        self.engine = build_engine(model, optimizer, scheduler, self.dims, o.grad_clip, bf16=bf16 and cuda,
                                   autocast=autocast)
        names = [self.plain_name(n) for n, _ in self.engine.module.named_parameters()]
        self.checkpointer.attach(self.engine, names)
        self.batches = StepSampler(build_dataset(cfg.data, cfg.run.seed), cfg.data, cfg.run.seed, self.token_grid,
                                   cfg.data.num_workers, self.data_share())
        if cfg.data.cached:
            self.check_cache(self.batches.dataset)
        self.bad_samples, self.step_bad = 0, 0  # unreadable samples substituted: in all; this rank's, this step
        self.check_bad_data(0)
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main)
        self.step, self.tokens_seen, self.stop_signal = 0, 0, None
        self.skipped_steps, self.bad_streak = 0, 0  # non-finite steps: in all, and in a row now

    # ------------------------------------------------------------------------------------------------------
    # What the model is (overridden by the autoencoder's trainer)
    # ------------------------------------------------------------------------------------------------------

    def build_model(self) -> torch.nn.Module:
        """The plain, full model (and what it needs: the text encoder, a frozen autoencoder with model.vae). With
        cached latents neither encoder takes accelerator memory: the text encoder stays on the CPU (it encodes only
        the empty caption of dropped captions, once, and the end-of-run prompts), the autoencoder is loaded at the
        end to decode the samples."""
        cached = self.cfg.data.cached
        self.text_encoder = TextEncoder.from_config(self.cfg.text).to("cpu" if cached else self.device)
        self.vae = load_vae(self.cfg.model.vae, self.device) if self.cfg.model.vae is not None and not cached \
            else None
        self.steps = StepBuilder(self.cfg, self.text_encoder)
        return build_model(self.cfg.model, self.text_encoder.dim)

    def init_source(self, resume: Path | None, rank: int, world: int) -> Path | None:
        """Where checkpoint.init_from's weights are (checked now, before any process-group work), or None: not
        set, or run.dir holds a checkpoint, and resuming wins (a preempted fine-tune continues)."""
        c = self.cfg.checkpoint
        if c.init_from is None:
            return None
        if resume is not None:
            if self.is_main:
                print(f"checkpoint.init_from={c.init_from} ignored: resuming from {resume}", file=sys.stderr)
            return None
        return find_source(c.init_from, c.init_weights, (rank, world))

    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        return parallelize_stdit(model, self.dims, cp_mode(self.cfg))

    def architecture_keys(self) -> list[str]:
        """Config keys a resume must not change (compared with the checkpoint's config.yaml, named on mismatch)."""
        runtime = {"attention_backend", "activation_checkpointing", "vae", "compile"}  # how, not what, it computes
        return [f"model.{f.name}" for f in dataclasses.fields(self.cfg.model) if f.name not in runtime]

    def plain_name(self, name: str) -> str:
        """The plain model's name of a parameter of the (parallelized) module, for the layout-free checkpoint."""
        return plain_name(name, self.cfg.model.depth, self.dims.pp > 1)

    def token_grid(self, shape) -> tuple[int, int, int]:
        """Model token grid of a sample of dataset shape (T, H, W) (pixels, or latents when the data is cached)."""
        factors = (self.vae.time_factor, self.vae.space_factor) if self.vae is not None and not self.cfg.data.cached \
            else (1, 1)
        return token_grid(shape, self.cfg.model.patch_size, factors, self.cfg.data.window)

    def data_share(self) -> tuple[int, int]:
        """(dp rank, dp size): each rank loads only the samples of its micro-batches."""
        return self.dims.rank("dp"), self.dims.dp

    def check_cache(self, dataset) -> None:
        """Cached latents and embeddings must fit this model and text encoder."""
        meta = dataset.entries[0][2]
        if meta["channels"] != self.cfg.model.in_channels or meta["text_dim"] != self.text_encoder.dim:
            raise ConfigError(f"data.shards hold {meta['channels']}-channel latents and {meta['text_dim']}-dim "
                              f"caption embeddings, but the model takes model.in_channels={self.cfg.model.in_channels}"
                              f" and the text encoder gives {self.text_encoder.dim}; set model.vae and text.* to "
                              "what `stdit data cache` used (its OUT/cache.json)")
        try:  # the same encoders, not only the same widths: their configs and weights (the cache's fingerprints)
            check_fingerprints(sorted({e[0] for e in dataset.entries}), load_vae(self.cfg.model.vae, "cpu"),
                               self.text_encoder)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def check_bad_data(self, bad: int) -> None:
        """Stop when more than data.max_bad_fraction of the data was bad: of the shards' indexed samples (probes
        that cannot be read), or of max(samples seen, dataset size) (samples that could not be decoded)."""
        dataset, frac = self.batches.dataset, self.cfg.data.max_bad_fraction
        dropped = len(getattr(dataset, "dropped", ()))
        if dropped > frac * (len(dataset) + dropped):
            raise TrainingError(f"{dropped} of {len(dataset) + dropped} samples of data.shards cannot be indexed "
                                f"(listed above), more than data.max_bad_fraction={frac}; repair or remove the "
                                "shards, or raise data.max_bad_fraction")
        self.bad_samples += int(bad)
        seen = max(self.batches.samples_consumed(getattr(self, "step", 0)), len(dataset))
        if self.bad_samples > frac * seen:
            raise TrainingError(f"{self.bad_samples} samples could not be decoded (each logged "
                                f"above with its shard and offset and replaced), more than data.max_bad_fraction="
                                f"{frac} of {seen}; repair or remove those shards, or raise data.max_bad_fraction")

    def count_bad(self, samples: list) -> list:
        """Note this rank's substituted samples of the step (the dataset marks them `bad`)."""
        self.step_bad = sum(getattr(s, "bad", None) is not None for s in samples)
        return samples

    def global_batch(self, step: int) -> tuple[list, object]:
        """Step `step`'s plan and this rank's samples of it; with model.vae, pixel videos become (scaled)
        latents, encoded on the fly (cached shards hold latents already)."""
        samples, plan = self.count_bad(self.batches.samples(step)), self.batches.plan(step)
        if self.vae is None:
            return samples, plan
        return [s if s.latent else dataclasses.replace(
            s, video=self.vae.encode(s.video[None].to(self.device), tiled=True)[0].cpu(), latent=True)
            for s in samples], plan

    def micro_batches(self, step: int) -> tuple[list, dict]:
        """This rank's micro-batches as engine items ((inputs, labels)), and the step's statistics; the loss's
        normaliser (the step's loss-token count) is kept for loss()."""
        samples, plan = self.global_batch(step)
        micro, self.loss_tokens, stats = self.steps.build(step, plan, samples, self.dims.rank("dp"), self.dims.dp)
        items = [self.device_item(batch, draws) for batch, draws in micro]
        if self.dims.cp > 1:  # DSP's balance of whole frames over the cp ranks, as padding of their rows
            cuts = [cp_padding(batch, self.dims.cp, cp_mode(self.cfg)) for batch, _ in micro]
            stats["cp_padding_fraction"] = 1.0 - sum(c[0] for c in cuts) / max(sum(c[1] for c in cuts), 1)
        if self.cfg.run.log_sample_ids:
            stats["sample_ids"] = plan.ids
        return items, stats

    def device_item(self, batch, draws) -> tuple:
        """A packed micro-batch on the device as this cp rank's engine item; the host never waits for the device
        here (non-blocking copies, noise drawn on the device), so it can queue micro-batch after micro-batch."""
        mine, view = cp_cut(batch, self.dims.rank("cp"), self.dims.cp, cp_mode(self.cfg), self.device)  # host-side
        batch = batch.to(self.device)
        view = batch if view is None else view  # cp = 1: the whole batch
        x_t, t_frame, velocity = noisy_inputs(batch, draws)
        target, weight = prediction_target(batch, velocity, t_frame, self.cfg.diffusion)
        mask = view.loss_mask.float() if weight is None else view.loss_mask.float() * weight[mine]
        inputs = model_inputs(x_t[mine], t_frame, view, self.dims.pp > 1)
        return inputs, (target[mine], mask)

    def loss(self, pred: torch.Tensor, labels) -> torch.Tensor:
        """A micro-batch's share of the step's loss: mean over all loss tokens of the step (every rank's)."""
        target, mask = labels
        return flow_loss_sum(pred, target, mask) / self.loss_tokens

    # ------------------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        start = time.perf_counter()
        self.engine.module.train()
        self.sums: dict[str, torch.Tensor] = {}  # loss parts a loss() may add, reduced with the loss
        items, stats = self.micro_batches(self.step)
        loss = self.engine.train_batch(items, self.loss)
        grad_norm, lr = self.engine.step()  # skipped (on every rank) when the gradients are not finite
        skipped = self.engine.skipped
        if not skipped:
            self.engine.ema.update(min(self.cfg.optim.ema_decay, (1 + self.step) / (10 + self.step)))
        self.step += 1
        totals = self.reduce_step({"loss": loss, **self.sums}, {"model_flops": stats.pop("model_flops", 0.0),
                                                                "bad_samples": self.step_bad})
        step_bad = int(totals.pop("bad_samples"))
        bad = skipped or not math.isfinite(totals["loss"]) or not math.isfinite(grad_norm)
        self.skipped_steps += bad
        self.bad_streak = self.bad_streak + 1 if bad else 0
        metrics = self.metrics(totals, stats, grad_norm, lr, time.perf_counter() - start)
        metrics["skipped_steps"] = self.skipped_steps
        if step_bad or self.bad_samples:
            metrics["bad_samples"] = step_bad
        self.check_bad_data(step_bad)
        return metrics

    def reduce_step(self, losses: dict, per_dp: dict) -> dict[str, float]:
        """Sums over the ranks, in one collective on the training device: loss-like values that each dp x cp
        rank holds a part of (on its last pipeline stage; tensor rank 0 speaks for its copies), values each dp
        rank counts once (its first tp / cp / pp rank speaks), and whether any rank got a stop signal."""
        d = self.dims
        loss_speaker = d.rank("tp") == 0 and d.is_last_stage()
        dp_speaker = d.rank("tp") == 0 and d.rank("cp") == 0 and d.rank("pp") == 0
        def on_device(v):  # a loss tensor stays on the device; a number is filled in there (no copy)
            if isinstance(v, torch.Tensor):
                return v.to(self.device, torch.float64).reshape(())
            return torch.full((), float(v), dtype=torch.float64, device=self.device)
        counts = [v if dp_speaker else 0.0 for v in per_dp.values()] + [float(self.stop_signal is not None)]
        t = torch.cat([torch.stack([on_device(v if loss_speaker else 0.0) for v in losses.values()]),
                       to_device(torch.tensor(counts, dtype=torch.float64), self.device)])  # one host copy
        if d.distributed:
            dist.all_reduce(t)
        out = dict(zip([*losses, *per_dp, "stop"], t.tolist()))  # the step's one wait for the device
        if out.pop("stop") and self.stop_signal is None:
            self.stop_signal = "a stop signal on another rank"
        return out

    def metrics(self, totals: dict, stats: dict, grad_norm: float, lr: float, dt: float) -> dict:
        self.tokens_seen += stats["tokens"]
        m = {"step": self.step, "loss": totals["loss"], "grad_norm": grad_norm, "lr": lr, "tokens": stats["tokens"],
             "tokens_seen": self.tokens_seen, "tokens_per_s": stats["tokens"] / dt, "step_time_s": dt,
             "padding_fraction": stats["padding_fraction"], "micro_batches": stats["micro_batches"],
             "samples": stats["samples"], "layout": self.dims.describe()}
        for key in ("cp_padding_fraction", "sample_ids"):
            if key in stats:
                m[key] = stats[key]
        if self.cfg.model.compile:  # graphs compiled so far: it grows on a recompile (TORCH_LOGS=recompiles says why)
            m["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        per_device = totals["model_flops"] / dt / self.dims.world_size
        m["model_tflops_per_s_per_device"] = per_device / 1e12
        if self.device.type == "cuda":
            m["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            if peak_flops(self.device):
                m["mfu"] = per_device / peak_flops(self.device)
        return m

    # ------------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------------

    def save(self, final: bool = False) -> Path:
        data = {"samples_seen": self.batches.samples_consumed(self.step), "data_state": self.batches.state(self.step)}
        data.update(bad_samples=self.bad_samples, skipped_steps=self.skipped_steps)
        return self.checkpointer.save(self.step, {"tokens_seen": self.tokens_seen, **data},
                                      {"scheduler": self.engine.scheduler.state_dict()}, final)

    def restore(self) -> None:
        meta, _ = self.checkpointer.load()
        if meta is not None:
            self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
            self.bad_samples, self.skipped_steps = meta.get("bad_samples", 0), meta.get("skipped_steps", 0)
            self.batches.resume(self.step, meta.get("data_state", meta["samples_seen"]))

    def train(self) -> list[dict]:
        cfg = self.cfg
        self.restore()
        history = []
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        bar = tqdm(total=cfg.run.steps, initial=self.step, desc="train", mininterval=2.0, dynamic_ncols=True,
                   disable=not self.is_main)
        while self.step < cfg.run.steps:
            metrics = self.train_step()
            history.append(metrics)
            if self.step % cfg.run.log_every == 0 or self.step == cfg.run.steps or self.bad_streak:
                self.logger.log(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update(1)
            if self.bad_streak >= cfg.optim.max_bad_steps:
                self._stop_non_finite(bar, previous)
            if self.stop_signal is not None:
                break
            # never a checkpoint right after a non-finite step: it must not rotate a good one out
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.run.steps \
                    and not self.bad_streak:
                self.save()
        bar.close()
        self.batches.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if self.bad_streak:
            self._stop_non_finite(bar, previous)
        saved = self.save(final=True)
        if self.stop_signal is None:
            if self.is_main and has_full(saved):  # checkpoint.full_copy=never: no full weights to sample
                self.log_samples(saved)
        elif self.is_main:
            print(f"stopped by {self.stop_signal} after step {self.step}; saved {saved}", file=sys.stderr)
        self.logger.close()
        if self.dims.distributed:
            dist.barrier()
        return history

    def _stop_non_finite(self, bar, previous) -> None:
        """Too many non-finite steps in a row (or the run ended on one): stop without writing a checkpoint."""
        bar.close()
        self.batches.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        self.logger.close()
        newest = latest(self.run_dir)
        raise TrainingError(
            f"{self.bad_streak} step(s) in a row up to step {self.step} had a non-finite loss or gradient norm "
            f"(optim.max_bad_steps={self.cfg.optim.max_bad_steps}; the optimizer skipped them, "
            f"{self.skipped_steps} skipped in all); stopped without writing a checkpoint. Newest checkpoint: "
            f"{newest if newest is not None else 'none'}. Lower optim.lr, check the data, or resume from an "
            "earlier checkpoint (checkpoint.resume=PATH)")

    def _request_stop(self, signum, frame) -> None:
        """SIGTERM / SIGUSR1 (SLURM's warning before a time limit or preemption): finish the step, save, exit 0.
        Every rank learns of it in the step's reduction, so all save the same step together."""
        self.stop_signal = signal.Signals(signum).name

    def log_samples(self, saved: Path) -> None:
        """A few videos from the saved EMA weights into RUN_DIR/samples and TensorBoard (main process)."""
        n = self.cfg.run.samples_at_end
        if n <= 0:
            return
        ema = build_model(self.cfg.model, self.text_encoder.dim)
        load_weights(ema, saved, "ema")
        ema = ema.to(self.device)
        dataset = self.batches.dataset
        picks = [dataset[i] for i in range(min(n, len(dataset)))]
        vae = self.vae if self.vae is not None or self.cfg.model.vae is None else load_vae(self.cfg.model.vae,
                                                                                           self.device)
        shapes = [tuple(s.video.shape[1:]) for s in picks]  # cached samples: latent shapes already
        if vae is not None:
            shapes = [shape if s.latent else latent_shape(shape, (vae.time_factor, vae.space_factor))
                      for s, shape in zip(picks, shapes)]
        videos = sample_videos(ema, self.text_encoder, [s.caption for s in picks], shapes, self.cfg.model,
                               self.cfg.diffusion, seed=self.cfg.run.seed, fps=picks[0].fps)
        if vae is not None:  # latents -> pixels
            videos = [vae.decode(v[None].to(self.device), tiled=True)[0].cpu() for v in videos]
        for i, (s, v) in enumerate(zip(picks, videos)):
            frames = to_uint8(v)
            self.logger.video(f"samples/{i}: {s.caption}", frames, self.step)
            write_video(self.run_dir / "samples" / f"step{self.step:08d}_{i}.mp4", frames, fps=s.fps, upscale=4)


if __name__ == "__main__":
    from stdit.cli import main as cli_main  # same error handling as `stdit train`
    cli_main(["train"] + sys.argv[1:])
