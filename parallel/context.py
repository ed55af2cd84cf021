"""Context parallelism: the packed token sequence is split over the cp group. Two ways:

Ulysses: token-wise work (norms, MLP, adaLN, RoPE) runs on the local slice without communication. Around each
attention kernel DeepSpeed's all-to-all trades the sequence slice for a head slice, so the kernel sees whole
segments (and the temporal permutation and the cut of the padding tail happen where the whole sequence is
present), then trades back. The kernel's segment argument passes through untouched.

Layout switching (DSP, Zhao et al. 2024, arXiv 2403.10266): each rank holds whole attention segments of one kind
(e.g. whole frames), so that attention and all token-wise work run locally; before a sub-block whose segments cut
across that layout (e.g. temporal columns), one all-to-all (`Exchange`) moves the rows to a second layout holding
whole segments of that kind, and one moves them back. Which rows go where is planned on the host when the batch
is cut (`balanced_split`, `exchange_plan`); the step itself only gathers, exchanges and scatters.
"""
from __future__ import annotations

from dataclasses import dataclass

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


# ----------------------------------------------------------------------------------------------------------
# Layout switching (DSP)
# ----------------------------------------------------------------------------------------------------------


def balanced_split(lengths: list[int], parts: int) -> list[int]:
    """Cut a sequence of items (segments of `lengths` rows) into `parts` contiguous runs with the smallest
    largest run (binary search on the capacity, greedy fill); returns the parts + 1 item boundaries. An item is
    never cut, so one longer than the mean makes the runs unequal: the shorter ones are padded by the caller."""
    def boundaries(cap: int) -> list[int] | None:
        cuts, run = [0], 0
        for i, n in enumerate(lengths):
            if run + n > cap:
                cuts.append(i)
                run = 0
            run += n
        if len(cuts) > parts:
            return None
        return cuts + [len(lengths)] * (parts + 1 - len(cuts))
    lo, hi = max(lengths, default=0), sum(lengths)
    while lo < hi:
        mid = (lo + hi) // 2
        if boundaries(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return boundaries(lo)


class _AllToAll(torch.autograd.Function):
    """Rows [sum(send), ...] -> [sum(recv), ...]: send[j] rows to rank j, recv[j] rows from it; backward is
    the reverse exchange."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad.contiguous(), ctx.recv, ctx.send, ctx.group), None, None, None


@dataclass
class Exchange:
    """One rank's part of moving rows between two layouts in one all-to-all: the rows `gather` of the input are
    sent (grouped by destination rank, send[j] to rank j), the rows received (grouped by source rank, recv[j]
    from rank j) land at rows `scatter` of an output of `length` rows; rows nothing lands on are 0."""

    gather: torch.Tensor  # [sum(send)] long, on the device
    scatter: torch.Tensor  # [sum(recv)] long, on the device
    send: list[int]
    recv: list[int]
    length: int

    @torch.compiler.disable  # a collective with host-side split sizes: opaque to the compiler
    def __call__(self, x: torch.Tensor, group) -> torch.Tensor:
        got = _AllToAll.apply(x.index_select(0, self.gather), self.send, self.recv, group)
        return x.new_zeros((self.length, *x.shape[1:])).index_copy(0, self.scatter, got)

    def reverse(self, length: int) -> "Exchange":
        """The way back, to an output of `length` rows (the forward's input)."""
        return Exchange(self.scatter, self.gather, self.recv, self.send, length)

    def to(self, device) -> "Exchange":
        return Exchange(self.gather.to(device), self.scatter.to(device), self.send, self.recv, self.length)


def exchange_plan(src_rank, src_row, dst_rank, dst_row, rank: int, size: int, length: int) -> Exchange:
    """Rank `rank`'s Exchange for moving items whose place is given by four [n] long tensors (host): from row
    src_row of rank src_rank to row dst_row of rank dst_rank, into outputs of `length` rows. Every rank computes
    the same order: a sender sends its items for each destination in destination-row order, which is the order
    the destination expects them from that sender."""
    big = int(max(src_row.max(), dst_row.max())) + 1 if len(src_row) else 1
    out = torch.argsort(dst_rank * big + dst_row)
    out = out[src_rank[out] == rank]
    into = torch.argsort(src_rank * big + dst_row)
    into = into[dst_rank[into] == rank]
    return Exchange(src_row[out], dst_row[into], torch.bincount(dst_rank[out], minlength=size).tolist(),
                    torch.bincount(src_rank[into], minlength=size).tolist(), length)
