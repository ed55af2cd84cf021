"""Engines: what runs a step's micro-batches and the optimizer. One interface, two implementations.

    engine.train_batch(items, loss_fn) -> this rank's part of the step's loss (a float64 tensor on the device)
    engine.step() -> (grad norm, lr); engine.skipped: the step was not applied (non-finite gradients: neither
                     the optimizer nor the LR schedule moved, on every rank alike)
    engine.ema.update(decay); engine.module; engine.optimizer (the one holding Adam's state); engine.scheduler

`items` are (inputs, labels) per micro-batch; `loss_fn(output, labels)` is that micro-batch's share of the step's
loss (already divided by the step's normaliser). Engines scale what they back-propagate so that averaging
gradients over the dp x cp ranks, and the pipeline engine's division by the micro-batch count, give the gradient
of exactly that loss: no layout or micro-batch split changes it.

TorchEngine: one process, plain torch. DeepSpeedEngine: deepspeed.initialize (ZeRO 0-3) with our micro-batching,
or DeepSpeed's pipeline engine when the module is a PipelineModule.
"""
from __future__ import annotations

import contextlib
import math

import torch

from parallel.dims import MegatronMPU, ParallelDims
from parallel.gather import local


class EMA:
    """Exponential moving average, in fp32, of the weights this rank owns (ZeRO-3 partition, TP shard or all)."""

    def __init__(self, module: torch.nn.Module):
        self.params = list(module.parameters())
        self.shadow = [local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        torch._foreach_lerp_(self.shadow, [local(p).float() for p in self.params], 1 - decay)


class TorchEngine:
    """One process: AdamW, clipping by global norm, LR schedule; forward under `autocast`."""

    def __init__(self, module, optimizer, scheduler, grad_clip: float, autocast=contextlib.nullcontext):
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.clip = grad_clip if grad_clip > 0 else float("inf")
        self.autocast = autocast
        self.ema = EMA(module)

    def train_batch(self, items, loss_fn) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for inputs, labels in items:
            with self.autocast():
                out = self.module(*inputs)
            loss = loss_fn(out, labels)
            loss.backward()
            total = total + loss.detach().double()
        return total

    def step(self) -> tuple[float, float]:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip))  # the one wait
        lr = self.scheduler.get_last_lr()[0]
        self.skipped = not math.isfinite(grad_norm)  # as DeepSpeed's ZeRO optimizers skip an overflow
        if not self.skipped:
            self.optimizer.step()
            self.scheduler.step()
        return grad_norm, lr

    def save_shards(self, path) -> None:
        """Nothing: one process's state is all in the layout-free copy."""

    def load_shards(self, path) -> None:
        raise RuntimeError("a single-process run resumes from the layout-free copy")


def deepspeed_config(dims: ParallelDims, grad_clip: float, bf16: bool) -> dict:
    """ZeRO stage, clipping and precision. Without a pipeline, micro-batching is ours
    (`managed_gradient_accumulation: false`: every backward accumulates, `step()` is the boundary), so a step may
    hold any number of micro-batches; the pipeline engine counts them itself (set per step)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": dims.pp > 1,
        # our stage tuple carries several tensors that need gradients: no TP-partitioned activations
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": dims.zero, "overlap_comm": False, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """deepspeed.initialize over a (TP/CP-applied) module or PipelineModule, with a client torch optimizer."""

    ENGINE_TAG = "state"

    def __init__(self, module, optimizer, scheduler, dims: ParallelDims, grad_clip: float, bf16: bool,
                 autocast=contextlib.nullcontext):
        import deepspeed
        self.dims, self.autocast = dims, autocast
        self.pipelined = dims.pp > 1
        mpu = None if self.pipelined else MegatronMPU(dims)  # a PipelineModule brings its grid (same rank order)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                    mpu=mpu, config=deepspeed_config(dims, grad_clip, bf16))
        # its engine files are loaded with weights_only=True (DeepSpeed's own plain types allowed, nothing else)
        # and hashed as they are written
        from parallel.safe_io import safe_checkpoint_engine
        self.engine.checkpoint_engine = safe_checkpoint_engine(self.engine._config)
        self.module, self.optimizer, self.scheduler = self.engine.module, self.engine.optimizer, scheduler
        self.ema = EMA(self.module)
        self.replicas = dims.size("dp_cp")  # the engine averages gradients over these
        if dims.zero == 0 and not bf16:
            # Without ZeRO the engine clips fp32 grads with its TP-aware clip_grad_norm_ but drops the norm it
            # returns; keep it so get_global_grad_norm() reports it as it does under ZeRO.
            from deepspeed.runtime.utils import clip_grad_norm_
            engine = self.engine

            def clip_and_keep_norm():
                engine._global_grad_norm = float(clip_grad_norm_(engine.module.parameters(),
                                                                  engine.gradient_clipping(), mpu=engine.mpu))
                # a non-finite norm skips the step as ZeRO's overflow check does: no gradients for the optimizer
                # to apply, and `overflow` makes the engine leave the LR schedule where it is
                overflow = not math.isfinite(engine._global_grad_norm)
                if overflow:
                    for p in engine.module.parameters():
                        p.grad = None
                engine.optimizer.overflow = overflow
            engine.clip_fp32_gradients = clip_and_keep_norm

    def train_batch(self, items, loss_fn) -> torch.Tensor:
        self.lr = self.engine.get_lr()[0]  # before the pipeline engine steps inside train_batch
        if self.pipelined:
            return self._pipeline_batch(items, loss_fn)
        total = 0.0
        for inputs, labels in items:
            with self.autocast():
                out = self.engine(*inputs)  # through the engine: its forward starts each micro-step (ZeRO-3)
            loss = loss_fn(out, labels)
            self.engine.backward(loss * self.replicas, scale_wrt_gas=False)
            total = total + loss.detach().double()
        return total

    def _pipeline_batch(self, items, loss_fn) -> torch.Tensor:
        """DeepSpeed runs this rank's micro-batches through the stages and steps; it divides each micro-batch's
        loss by their count. Only the last stage computes losses: other stages return zero."""
        items = list(items)
        factor = len(items) * self.replicas
        total = [0.0]

        def scaled(out, labels):
            loss = loss_fn(out, labels)
            total[0] = total[0] + loss.detach().double()
            return loss * factor
        self.engine.set_train_batch_size(factor)
        self.module.loss_slot.fn = scaled
        self.engine.train_batch(iter(items))
        device = items[0][1][0].device
        return torch.as_tensor(total[0], dtype=torch.float64, device=device)

    def step(self) -> tuple[float, float]:
        if not self.pipelined:
            self.engine.step()
        self.skipped = not self.engine.was_step_applied()
        return float(self.engine.get_global_grad_norm() or float("nan")), self.lr

    def save_shards(self, path) -> None:
        self.engine.save_checkpoint(str(path), tag=self.ENGINE_TAG, save_latest=False)

    def load_shards(self, path) -> None:
        loaded, _ = self.engine.load_checkpoint(str(path), tag=self.ENGINE_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"{path}: DeepSpeed found no engine state")


def build_engine(module, optimizer, scheduler, dims: ParallelDims, grad_clip: float, bf16: bool,
                 autocast=contextlib.nullcontext):
    """The engine the layout needs: DeepSpeed where there are process groups (or ZeRO), plain torch otherwise."""
    if dims.distributed:
        return DeepSpeedEngine(module, optimizer, scheduler, dims, grad_clip, bf16, autocast)
    return TorchEngine(module, optimizer, scheduler, grad_clip, autocast)
