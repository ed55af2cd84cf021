"""Time forward+backward of varlen attention for every backend available on a device.

    python benchmarks/bench_attention.py                                  # small CPU defaults
    python benchmarks/bench_attention.py --device cuda --tokens 32768 --heads 16 --head-dim 72 --seg-len 1024

Segments are --seg-len tokens long (the last one takes the remainder); --ragged draws lengths in [1, 2*seg-len].
TFLOP/s counts the useful attention matmuls only: 4*Lq*Lk*D*H per segment forward (halved when causal), and
2.5x that for backward.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from stdit.ops import available_backends, varlen_attention  # noqa: E402


def segment_lengths(tokens: int, seg_len: int, ragged: bool, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lens, left = [], tokens
    while left > 0:
        n = int(torch.randint(1, 2 * seg_len + 1, (1,), generator=g)) if ragged else seg_len
        lens.append(min(n, left))
        left -= lens[-1]
    return lens


def attention_flops(lens: list[int], heads: int, head_dim: int, causal: bool) -> float:
    fwd = sum(4 * n * n * head_dim * heads for n in lens) * (0.5 if causal else 1.0)
    return 3.5 * fwd  # forward + backward (backward ~2.5x forward)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(backend, q, k, v, cu, max_len, causal, warmup, iters) -> float:
    """Mean milliseconds of one forward+backward."""
    grad = torch.randn_like(q)
    for i in range(warmup + iters):
        if i == warmup:
            sync(q.device)
            start = time.perf_counter()
        out = varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=causal, backend=backend)
        out.backward(grad)
    sync(q.device)
    return (time.perf_counter() - start) / iters * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seg-len", type=int, default=256)
    p.add_argument("--ragged", action="store_true", help="random segment lengths in [1, 2*seg-len]")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    lens = segment_lengths(args.tokens, args.seg_len, args.ragged)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(args.tokens, args.heads, args.head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    flops = attention_flops(lens, args.heads, args.head_dim, args.causal)
    print(f"device={device} dtype={dtype} tokens={args.tokens} segments={len(lens)} max_len={max(lens)} "
          f"heads={args.heads} head_dim={args.head_dim} causal={args.causal}")
    print(f"{'backend':<14}{'fwd+bwd ms':>12}{'TFLOP/s':>10}")
    for backend in available_backends(device):
        ms = bench(backend, q, k, v, cu, max(lens), args.causal, args.warmup, args.iters)
        print(f"{backend:<14}{ms:>12.3f}{flops / ms / 1e9:>10.3f}")


if __name__ == "__main__":
    main()
