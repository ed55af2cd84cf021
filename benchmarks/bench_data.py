"""Data path throughput: decoded frames/s and packed tokens/s, per loading worker.

    python benchmarks/bench_data.py                                   # makes its own clips (PyAV, H.264)
    python benchmarks/bench_data.py --shards "shards/shard-*.tar" --resolutions 256x256,256x448,448x256 \
        --frame-counts 1,17,33 --token-budget 16384 --workers 0,2,4

For each worker count it plans --steps steps with the look-ahead packing sampler (data.micro_batches), decodes
their samples (PyAV, resize, crop) through the trainer's loader and packs them, and prints frames/s and tokens/s
overall and per worker, the packing's padding fraction and the planning cost alone. Tokens are pixel patches of
--patch (no autoencoder), i.e. the packing work a pixel-space run does.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from stdit.config import load_config  # noqa: E402
from stdit.data.loader import StepSampler, build_dataset  # noqa: E402
from stdit.grid import token_grid  # noqa: E402
from stdit.packing import pack  # noqa: E402


def make_clips(folder: Path, count: int, seed: int = 0) -> None:
    """`count` H.264 clips of random length and size (moving gradients, so the codec has real work)."""
    import av
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = (int(x) for x in rng.choice([96, 128, 160], 2))
        frames = int(rng.integers(1, 40))
        with av.open(str(folder / f"clip{i:04d}.mp4"), mode="w") as c:
            s = c.add_stream("libx264", rate=Fraction(24))
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            yy, xx = np.mgrid[0:h, 0:w]
            for t in range(frames):
                img = np.stack([(xx + 3 * t) % 256, (yy + 2 * t) % 256, (xx + yy + t) % 256], -1).astype(np.uint8)
                c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            c.mux(s.encode())
        (folder / f"clip{i:04d}.txt").write_text(f"a gradient clip number {i}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", help="shard pattern (default: make --clips clips and shard them in a temp dir)")
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--resolutions", default="64x64,64x96,96x64")
    ap.add_argument("--frame-counts", default="1,8,16,32")
    ap.add_argument("--patch", default="1,8,8", help="pt,ph,pw of the pixel patch that makes a token")
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--lookahead", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--workers", default="0,1,2")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    pattern = args.shards
    if pattern is None:
        from stdit.data.ingest import shard
        src = Path(tmp.name) / "src"
        src.mkdir()
        make_clips(src, args.clips)
        shard(src, Path(tmp.name) / "shards", progress=False)
        pattern = f"{tmp.name}/shards/shard-*.tar"
    res = [[int(x) for x in r.split("x")] for r in args.resolutions.split(",")]
    counts = [int(t) for t in args.frame_counts.split(",")]
    patch = [int(p) for p in args.patch.split(",")]
    cfg = load_config(None, ["data.source=shards", f"data.shards=[{pattern}]", f"data.resolutions={res}",
                             f"data.frame_counts={counts}", f"model.patch_size={patch}",
                             f"data.token_budget={args.token_budget}", f"data.micro_batches={args.micro_batches}",
                             f"data.lookahead={args.lookahead}", "data.batch_size=1"])
    dataset = build_dataset(cfg.data, 0)
    grid = lambda shape: token_grid(shape, patch)  # noqa: E731
    print(f"{len(dataset)} samples from {pattern}; token budget {args.token_budget} x {args.micro_batches} "
          f"micro-batches per step, look-ahead {args.lookahead}")

    planner = StepSampler(dataset, cfg.data, 0, grid)
    start = time.perf_counter()
    plans = [planner.plan(s) for s in range(args.steps)]
    plan_s = time.perf_counter() - start
    capacity = args.steps * args.micro_batches * args.token_budget
    padding = 1 - sum(sum(p.tokens) for p in plans) / capacity
    print(f"planning: {plan_s / args.steps * 1e3:.2f} ms/step, padding {padding:.4f}")
    print(f"{'workers':>7} {'frames/s':>10} {'per worker':>10} {'tokens/s':>10} {'per worker':>10}")
    for workers in [int(w) for w in args.workers.split(",")]:
        sampler = StepSampler(dataset, cfg.data, 0, grid, workers)
        sampler.samples(0)  # start the workers outside the timing
        frames = tokens = 0
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            samples, plan = sampler.samples(step), sampler.plan(step)
            for b in plan.bins:
                batch = pack([samples[i].video for i in b], [torch.zeros(1, 4) for _ in b],
                             [samples[i].fps for i in b], patch, args.token_budget)
                tokens += batch.num_real_tokens
            frames += sum(s.video.shape[1] for s in samples)
        dt = time.perf_counter() - start
        sampler.close()
        per = max(workers, 1)
        print(f"{workers:>7} {frames / dt:>10.1f} {frames / dt / per:>10.1f} {tokens / dt:>10.0f} "
              f"{tokens / dt / per:>10.0f}")


if __name__ == "__main__":
    main()
