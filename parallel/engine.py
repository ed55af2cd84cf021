"""DeepSpeed engine from ParallelDims + optim config; EMA and full-tensor gather / shard helpers for every layout."""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.dims import MegatronMPU, ParallelDims


def deepspeed_config(cfg, dims: ParallelDims, bf16: bool) -> dict:
    """ZeRO stage, clipping and precision. Without a pipeline, micro-batching is ours
    (`managed_gradient_accumulation: false`: every backward accumulates, `step()` is the boundary), so a step may
    hold any number of micro-batches; the pipeline engine counts them itself (set per step)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": dims.pp > 1,
        # our stage tuple carries several tensors that need gradients: no TP-partitioned activations
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": dims.zero, "overlap_comm": False, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def build_engine(model, optimizer, scheduler, cfg, dims: ParallelDims, bf16: bool):
    """deepspeed.initialize with a client torch optimizer (no JIT-built fused op) and its LR schedule."""
    import deepspeed
    mpu = None if dims.pp > 1 else MegatronMPU()  # a PipelineModule brings its own grid (same rank order)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu,
                                           config=deepspeed_config(cfg, dims, bf16))
    if dims.zero == 0 and not bf16:
        # Without ZeRO the engine clips fp32 grads with its TP-aware clip_grad_norm_ but drops the norm it
        # returns; keep it so get_global_grad_norm() reports it as it does under ZeRO.
        from deepspeed.runtime.utils import clip_grad_norm_

        def clip_and_keep_norm():
            engine._global_grad_norm = float(clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping(),
                                                              mpu=engine.mpu))
        engine.clip_fp32_gradients = clip_and_keep_norm
    return engine


def _zero3(p) -> bool:
    return hasattr(p, "ds_tensor")


def _local(p) -> torch.Tensor:
    """The part of a parameter this rank owns: its ZeRO-3 partition, else the (TP-local) tensor."""
    return p.ds_tensor if _zero3(p) else p.data


def _tp_sharded(p) -> bool:
    """TP-sharded by megatron (a `tensor_model_parallel` mark alone is pipeline.py's norm bookkeeping)."""
    if not (getattr(p, "tensor_model_parallel", False) and hasattr(p, "partition_dim")):
        return False
    from megatron.core import parallel_state
    return parallel_state.get_tensor_model_parallel_world_size() > 1


def gather_tp(p, t: torch.Tensor) -> torch.Tensor:
    """The full tensor from this rank's TP shard `t` of parameter p (concatenated over the TP group)."""
    if not _tp_sharded(p):
        return t
    from megatron.core import parallel_state
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=p.partition_dim)


def slice_tp(p, full: torch.Tensor) -> torch.Tensor:
    """This rank's TP shard of a full tensor of parameter p (the inverse of gather_tp, as apply_tp cuts)."""
    if not _tp_sharded(p):
        return full
    from megatron.core import parallel_state
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    return full.chunk(tp, dim=p.partition_dim)[rank].contiguous()


def zero3_partition(p, t: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a (TP-local) tensor of parameter p: a slice of the flat tensor, padded."""
    size, rank = dist.get_world_size(p.ds_process_group), dist.get_rank(p.ds_process_group)
    part = p.ds_tensor.numel()
    flat = torch.nn.functional.pad(t.reshape(-1), (0, part * size - t.numel()))
    return flat[rank * part:(rank + 1) * part].clone()


def _full(p, local: torch.Tensor) -> torch.Tensor:
    """Undo ZeRO-3 partitioning (over its data-parallel group) and TP sharding of `local`, a view of p's data."""
    t = local
    if _zero3(p):
        group = p.ds_process_group
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        t = torch.cat(parts)[:p.ds_numel].view(p.ds_shape)
    return gather_tp(p, t)


def plain_name(name: str) -> str:
    """Parameter name in the plain model (TP wraps megatron layers in `.inner`)."""
    return name.replace(".inner.", ".")


class EMA:
    """Exponential moving average of the weights this rank owns (ZeRO-3 partition or TP shard), in fp32."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.shadow = [_local(p).detach().float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for s, p in zip(self.shadow, self.model.parameters()):
            s.lerp_(_local(p).float(), 1 - decay)
