"""The Trainer: build, restore, then per step: global batch -> micro-batches -> forward/backward -> clip -> step
-> EMA -> log -> maybe checkpoint.

`python -m stdit.train RECIPE [key=value ...]` is the same as `stdit train RECIPE [key=value ...]`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from parallel import checkpoint
from parallel.context import apply_cp, local_tokens, shard_batch
from parallel.dims import ParallelDims, init_distributed, launch_env
from parallel.engine import EMA, build_engine
from parallel.engine import plain_name as tp_plain_name
from parallel.pipeline import batch_inputs, build_pipeline
from parallel.pipeline import plain_name as pipe_plain_name
from parallel.tensor import apply_tp
from stdit.config import Config, ConfigError, load_config, to_yaml
from stdit.data.loader import StepPlan, StepSampler, build_dataset
from stdit.data.video import to_uint8, write_video
from stdit.diffusion.masks import draw_mask
from stdit.diffusion.rectified_flow import SampleDraw, draw, flow_loss_sum, noisy_inputs
from stdit.diffusion.sampler import sample_videos
from stdit.flops import forward_flops, peak_flops
from stdit.metrics import MetricsLogger
from stdit.models.stdit import ATTENTION_KERNELS, TP_HEAD_SHARED, TP_PLAN, build_model
from stdit.models.text import TextEncoder
from stdit.ops import resolve_backend
from stdit.packing import grid_of, pack, plan_microbatches


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible; use run.device=auto or cpu")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


@dataclass
class Shard:
    """Where this process sits: which data-parallel share of a step's micro-batches, which context slice of each."""

    dp_rank: int = 0
    dp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1


def _filler(budget: int, channels: int, patch, text_dim: int):
    """A micro-batch with nothing in the loss, for a dp rank that has fewer micro-batches than the others
    (ZeRO reduces per backward, so every rank must run the same number)."""
    one = torch.zeros(channels, *patch)
    batch = pack([one], [torch.zeros(1, text_dim)], [8.0], patch, budget, sample_ids=[-1],
                 cond_frames=[torch.ones(1, dtype=torch.bool)])
    return batch, [SampleDraw(t=0.0, noise=torch.zeros(1, batch.tokens.shape[1]), drop_caption=False)]


def plan_step(text_encoder, samples, step: int, cfg: Config, shard: Shard = Shard(), plan: StepPlan | None = None):
    """This process's micro-batches of one global batch: [(packed batch, draws)], the global loss-token count,
    and step statistics.

    `plan` (from the data sampler) names the step's samples, their token grids and micro-batches; `samples` are
    then this dp rank's only: those of its share of the micro-batches, in order. Without a plan, `samples` are the
    whole step, packed here first-fit-decreasing. Either way every process plans the same micro-batches and the
    same loss-token count; dp ranks take shares (padded with fillers to equal counts). `model_flops` in the
    statistics counts this rank's micro-batches (the trainer sums it over dp).
    """
    patch, budget, seed = cfg.model.patch_size, cfg.data.token_budget, cfg.run.seed
    if plan is None:
        grids = [grid_of(s.video.shape[1:], patch) for s in samples]
        counts = [math.prod(g) for g in grids]
        plan = StepPlan([s.sample_id for s in samples], plan_microbatches(counts, budget), counts, grids)
        samples = [samples[i] for j in plan.share(shard.dp_rank, shard.dp_size) for i in plan.bins[j]]
    every = plan.shares(shard.dp_size)
    shares = every[shard.dp_rank]
    order = [i for j in shares for i in plan.bins[j]]
    if [s.sample_id for s in samples] != [plan.ids[i] for i in order]:
        raise RuntimeError(f"step {step}: the loaded samples are not this rank's share of the step's plan")
    conds = [draw_mask(cfg.data.masks, seed, step, sid, g[0])[1] for sid, g in zip(plan.ids, plan.grids)]
    total_loss_tokens = sum(math.prod(g) - int(c.sum()) * g[1] * g[2] for g, c in zip(plan.grids, conds))
    token_dim = cfg.model.in_channels * math.prod(patch)
    draws = [draw(seed, step, plan.ids[i], plan.tokens[i], token_dim, cfg.diffusion) for i in order]
    texts = text_encoder.encode(["" if d.drop_caption or s.text is not None else s.caption
                                 for s, d in zip(samples, draws)])
    texts = [s.text.to(t.device) if s.text is not None and not d.drop_caption else t
             for s, d, t in zip(samples, draws, texts)]
    where = {i: k for k, i in enumerate(order)}  # plan index -> position in this rank's lists
    mine = []
    for j in shares:
        ks = [where[i] for i in plan.bins[j]]
        batch = pack([samples[k].video for k in ks], [texts[k] for k in ks], [samples[k].fps for k in ks], patch,
                     budget, sample_ids=[samples[k].sample_id for k in ks],
                     cond_frames=[conds[i] for i in plan.bins[j]])
        mine.append((batch, [draws[k] for k in ks]))
    most = max(map(len, every))
    mine += [_filler(budget, cfg.model.in_channels, patch, text_encoder.dim)] * (most - len(mine))
    real = sum(plan.tokens)
    flops = 3 * forward_flops(cfg.model, text_encoder.dim, [plan.grids[i] for i in order],
                              [int(x.shape[0]) for x in texts])
    stats = {"tokens": real, "samples": len(plan.ids), "micro_batches": len(plan.bins), "model_flops": flops,
             "padding_fraction": 1.0 - real / (len(plan.bins) * budget), "loss_tokens": total_loss_tokens}
    return mine, total_loss_tokens, stats


def micro_batch_inputs(batch, draws, shard: Shard, device):
    """(x_t, per-frame t, target, batch) of one micro-batch, cut to this cp rank's slice of the tokens."""
    batch = batch.to(device)
    x_t, t_frame, target = noisy_inputs(batch, draws)
    if shard.cp_size > 1:
        mine = local_tokens(batch.tokens.shape[0], shard.cp_rank, shard.cp_size)
        batch, x_t, target = shard_batch(batch, shard.cp_rank, shard.cp_size), x_t[mine], target[mine]
    return x_t, t_frame, target, batch


def forward_backward(model, text_encoder, samples, step: int, cfg: Config, device: torch.device, backward=None,
                     shard: Shard = Shard(), plan: StepPlan | None = None) -> dict:
    """Loss (this process's part) and accumulated gradients of one global batch.

    Each micro-batch adds sum(loss) / (loss tokens of the global batch), scaled by dp*cp because the engine
    averages gradients over those ranks — so neither the micro-batch split nor the layout changes the loss or
    the gradients.
    """
    mine, total_loss_tokens, stats = plan_step(text_encoder, samples, step, cfg, shard, plan)
    scale = shard.dp_size * shard.cp_size
    backward = backward or torch.Tensor.backward
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss = 0.0
    for batch, batch_draws in mine:
        x_t, t_frame, target, batch = micro_batch_inputs(batch, batch_draws, shard, device)
        with autocast:
            pred = model(x_t, t_frame, batch)
        loss_sum = flow_loss_sum(pred, target, batch.loss_mask) / total_loss_tokens
        backward(loss_sum * scale)
        loss += loss_sum.item()
    return {"loss": loss, **stats}


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


class PipeLoss:
    """The pipeline's loss_fn: sum over loss tokens / global count, scaled for the engine's averaging; it also
    keeps the unscaled sum of this rank's micro-batches for logging."""

    def reset(self, total_loss_tokens: int, factor: float) -> None:
        self.total, self.factor, self.total_loss = total_loss_tokens, factor, 0.0

    def __call__(self, pred, labels):
        target, mask = labels
        loss = flow_loss_sum(pred, target, mask) / self.total
        self.total_loss += loss.item()
        return loss * self.factor


class Trainer:
    """Build, restore, loop. One process uses plain torch; several (or ZeRO) use megatron-core + DeepSpeed."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        rank, world, _ = launch_env()
        self.dims = ParallelDims.from_config(cfg, world)  # validates the layout before any process-group work
        self.distributed = world > 1 or cfg.parallel.zero > 0
        self.is_main = rank == 0
        self.device = resolve_device(cfg.run.device)
        resolve_backend(cfg.model.attention_backend, self.device)  # fail now, not in the first forward
        self.run_dir = Path(cfg.run.dir)
        self.resume_from = self._resume_path()  # checked before any process-group work
        if self.distributed:
            init_distributed(self.dims)
        torch.manual_seed(cfg.run.seed)  # every rank builds the same full model, then keeps its shard
        model = self.build_model().to(self.device)
        self.param_shapes = {k: list(v.shape) for k, v in model.named_parameters()}
        self.resume_meta, self.full = None, None
        if self.resume_from is not None:
            self.resume_meta = checkpoint.read_meta(self.resume_from)
            checkpoint.check_shapes(self.resume_from, self.resume_meta, self.param_shapes)
            same_layout = (self.resume_meta["layout"] == self.dims.describe()
                           and (self.resume_from / "engine").is_dir())
            if not (self.distributed and same_layout):  # the layout-free route: full weights before sharding
                self.full = checkpoint.FullTensors(self.resume_from)
                model.load_state_dict(self.full.state_dict("model"))
        self.run_dir.mkdir(parents=True, exist_ok=True)  # only once the config and any checkpoint fit
        self.config_yaml = to_yaml(cfg)
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
        if self.distributed:
            from megatron.core import parallel_state as ps
            model = self.parallelize(model)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        if self.distributed:
            self.engine = build_engine(model, self.optimizer, self.scheduler, cfg, self.dims,
                                       bf16=self.device.type == "cuda")
            self.model, self.ema = self.engine.module, EMA(self.engine.module)
            self.shard = Shard(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                               ps.get_context_parallel_rank(), ps.get_context_parallel_world_size())
            self.loss_group = ps.get_data_parallel_group(with_context_parallel=True)
            self.dp_group = ps.get_data_parallel_group()
        else:
            self.engine, self.model, self.shard = None, model, Shard()
            self.ema = copy.deepcopy(model).requires_grad_(False)
        self.batches = StepSampler(build_dataset(cfg.data, cfg.run.seed), cfg.data, cfg.run.seed, self.token_grid,
                                   cfg.data.num_workers, self.data_share())
        if cfg.data.cached:
            self.check_cache(self.batches.dataset)
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main)
        self.step, self.tokens_seen = 0, 0

    def check_cache(self, dataset) -> None:
        """Cached latents and embeddings must fit this model and text encoder."""
        meta = dataset.entries[0][2]
        if meta["channels"] != self.cfg.model.in_channels or meta["text_dim"] != self.text_encoder.dim:
            raise ConfigError(f"data.shards hold {meta['channels']}-channel latents and {meta['text_dim']}-dim "
                              f"caption embeddings, but the model takes model.in_channels={self.cfg.model.in_channels}"
                              f" and the text encoder gives {self.text_encoder.dim}; set model.vae and text.* to "
                              "what `stdit data cache` used (its OUT/cache.json)")

    def build_model(self) -> torch.nn.Module:
        """The plain, full model (and what it needs: the text encoder, a frozen autoencoder with model.vae)."""
        self.text_encoder = TextEncoder.from_config(self.cfg.text).to(self.device)
        self.vae = None
        if self.cfg.model.vae is not None:
            from stdit.autoencoder import load_vae
            self.vae = load_vae(self.cfg.model.vae, self.device)
        return build_model(self.cfg.model, self.text_encoder.dim)

    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Tensor, context and pipeline parallelism applied from outside, in that order."""
        from megatron.core import parallel_state as ps
        apply_tp(model, TP_PLAN, TP_HEAD_SHARED)
        apply_cp(model, ATTENTION_KERNELS, ps.get_context_parallel_group())
        if self.dims.pp > 1:
            self.pipe_loss = PipeLoss()
            model = build_pipeline(model, self.dims, self.pipe_loss)  # keeps this stage's layers
        return model

    def token_grid(self, shape) -> tuple[int, int, int]:
        """Model token grid of a sample of dataset shape (T, H, W) (pixels, or latents when the data is cached)."""
        if self.vae is not None and not self.cfg.data.cached:
            shape = self.vae.latent_shape(*shape)
        return grid_of(shape, self.cfg.model.patch_size)

    def data_share(self) -> tuple[int, int]:
        """(dp rank, dp size): each rank loads only the samples of its micro-batches."""
        return self.shard.dp_rank, self.shard.dp_size

    def global_batch(self, step: int) -> tuple[list, StepPlan]:
        """Step `step`'s plan and this rank's samples of it; with model.vae, pixel videos become (scaled)
        latents, encoded on the fly (cached shards hold latents already)."""
        samples, plan = self.batches.samples(step), self.batches.plan(step)
        if self.vae is None:
            return samples, plan
        return [s if s.latent else dataclasses.replace(
            s, video=self.vae.encode(s.video[None].to(self.device), tiled=True)[0].cpu(), latent=True)
            for s in samples], plan

    def optimizer_step(self) -> tuple[float, float]:
        """Clip, step the optimizer and the LR schedule; (gradient norm, lr used)."""
        if self.engine is None:
            clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            return grad_norm, lr
        lr = self.engine.get_lr()[0]
        self.engine.step()
        return float(self.engine.get_global_grad_norm() or float("nan")), lr

    def finish_step(self) -> None:
        """EMA update and the step counter, after the optimizer step."""
        decay = min(self.cfg.optim.ema_decay, (1 + self.step) / (10 + self.step))
        self.ema.update(decay) if self.distributed else update_ema(self.ema, self.model, decay)
        self.step += 1

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints (parallel/checkpoint.py holds the format)
    # ------------------------------------------------------------------------------------------------------

    def _resume_path(self) -> Path | None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None
        path = checkpoint.latest(self.run_dir) if mode == "auto" else Path(mode)
        return None if path is None else checkpoint.verify(path)  # a missing or truncated file stops here

    def named_params(self) -> list:
        """(plain model name, parameter) of this rank's parameters, in the module's order."""
        out = []
        for name, p in self.model.named_parameters():
            if self.dims.pp > 1:
                name = pipe_plain_name(name, self.cfg.model.depth)
            out.append((tp_plain_name(name), p))
        return out

    def ema_tensors(self) -> list[torch.Tensor]:
        return self.ema.shadow if self.distributed else list(self.ema.parameters())

    def _coords(self) -> tuple[int, int, int, int]:
        """(pipeline stage, tensor rank, rank among the ZeRO partitions (dp x cp), rank within the stage)."""
        if not self.distributed:
            return 0, 0, 0, 0
        from megatron.core import parallel_state as ps
        return (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                ps.get_data_parallel_rank(with_context_parallel=True),
                dist.get_rank() % (self.dims.world_size // self.dims.pp))  # pp is the outermost axis

    def _ema_shard(self) -> str:
        """This rank's EMA shard file: one per (stage, tensor rank), and per ZeRO partition under ZeRO-3."""
        pp, tp, dp, _ = self._coords()
        return checkpoint.ema_shard_name(pp, tp, dp if self.dims.zero == 3 else 0)

    def restore(self) -> None:
        """Continue from self.resume_from: on the same layout from the engine's shards (bit-exact), on another
        through the layout-free full tensors; the data position carries over in samples."""
        path, meta = self.resume_from, self.resume_meta
        if path is None:
            return
        named, ema = self.named_params(), self.ema_tensors()
        if self.full is None:  # same layout: DeepSpeed's shards, our EMA shard
            loaded, _ = self.engine.load_checkpoint(str(path / "engine"), tag=checkpoint.ENGINE_TAG,
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
            if loaded is None:
                raise checkpoint.CheckpointError(f"checkpoint {path}: DeepSpeed found no engine state in engine/")
            shard = checkpoint.read_tensors(path / "ema" / self._ema_shard())
            for i, e in enumerate(ema):
                e.copy_(shard[str(i)])
        else:
            optimizer = self.engine.optimizer if self.engine is not None else self.optimizer
            checkpoint.load_full_state(self.full, named, ema, optimizer, meta["optimizer_step"])
            self.full = None
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the scheduler's state does not carry over to the optimizer by itself
        if meta["layout"] == self.dims.describe():  # every rank's random streams, where ranks are the same
            rank = dist.get_rank() if self.distributed else 0
            checkpoint.set_rng_state(torch.load(path / "rng" / f"rank_{rank:05d}.pt", map_location="cpu",
                                                weights_only=False))
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.batches.resume(self.step, meta.get("data_state", meta["samples_seen"]))
        if self.is_main:
            how = "same layout" if meta["layout"] == self.dims.describe() else f"re-laid out from {meta['layout']}"
            print(f"resumed from {path} at step {self.step} ({how})", file=sys.stderr)

    def save(self) -> Path:
        """Checkpoint this step (collective): engine shards, EMA shard, layout-free copy, RNG, meta; see
        parallel/checkpoint.py for the layout and the commit protocol."""
        tmp = checkpoint.begin(self.run_dir, self.step)
        named, ema = self.named_params(), self.ema_tensors()
        optimizer = self.optimizer
        if self.engine is not None:
            optimizer = self.engine.optimizer
            self.engine.save_checkpoint(str(tmp / "engine"), tag=checkpoint.ENGINE_TAG, save_latest=False)
            pp, tp, dp, _ = self._coords()
            if self.dims.zero == 3 or dp == 0:
                checkpoint.write_tensors(tmp / "ema" / self._ema_shard(), {str(i): e for i, e in enumerate(ema)})
        _, _, _, rank_in_stage = self._coords()
        checkpoint.write_full(tmp, named, ema, optimizer, rank_in_stage, self.dims.world_size // self.dims.pp)
        checkpoint.write_rank_state(tmp)
        if self.is_main:
            meta = {"step": self.step, "tokens_seen": self.tokens_seen,
                    "samples_seen": self.batches.samples_consumed(self.step),
                    "data_state": self.batches.state(self.step), "layout": self.dims.describe(),
                    "world_size": self.dims.world_size, "optimizer_step": checkpoint.optimizer_step(optimizer),
                    "params": self.param_shapes}
            checkpoint.write_main(tmp, meta, {"scheduler": self.scheduler.state_dict()}, self.config_yaml)
        return checkpoint.commit(self.run_dir, tmp, self.cfg.checkpoint.keep)

    def train_step(self) -> dict:
        cfg, start = self.cfg, time.perf_counter()
        self.model.train()
        samples, plan = self.global_batch(self.step)
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
            stats = forward_backward(self.model, self.text_encoder, samples, self.step, cfg, self.device, plan=plan)
            grad_norm, lr = self.optimizer_step()
        elif self.dims.pp > 1:
            lr = self.engine.get_lr()[0]
            stats = self.pipeline_step(samples, plan)  # forward, backward and optimizer step
            grad_norm = float(self.engine.get_global_grad_norm() or float("nan"))
        else:
            # through the engine, not its module: its forward starts each micro-step (ZeRO-3 accumulates by it)
            stats = forward_backward(self.engine, self.text_encoder, samples, self.step, cfg, self.device,
                                     backward=lambda loss: self.engine.backward(loss, scale_wrt_gas=False),
                                     shard=self.shard, plan=plan)
            grad_norm, lr = self.optimizer_step()
            loss = torch.tensor([stats["loss"]], dtype=torch.float64)
            dist.all_reduce(loss, group=self.loss_group)  # each dp x cp rank held part of the global mean
            stats["loss"] = loss.item()
        self.finish_step()
        if self.distributed:  # each dp rank counted its own micro-batches
            flops = torch.tensor([stats["model_flops"]], dtype=torch.float64)
            dist.all_reduce(flops, group=self.dp_group)
            stats["model_flops"] = flops.item()
        self.tokens_seen += stats["tokens"]
        dt = time.perf_counter() - start
        metrics = {"step": self.step, "loss": stats["loss"], "grad_norm": grad_norm, "lr": lr,
                   "tokens": stats["tokens"], "tokens_seen": self.tokens_seen, "tokens_per_s": stats["tokens"] / dt,
                   "step_time_s": dt, "padding_fraction": stats["padding_fraction"],
                   "micro_batches": stats["micro_batches"], "samples": stats["samples"],
                   "layout": self.dims.describe()}
        if cfg.run.log_sample_ids:
            metrics["sample_ids"] = plan.ids
        per_device = stats["model_flops"] / dt / self.dims.world_size
        metrics["model_tflops_per_s_per_device"] = per_device / 1e12
        if self.device.type == "cuda":
            metrics["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            if peak_flops(self.device):
                metrics["mfu"] = per_device / peak_flops(self.device)
        return metrics

    def pipeline_step(self, samples, plan) -> dict:
        """One step through DeepSpeed's pipeline engine: it runs this rank's micro-batches through the stages."""
        from megatron.core import parallel_state as ps
        mine, total, stats = plan_step(self.text_encoder, samples, self.step, self.cfg, self.shard, plan)
        items = []
        for batch, draws in mine:
            x_t, t_frame, target, view = micro_batch_inputs(batch, draws, self.shard, self.device)
            items.append((batch_inputs(x_t, t_frame, view), (target, view.loss_mask.float())))
        replicas = self.shard.dp_size * self.shard.cp_size
        self.engine.set_train_batch_size(len(items) * replicas)
        # the engine divides each micro-batch loss by their count and averages gradients over dp x cp
        self.pipe_loss.reset(total, factor=len(items) * replicas)
        self.engine.train_batch(iter(items))
        mine_loss = self.pipe_loss.total_loss if self.engine.is_last_stage() and ps.get_tensor_model_parallel_rank() == 0 else 0.0
        loss = torch.tensor([mine_loss], dtype=torch.float64)
        dist.all_reduce(loss)
        return {"loss": loss.item(), **stats}

    def train(self) -> list[dict]:
        cfg = self.cfg
        self.restore()
        history, self.stop_signal = [], None
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        bar = tqdm(total=cfg.run.steps, initial=self.step, desc="train", mininterval=2.0, dynamic_ncols=True,
                   disable=not self.is_main)
        while self.step < cfg.run.steps:
            metrics = self.train_step()
            history.append(metrics)
            if self.step % cfg.run.log_every == 0 or self.step == cfg.run.steps:
                self.logger.log(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update(1)
            if self._stop_requested():
                break
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.run.steps:
                self.save()
        bar.close()
        self.batches.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        saved = self.save()
        if self.stop_signal is None:
            self.log_samples(saved)
        elif self.is_main:
            print(f"stopped by {self.stop_signal} after step {self.step}; saved {saved}", file=sys.stderr)
        self.logger.close()
        if self.distributed:
            dist.barrier()
        return history

    def _request_stop(self, signum, frame) -> None:
        """SIGTERM / SIGUSR1 (SLURM's warning before a time limit or preemption): finish the step, save, exit 0."""
        self.stop_signal = signal.Signals(signum).name

    def _stop_requested(self) -> bool:
        """Whether any process got a stop signal (agreed by all, so they save the same step together)."""
        flag = torch.tensor([self.stop_signal is not None], dtype=torch.int32)
        if self.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and self.stop_signal is None:
                self.stop_signal = "a stop signal on another rank"
        return bool(flag.item())

    def log_samples(self, saved: Path) -> None:
        """Generate a few videos with the EMA weights into RUN_DIR/samples and TensorBoard (main process)."""
        n = self.cfg.run.samples_at_end
        if n <= 0 or not self.is_main:
            return
        ema = self.ema
        if self.distributed:  # a plain single-device model from the checkpoint's full weights
            ema = build_model(self.cfg.model, self.text_encoder.dim)
            checkpoint.load_weights(ema, saved, "ema")
            ema = ema.to(self.device)
        dataset = self.batches.dataset
        picks = [dataset[i] for i in range(min(n, len(dataset)))]
        shapes = [tuple(s.video.shape[1:]) for s in picks]
        if self.vae is not None:
            shapes = [self.vae.latent_shape(*shape) for shape in shapes]
        videos = sample_videos(ema, self.text_encoder, [s.caption for s in picks], shapes, self.cfg.model,
                               self.cfg.diffusion, seed=self.cfg.run.seed, fps=picks[0].fps)
        if self.vae is not None:
            videos = [self.vae.decode(v[None].to(self.device), tiled=True)[0].cpu() for v in videos]
        for i, (s, v) in enumerate(zip(picks, videos)):
            frames = to_uint8(v)
            self.logger.video(f"samples/{i}: {s.caption}", frames, self.step)
            write_video(self.run_dir / "samples" / f"step{self.step:08d}_{i}.mp4", frames, fps=s.fps, upscale=4)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # the deepspeed launcher passes --local_rank=N (LOCAL_RANK is in the environment as well)
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: stdit train RECIPE [key=value ...]   (or python -m stdit.train RECIPE [key=value ...])")
        raise SystemExit(0 if argv else 2)
    cfg = load_config(argv[0], argv[1:])
    if cfg.run.stage == "vae":
        from stdit.train_vae import VAETrainer
        history = VAETrainer(cfg).train()
    else:
        history = Trainer(cfg).train()
    if history and launch_env()[0] == 0:
        first, last = history[0], history[-1]
        print(f"done: step {last['step']}, loss {first['loss']:.4f} -> {last['loss']:.4f}; run dir {cfg.run.dir}")


if __name__ == "__main__":
    from stdit.cli import main as cli_main  # same error handling as `stdit train`
    cli_main(["train"] + sys.argv[1:])
