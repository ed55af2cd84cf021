"""Context parallelism (Ulysses): the packed token sequence is split over the cp group.

Token-wise work (norms, MLP, adaLN, RoPE) runs on the local shard without communication. Around each attention
kernel DeepSpeed's all-to-all trades the sequence shard for a head shard, so the kernel sees whole segments
(and the temporal permutation happens where the whole sequence is present), then trades back.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from stdit.packing import PackedBatch, Segments


def local_tokens(length: int, rank: int, size: int) -> slice:
    """The contiguous slice of a packed sequence that cp rank `rank` of `size` holds."""
    if length % size:
        raise ValueError(f"data.token_budget={length} is not divisible by parallel.cp={size}")
    return slice(rank * length // size, (rank + 1) * length // size)


def shard_batch(batch: PackedBatch, rank: int, size: int) -> PackedBatch:
    """This cp rank's view: per-token fields cut to its contiguous slice; segment boundaries stay global."""
    s = local_tokens(batch.tokens.shape[0], rank, size)
    return dataclasses.replace(batch, tokens=batch.tokens[s], coords=batch.coords[s],
                               token_sample=batch.token_sample[s], token_frame=batch.token_frame[s],
                               loss_mask=batch.loss_mask[s])


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[L/cp, H, D] -> [L, H/cp, D] (DeepSpeed's all-to-all on an [s, b=1, h, d] view)."""
    from deepspeed.sequence.layer import _SeqAllToAll
    return _SeqAllToAll.apply(group, x.unsqueeze(1), 2, 0, 1).squeeze(1)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[L, H/cp, D] -> [L/cp, H, D]."""
    from deepspeed.sequence.layer import _SeqAllToAll
    return _SeqAllToAll.apply(group, x.unsqueeze(1), 0, 2, 1).squeeze(1)


class UlyssesAttention(nn.Module):
    """Wraps a VarlenAttention: all-to-all in, the kernel on whole segments with H/cp heads, all-to-all out.

    For cross-attention the keys/values (text) are not sequence-sharded: every rank holds them all and keeps
    the heads that match its query head shard.
    """

    def __init__(self, inner: nn.Module, group, cross: bool):
        super().__init__()
        self.inner, self.group, self.cross = inner, group, cross

    def forward(self, q, k, v, seg: Segments) -> torch.Tensor:
        import torch.distributed as dist
        q = _seq_to_heads(q, self.group)
        if self.cross:
            size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
            h = k.shape[1] // size
            k, v = k[:, rank * h:(rank + 1) * h], v[:, rank * h:(rank + 1) * h]
        else:
            k, v = _seq_to_heads(k, self.group), _seq_to_heads(v, self.group)
        return _heads_to_seq(self.inner(q, k, v, seg), self.group)


def apply_cp(model: nn.Module, kernels: tuple[str, ...], group) -> nn.Module:
    """Wrap every attention-kernel module named in `kernels` (suffixes, e.g. 'cross_attn.attn') in place."""
    import torch.distributed as dist
    if group is None or dist.get_world_size(group) == 1:
        return model
    targets = [name for name, _ in model.named_modules() if any(name.endswith(k) for k in kernels)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, UlyssesAttention(getattr(parent, child), group, cross=name.endswith("cross_attn.attn")))
    return model
