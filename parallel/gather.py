"""Full tensors from a rank's shard and back, whatever owns them: TP shards (megatron-core), ZeRO-3 partitions
(DeepSpeed). The checkpoint's layout-free copy and the EMA are built on these."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_zero3(p) -> bool:
    return hasattr(p, "ds_tensor")


def local(p) -> torch.Tensor:
    """The part of a parameter this rank owns: its ZeRO-3 partition, else the (TP-local) tensor."""
    return p.ds_tensor if is_zero3(p) else p.data


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


def full(p, owned: torch.Tensor) -> torch.Tensor:
    """Undo ZeRO-3 partitioning (over its data-parallel group) and TP sharding of `owned`, shaped like local(p)."""
    t = owned
    if is_zero3(p):
        group = p.ds_process_group
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        t = torch.cat(parts)[:p.ds_numel].view(p.ds_shape)
    return gather_tp(p, t)


def owned(p, full_tensor: torch.Tensor) -> torch.Tensor:
    """The part of a full tensor of parameter p that this rank owns (the inverse of full())."""
    t = slice_tp(p, full_tensor)
    return zero3_partition(p, t) if is_zero3(p) else t
