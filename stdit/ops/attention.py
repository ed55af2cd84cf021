"""Varlen (packed) attention with a ladder of backends.

Tokens of many segments lie back to back in one [N, H, D] tensor; `cu_seqlens` holds the segment offsets and
segment i of q attends only to segment i of k. Backends, fastest first:

* flash_attn   - `flash_attn.flash_attn_varlen_func` (CUDA, fp16/bf16)
* torch_varlen - `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16, newer torch)
* dense        - segments as runs of equal length, one batched SDPA on [count, H, len, D] views per run; any
                 device and dtype. The runs come host-side with the batch (packing computes them), so the step
                 reads nothing back from the device; without them they are read from cu_seqlens (a device sync)
* reference    - plain torch SDPA over segments grouped by length (found on the host: a device sync); any device
                 and dtype, exact

"auto" picks, per attention kind, the first one that can run on the device with the input dtype: for temporal
attention with its runs given, dense (its columns are 1-17 tokens: in a varlen kernel ~1.6% of the useful FLOPs
but most of the tile work; dense batches each run of equal columns in one SDPA call, which picks its own kernel
for that fixed shape; benchmarks/gpu_bench.sh times each); for every other kind flash_attn -> torch_varlen ->
reference.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import math

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "torch_varlen", "dense", "reference")
LADDER = ("flash_attn", "torch_varlen", "reference")  # auto, for kinds without their own
KIND_LADDER = {"temporal": ("dense",)}  # auto, for these kinds when the segments come with their runs
_FAST_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _import(name: str):
    """The kernel function of a fast backend, or None when it cannot be imported (probed once)."""
    try:
        if name == "flash_attn":
            from flash_attn import flash_attn_varlen_func
            return flash_attn_varlen_func
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn
    except Exception:  # a broken flash-attn build raises more than ImportError
        return None


@functools.lru_cache(maxsize=None)
def _varlen_params(fn) -> frozenset:
    """Keyword names of torch's varlen_attn, whose signature changed between torch releases."""
    return frozenset(inspect.signature(fn).parameters)


def _unavailable(name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot run on `device`, or None if it can."""
    if name in ("dense", "reference"):
        return None
    if name == "flash_attn":
        need = "flash-attn needs a CUDA device and the package (pip install 'stdit[flash]')"
    else:
        need = f"torch.nn.attention.varlen needs a CUDA device and torch>=2.9 (this is torch {torch.__version__})"
    if device.type != "cuda" or not torch.cuda.is_available() or _import(name) is None:
        return need
    if torch.cuda.get_device_capability(device) < (8, 0):  # both kernels are FlashAttention-2: Ampere or newer
        return f"{name} needs a GPU of compute capability 8.0 or newer"
    return None


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on `device`, in ladder order."""
    device = torch.device(device)
    return [b for b in BACKENDS if _unavailable(b, device) is None]


def resolve_backend(name: str, device, dtype=None, kind: str | None = None) -> str:
    """The backend to use: "auto" -> the first available one supporting `dtype` on the ladder of attention `kind`
    (KIND_LADDER, then LADDER); a named one must be available."""
    device = torch.device(device)
    if name == "auto":
        for b in KIND_LADDER.get(kind, ()) + LADDER:
            if _unavailable(b, device) is None and (b in ("dense", "reference") or dtype is None
                                                    or dtype in _FAST_DTYPES):
                return b
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend={name!r} is unknown; set it to auto or one of {list(BACKENDS)}")
    reason = _unavailable(name, device)
    if reason is not None:
        raise ValueError(f"model.attention_backend={name!r} is not available on {device}: {reason}. "
                         f"Available here: {available_backends(device)}. "
                         f"Set model.attention_backend=auto or one of those.")
    return name


def _flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    fn = _import("flash_attn")
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scale, causal=causal)


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    fn = _import("torch_varlen")
    params, kw = _varlen_params(fn), {}
    if "window_size" in params:  # torch >= 2.12: causal is a (left, right) window, right=0 means no future
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    elif causal:
        kw["is_causal"] = True
    if "scale" in params:
        kw["scale"] = scale
    else:  # no scale kwarg: the kernel uses 1/sqrt(D), so fold the ratio into q
        q = q * (scale * math.sqrt(q.shape[-1]))
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def _reference(q, k, v, cu_q, cu_k, causal, scale):
    """Exact varlen attention: one batched SDPA per distinct (len_q, len_k) pair, no padding."""
    H, D = q.shape[1:]
    k, v = k.to(q.dtype), v.to(q.dtype)
    cu_q, cu_k = cu_q.cpu().long(), cu_k.cpu().long()  # one transfer: the grouping is host-side bookkeeping
    len_q, len_k = cu_q.diff(), cu_k.diff()
    pairs, group = torch.unique(torch.stack([len_q, len_k], 1), dim=0, return_inverse=True)
    order = torch.argsort(group, stable=True)  # segments sorted by group, so each group is one slice
    counts = torch.bincount(group, minlength=len(pairs)).tolist()
    jobs, q_idx, k_idx = [], [], []
    for (lq, lk), segs in zip(pairs.tolist(), order.split(counts)):
        if lq == 0 or lk == 0:  # nothing to compute; a query with no keys gets output 0
            continue
        jobs.append((len(segs), lq, lk))
        q_idx.append((cu_q[segs, None] + torch.arange(lq)).flatten())
        k_idx.append((cu_k[segs, None] + torch.arange(lk)).flatten())
    out = q.new_zeros(q.shape)
    if not jobs:  # an empty index_copy still links q, k, v to the output, so autograd sees them used
        return out.index_copy(0, torch.zeros(0, dtype=torch.long, device=q.device), q[:0] + k[:0] + v[:0])
    parts = torch.cat(q_idx + k_idx).to(q.device).split([t.numel() for t in q_idx + k_idx])
    q_idx, k_idx = parts[:len(jobs)], parts[len(jobs):]
    outs = []
    for (n, lq, lk), qi, ki in zip(jobs, q_idx, k_idx):
        qs = q.index_select(0, qi).view(n, lq, H, D).transpose(1, 2)
        ks = k.index_select(0, ki).view(n, lk, H, D).transpose(1, 2)
        vs = v.index_select(0, ki).view(n, lk, H, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        outs.append(o.transpose(1, 2).reshape(n * lq, H, D))
    # out-of-place, so autograd flows to q, k, v; .to: SDPA may have run in an autocast dtype
    return out.index_copy(0, torch.cat(q_idx), torch.cat(outs).to(q.dtype))


def length_runs(len_q: list[int], len_k: list[int] | None = None) -> torch.Tensor:
    """Segments as runs of consecutive segments of equal (len_q, len_k): a CPU long tensor [runs, 3] of rows
    (len_q, len_k, count). A tensor, not a tuple, so that torch.compile sees a graph input of dynamic size and
    does not specialise (recompile) on the values, which change every step; kernels read it with .tolist(), a
    host read of host memory."""
    runs = []
    for key, group in itertools.groupby(zip(len_q, len_q if len_k is None else len_k)):
        runs.append((*key, sum(1 for _ in group)))
    return torch.tensor(runs, dtype=torch.long).view(-1, 3)


def _dense(q, k, v, runs, causal, scale):
    """Each run of `count` equal segments is one SDPA on [count, H, len, D] views of q, k, v: no gather, no
    padding, no host read. Outputs follow the segments' order, which is q's row order."""
    H, D = q.shape[1:]
    k, v = k.to(q.dtype), v.to(q.dtype)
    runs = runs.tolist()
    rows_q, rows_k = [n * lq for lq, _, n in runs], [n * lk for _, lk, n in runs]
    if sum(rows_q) != q.shape[0] or sum(rows_k) != k.shape[0]:
        raise ValueError(f"the segments' runs cover {sum(rows_q)} query / {sum(rows_k)} key rows, but q has "
                         f"{q.shape[0]} and k {k.shape[0]}")
    outs = []
    for (lq, lk, n), qs, ks, vs in zip(runs, q.split(rows_q), k.split(rows_k), v.split(rows_k)):
        if lq == 0:
            continue
        if lk == 0:  # a query with no keys gets output 0 (as in the reference kernel)
            outs.append(qs.new_zeros(qs.shape))
            continue
        o = F.scaled_dot_product_attention(*(t.reshape(n, -1, H, D).transpose(1, 2) for t in (qs, ks, vs)),
                                           is_causal=causal, scale=scale)
        outs.append(o.transpose(1, 2).reshape(n * lq, H, D))
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    if not any(lq and lk for lq, lk, _ in runs):  # no SDPA ran: link q, k, v to the output for autograd
        out = out + (q[:0].sum() + k[:0].sum() + v[:0].sum())
    return out.to(q.dtype)  # SDPA may have run in an autocast dtype


_KERNELS = {"flash_attn": _flash_attn, "torch_varlen": _torch_varlen}


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                     causal: bool = False, backend: str = "auto", scale: float | None = None,
                     runs: tuple | None = None, kind: str | None = None) -> torch.Tensor:
    """Attention of q [Nq, H, D] over k, v [Nk, H, D] within segments given by int32 cu_seqlens [S+1].

    `runs` (optional, host-side): the same segments as runs ((len_q, len_k, count), ...) (length_runs), which the
    dense backend reads instead of cu_seqlens; `kind` (spatial | temporal | full | cross) picks auto's ladder,
    and counts only where the runs are given (dense without them would wait for the device)."""
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} "
                         f"must describe the same number of segments")
    # causal is top-left within a segment, which only agrees across kernels when len_q == len_k
    same = cu_seqlens_q is cu_seqlens_k  # the usual self-attention call: skip the comparison (a GPU sync)
    if causal and not same and not torch.equal(cu_seqlens_q, cu_seqlens_k.to(cu_seqlens_q.device)):
        raise ValueError("causal varlen attention needs equal q and k segment lengths (self-attention)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    device, kernel_dtype = q.device, q.dtype
    if q.dtype not in _FAST_DTYPES:
        # fast kernels have no fp32: under autocast use its dtype; a named fast backend gets bf16; auto falls back
        if torch.is_autocast_enabled(device.type):
            kernel_dtype = torch.get_autocast_dtype(device.type)
        elif backend != "auto":
            kernel_dtype = torch.bfloat16
    name = resolve_backend(backend, device, kernel_dtype, kind if runs is not None else None)
    if name == "dense":
        if runs is None:  # one host read of the boundaries (a device sync on GPU)
            runs = length_runs(cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist())
        if causal and bool((runs[:, 0] != runs[:, 1]).any()):
            raise ValueError("causal varlen attention needs equal q and k segment lengths (self-attention)")
        return _dense(q, k, v, runs, causal, scale)
    if name == "reference":
        return _reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)
    if kernel_dtype not in _FAST_DTYPES:
        kernel_dtype = torch.bfloat16
    cu_q = cu_seqlens_q.to(device=device, dtype=torch.int32)
    cu_k = cu_seqlens_k.to(device=device, dtype=torch.int32)
    out = _KERNELS[name](q.to(kernel_dtype), k.to(kernel_dtype), v.to(kernel_dtype), cu_q, cu_k,
                         int(max_seqlen_q), int(max_seqlen_k), causal, scale)
    return out.to(q.dtype)
