"""What the padding of a packed micro-batch costs in attention: forward+backward of every attention kind, through
the model's attention layer (VarlenAttention), for one micro-batch packed three ways:

  no padding   the samples alone (budget = their tokens): the floor
  padding now  the tail in no self-attention segment, cut off before the kernel (stdit/packing.py)
  before       the same batch with the padding one segment of every kind, counted in max_seqlen (the old layout)

    python benchmarks/bench_padding.py                       # CPU, reference kernel, 4096 tokens, ~50 % padding
    python benchmarks/bench_padding.py --device cuda --budget 32768 --heads 16 --head-dim 72

Segments and max_seqlen are printed with the times; 'scores' counts score-matrix entries (len_q * len_k summed
over segments) of one head.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from stdit.models.attention import VarlenAttention  # noqa: E402
from stdit.packing import pack  # noqa: E402

# latent clips (T, H, W) at patch (1, 2, 2): 512 + 512 + 512 + 256 + 128 + 128 = 2048 tokens
SHAPES = [(8, 16, 16), (8, 16, 16), (4, 16, 32), (1, 32, 32), (2, 16, 16), (1, 16, 32)]
PATCH = (1, 2, 2)


def one_segment_padding(b):
    """The layout before: the padding one segment of spatial, temporal and full attention, counted in max_*."""
    L = b.tokens.shape[0]
    pad = L - b.num_real_tokens
    cus = ("cu_spatial", "cu_temporal", "cu_full")
    grown = {k: torch.cat([getattr(b, k), getattr(b, k).new_tensor([L])]) for k in cus}
    maxes = {k: max(getattr(b, k), pad) for k in ("max_spatial", "max_temporal", "max_full")}
    return dataclasses.replace(b, **grown, **maxes, num_real_tokens=L)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_kind(layer, b, kind, heads, head_dim, device, dtype, warmup, iters) -> float:
    """Median milliseconds of one forward+backward of attention `kind` over batch b."""
    g = torch.Generator().manual_seed(0)
    L, S = b.tokens.shape[0], b.text.shape[0]
    q = torch.randn(L, heads, head_dim, generator=g).to(device, dtype).requires_grad_()
    n_kv = S if kind == "cross" else L
    k, v = (torch.randn(n_kv, heads, head_dim, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    grad = torch.randn_like(q)
    seg = b.segments(kind)
    times = []
    for i in range(warmup + iters):
        sync(device)
        start = time.perf_counter()
        layer(q, k, v, seg).backward(grad)
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def scores(seg, L: int) -> int:
    n = L if seg.tokens is None else seg.tokens  # rows past `tokens` never reach the kernel
    lq, lk = seg.cu_q.diff().long(), seg.cu_k.diff().long()
    assert int(seg.cu_q[-1]) <= n
    return int((lq * lk).sum())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="reference", help="attention backend (auto | flash_attn | ...)")
    p.add_argument("--budget", type=int, default=4096, help="micro-batch tokens (the samples hold 2048 x scale)")
    p.add_argument("--scale", type=int, default=1, help="repeat the sample list this many times")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SHAPES * args.scale
    videos = [torch.zeros(1, *s) for s in shapes]
    texts = [torch.zeros(args.text_tokens, 8) for _ in shapes]
    real = sum(t * (h // 2) * (w // 2) for t, h, w in shapes)
    layouts = {"no padding": pack(videos, texts, [8.0] * len(shapes), PATCH, real)}
    layouts["padding now"] = pack(videos, texts, [8.0] * len(shapes), PATCH, args.budget)
    layouts["before"] = one_segment_padding(layouts["padding now"])
    layer = VarlenAttention(args.backend)
    print(f"device={device} backend={args.backend} dtype={dtype} heads={args.heads} head_dim={args.head_dim}; "
          f"{len(shapes)} samples, {real} real tokens in a budget of {args.budget} "
          f"({1 - real / args.budget:.0%} padding)")
    print(f"{'layout':<13}{'kind':<10}{'segments':>9}{'max_q':>7}{'scores':>12}{'fwd+bwd ms':>12}")
    totals = {}
    for name, b in layouts.items():
        b = b.to(device)
        total = 0.0
        for kind in ("spatial", "temporal", "full", "cross"):
            seg = b.segments(kind)
            ms = time_kind(layer, b, kind, args.heads, args.head_dim, device, dtype, args.warmup, args.iters)
            total += ms
            print(f"{name:<13}{kind:<10}{len(seg.cu_q) - 1:>9}{seg.max_q:>7}{scores(seg, b.tokens.shape[0]):>12,}"
                  f"{ms:>12.2f}")
        totals[name] = total
    print(f"attention fwd+bwd, all four kinds: no padding {totals['no padding']:.1f} ms, padding now "
          f"{totals['padding now']:.1f} ms, before {totals['before']:.1f} ms; the padding's share: now "
          f"{totals['padding now'] - totals['no padding']:+.1f} ms, before "
          f"{totals['before'] - totals['no padding']:+.1f} ms")


if __name__ == "__main__":
    main()
