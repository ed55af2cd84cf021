"""Temporal attention of a packed batch: the reference kernel (segments grouped on the host each call, the old
path of `auto` on CPU) against the dense backend (runs of equal columns from packing, one batched SDPA each).

    python benchmarks/bench_temporal.py                 # CPU: the demo recipe's shapes and an XL-like mix
    python benchmarks/bench_temporal.py --device cuda   # adds flash_attn / torch_varlen where they run

Forward + backward of the model's attention layer (gather into temporal order, kernel, scatter back) on random
q, k, v; the median of --steps runs after one warm-up. One `RESULT` line per (mix, dtype, backend).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from stdit.models.attention import VarlenAttention  # noqa: E402
from stdit.ops import available_backends  # noqa: E402
from stdit.packing import pack  # noqa: E402

# token frames, token grids (H', W') after 1x2x2 patches, the budget, heads and head dim
MIXES = {
    # recipes/tiny.yaml: 16..24 px, 1/4/8/16 frames (16-frame clips train as 8-frame windows), 2048 tokens, 4x16
    "tiny": ([1, 4, 8, 8], [(8, 8), (8, 12), (12, 8), (12, 12)], 2048, 4, 16),
    # recipes/scale/XL.yaml's buckets (256/448 px, 1/33/65 frames, 4x8x8 autoencoder), 15360 tokens, head dim 72
    "xl_like": ([1, 9, 17], [(16, 16), (16, 28)], 15360, 4, 72),
}


def fill(frames, sizes, budget, seed=0):
    """Shapes drawn uniformly from frames x sizes, first fit until 20 draws in a row do not fit."""
    g, grids, left, misses = torch.Generator().manual_seed(seed), [], budget, 0
    while misses < 20:
        t, (h, w) = frames[int(torch.randint(len(frames), (), generator=g))], \
            sizes[int(torch.randint(len(sizes), (), generator=g))]
        if t * h * w <= left:
            grids.append((t, h, w))
            left, misses = left - t * h * w, 0
        else:
            misses += 1
    return grids


def median_seconds(fn, steps):
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--causal", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    for mix, (frames, sizes, budget, heads, dim) in MIXES.items():
        grids = fill(frames, sizes, budget)
        videos = [torch.zeros(1, t, 2 * h, 2 * w) for t, h, w in grids]
        batch = pack(videos, [torch.zeros(1, 8)] * len(grids), [8.0] * len(grids), (1, 2, 2), budget).to(device)
        seg = batch.segments("temporal", causal=args.causal)
        L = batch.tokens.shape[0]
        for dtype in ("float32", "bf16_autocast"):
            for backend in available_backends(device):
                attn = VarlenAttention(backend)
                q, k, v = (torch.randn(L, heads, dim, device=device, requires_grad=True) for _ in "qkv")

                def step():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != "float32"):
                        out = attn(q, k, v, seg)
                    out.float().square().mean().backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                seconds = median_seconds(step, args.steps)
                print(f"RESULT bench=temporal mix={mix} dtype={dtype} backend={backend} tokens={batch.num_real_tokens} "
                      f"columns={seg.cu_q.shape[0] - 1} runs={len(seg.runs)} heads={heads} head_dim={dim} "
                      f"fwd_bwd_ms={seconds * 1e3:.2f}", flush=True)


if __name__ == "__main__":
    main()
