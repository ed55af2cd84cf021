"""Attention layers over a packed token sequence. The kernel itself is a module (`VarlenAttention`) so that
context parallelism can wrap it from outside with its all-to-alls."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stdit.models.layers import RMSNorm, apply_rope
from stdit.ops import varlen_attention
from stdit.packing import Segments


class VarlenAttention(nn.Module):
    """The kernel call: gather into segment order (temporal), one varlen attention, scatter back.

    q: [Lq, H, D], k/v: [Lk, H, D]. The permutation happens here, where the whole sequence is present. Rows past
    `seg.tokens` (padding) are cut off before the kernel and get output 0: fast kernels leave rows outside every
    segment unwritten (forward and backward), so they must never reach one.
    With `recompute` (selective activation checkpointing) only the gathered real rows of q, k, v are kept for
    backward; the kernel's own saved tensors and its output are recomputed.
    """

    def __init__(self, backend: str = "auto", recompute: bool = False):
        super().__init__()
        self.backend, self.recompute = backend, recompute

    def forward(self, q, k, v, seg: Segments) -> torch.Tensor:
        L = q.shape[0]
        n = L if seg.tokens is None else seg.tokens  # padding is last, in segment order too: rows n..L-1
        if seg.perm is not None:
            q, k, v = q[seg.perm[:n]], k[seg.perm[:n]], v[seg.perm[:n]]
        elif n < L:
            q, k, v = q[:n], k[:n], v[:n]
        if self.recompute and torch.is_grad_enabled():
            out = checkpoint(self._kernel, q, k, v, seg, use_reentrant=False)
        else:
            out = self._kernel(q, k, v, seg)
        if n < L:
            out = F.pad(out, (0, 0, 0, 0, 0, L - n))
        return out[seg.inv] if seg.perm is not None else out

    def _kernel(self, q, k, v, seg: Segments) -> torch.Tensor:
        return varlen_attention(q, k, v, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k, causal=seg.causal,
                                backend=self.backend, runs=seg.runs, kind=seg.kind)


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK-norm and 3D RoPE; which tokens meet is decided by the Segments.

    qkv is laid out head-major ([H, 3, D] per token) so a column-parallel split keeps whole heads together.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, backend: str = "auto", recompute: bool = False):
        super().__init__()
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn = VarlenAttention(backend, recompute)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], seg: Segments) -> torch.Tensor:
        L = x.shape[0]
        q, k, v = self.qkv(x).view(L, -1, 3, self.head_dim).unbind(2)  # heads inferred: H / tp under TP
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        out = self.attn(q, k.to(q.dtype), v.to(q.dtype), seg)
        return self.proj(out.reshape(L, -1))


class CrossAttention(nn.Module):
    """Video tokens attend to their own caption's text tokens (one varlen segment pair per video)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, backend: str = "auto", recompute: bool = False):
        super().__init__()
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn = VarlenAttention(backend, recompute)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, seg: Segments) -> torch.Tensor:
        L, S = x.shape[0], text.shape[0]
        q = self.q_norm(self.q(x).view(L, -1, self.head_dim))
        k, v = self.kv(text).view(S, -1, 2, self.head_dim).unbind(2)
        out = self.attn(q, self.k_norm(k).to(q.dtype), v.to(q.dtype), seg)
        return self.proj(out.reshape(L, -1))
