"""Context parallelism (Ulysses): the packed token sequence is split over the cp group.

Token-wise work (norms, MLP, adaLN, RoPE) runs on the local slice without communication. Around each attention
kernel DeepSpeed's all-to-all trades the sequence slice for a head slice, so the kernel sees whole segments (and
the temporal permutation and the cut of the padding tail happen where the whole sequence is present), then trades
back. The kernel's segment argument passes through untouched.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def local_tokens(length: int, rank: int, size: int) -> slice:
    """The contiguous slice of a sequence of `length` tokens that cp rank `rank` of `size` holds."""
    if length % size:
        raise ValueError(f"data.token_budget={length} is not divisible by parallel.cp={size}")
    return slice(rank * length // size, (rank + 1) * length // size)


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[L/cp, H, D] -> [L, H/cp, D] (DeepSpeed's all-to-all on an [s, b=1, h, d] view)."""
    from deepspeed.sequence.layer import _SeqAllToAll
    return _SeqAllToAll.apply(group, x.unsqueeze(1), 2, 0, 1).squeeze(1)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[L, H/cp, D] -> [L/cp, H, D]."""
    from deepspeed.sequence.layer import _SeqAllToAll
    return _SeqAllToAll.apply(group, x.unsqueeze(1), 0, 2, 1).squeeze(1)


class UlyssesAttention(nn.Module):
    """Wraps an attention kernel module (q, k, v, segments): all-to-all in, the kernel on whole segments with
    H/cp heads, all-to-all out. For cross-attention the keys/values (text) are not sequence-sliced: every rank
    holds them all and keeps the heads that match its query head slice."""

    def __init__(self, inner: nn.Module, group, cross: bool):
        super().__init__()
        self.inner, self.group, self.cross = inner, group, cross

    def forward(self, q, k, v, seg) -> torch.Tensor:
        q = _seq_to_heads(q, self.group)
        if self.cross:
            size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
            h = k.shape[1] // size
            k, v = k[:, rank * h:(rank + 1) * h], v[:, rank * h:(rank + 1) * h]
        else:
            k, v = _seq_to_heads(k, self.group), _seq_to_heads(v, self.group)
        return _heads_to_seq(self.inner(q, k, v, seg), self.group)


def apply_cp(model: nn.Module, kernels: dict[str, bool], group) -> nn.Module:
    """Wrap every attention-kernel module whose name ends with a key of `kernels` in place; the value says
    whether it is a cross-attention (keys/values not sequence-sliced)."""
    if group is None or dist.get_world_size(group) == 1:
        return model
    targets = [(name, cross) for name, _ in model.named_modules() for k, cross in kernels.items()
               if name.endswith(k)]
    for name, cross in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, UlyssesAttention(getattr(parent, child), group, cross=cross))
    return model
