"""The GPU benchmark (issue 15, item 8): an STDiT-XL training step in bf16 on a packed micro-batch of mixed shapes,
with every attention backend that runs here, against the same tokens as a dense batch (one shape), with and
without torch.compile, and the attention kinds timed apart (each backend forced on every kind; `auto` is the
trainer's choice: dense temporal attention, the first varlen kernel for the other kinds; on a GPU temporal
attention also on the dense backend with each SDPA kernel forced). One `RESULT key=value ...` line per figure.

    benchmarks/gpu_bench.sh                  # on a GPU: XL sizes (recipes/model/XL.yaml), 8192-token batches
    python benchmarks/gpu_bench.py --tiny    # the same code paths with a tiny model on the CPU (CI runs this)

Without CUDA it runs --tiny by itself. A step is what the trainer does per micro-batch: forward under bf16
autocast, the flow loss, backward, the optimizer the trainer builds (fused AdamW on CUDA). MFU counts model FLOPs
(stdit/flops.py, real tokens only) against the GPU's bf16 peak. The dense batch holds samples of one shape
(9x16x16 latent tokens, a 33-frame 256 px clip), as many as the packed batch's real tokens hold, and no padding:
the tokens/s ratio packed / dense is what packing mixed shapes costs. --compile says how compiled blocks are
built (inductor on CUDA; off with --tiny, where tests/test_compile.py covers compilation).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
from stdit.config import ModelConfig  # noqa: E402
from stdit.flops import forward_flops, peak_flops  # noqa: E402
from stdit.models.attention import VarlenAttention  # noqa: E402
from stdit.models.stdit import build_model  # noqa: E402
from stdit.ops import available_backends  # noqa: E402
from stdit.packing import pack  # noqa: E402
from stdit.parallelize import apply_compile  # noqa: E402
from stdit.train import build_optimizer  # noqa: E402

# latent token grids at patch (1, 2, 2) of the XL recipe's buckets (256/448 px, 1/33/65 frames; 4x8x8 autoencoder)
XL_SHAPES = [(17, 16, 28), (17, 16, 16), (9, 16, 28), (9, 16, 16), (1, 16, 28), (1, 16, 16)]
TINY_SHAPES = [(5, 4, 8), (5, 4, 4), (3, 4, 8), (3, 4, 4), (1, 4, 8), (1, 4, 4)]


def result(**kv) -> None:
    print("RESULT " + " ".join(f"{k}={f'{v:.4g}' if isinstance(v, float) else v}" for k, v in kv.items()), flush=True)


def bench_config(tiny: bool) -> tuple[ModelConfig, int, list, int]:
    """(model config, text dim, token shapes, token budget): XL from recipes/model/XL.yaml, or tiny."""
    if tiny:
        return ModelConfig(in_channels=4, hidden_size=32, depth=2, num_heads=4), 16, TINY_SHAPES, 512
    xl = yaml.safe_load((ROOT / "recipes/model/XL.yaml").read_text())["model"]
    return ModelConfig(in_channels=4, **xl), 4096, XL_SHAPES, 8192  # T5-XXL width; XL.yaml's budget is 15360


def fill(shapes: list, budget: int) -> list:
    """Shapes taken in turn, largest first, while they fit the budget: a mixed micro-batch."""
    grids, left = [], budget
    for _ in range(64):
        fits = [g for g in shapes if math.prod(g) <= left]
        if not fits:
            break
        g = fits[len(grids) % len(fits)]
        grids.append(g)
        left -= math.prod(g)
    return grids


def make_batch(grids: list, budget: int, cfg: ModelConfig, text_dim: int, device, seed: int = 0):
    """A packed micro-batch of random latents and captions (8-64 text tokens), and its step inputs."""
    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = cfg.patch_size
    videos = [torch.randn(cfg.in_channels, t * pt, h * ph, w * pw, generator=g) for t, h, w in grids]
    texts = [torch.randn(int(torch.randint(8, 65, (), generator=g)), text_dim, generator=g) for _ in grids]
    batch = pack(videos, texts, [24.0] * len(grids), cfg.patch_size, budget).to(device)
    t = torch.rand(batch.frame_sample.shape[0], generator=g).to(device)
    return batch, t, [x.shape[0] for x in texts]


def time_it(fn, device, warmup: int, steps: int) -> float:
    """Median seconds of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(model, optimizer, batch, t, device):
    """One micro-batch as the trainer runs it: bf16 autocast on CUDA, flow loss, backward, optimizer step."""
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(batch.tokens, t, batch)
        loss = (pred.float() - batch.tokens).pow(2).mean(-1).mul(batch.loss_mask).sum() / batch.num_real_tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def set_backend(model, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, VarlenAttention):
            m.backend = backend


def bench_steps(model, optimizer, cfg, text_dim, batches, backends, device, args, compiled: str) -> None:
    peak = peak_flops(device)
    for backend in backends:
        set_backend(model, backend)
        rates = {}
        for kind, (batch, t, text_lens) in batches.items():
            seconds = time_it(train_step(model, optimizer, batch, t, device), device, args.warmup, args.steps)
            flops = 3 * forward_flops(cfg, text_dim, batch.grids, text_lens)
            rates[kind] = batch.num_real_tokens / seconds
            extra = {"mfu": flops / seconds / peak} if peak else {}
            result(bench="step", batch=kind, backend=backend, compile=compiled, samples=batch.num_samples,
                   tokens=batch.num_real_tokens, budget=batch.tokens.shape[0], step_s=seconds,
                   tokens_per_s=rates[kind], tflops=flops / seconds / 1e12, **extra)
        if "dense" in rates:
            result(bench="packed_vs_dense", backend=backend, compile=compiled, ratio=rates["packed"] / rates["dense"])


def bench_kinds(cfg, batch, text_lens, backends, device, args) -> None:
    """Forward + backward of each attention kind alone, through the model's attention layer, XL heads."""
    heads, dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    L, S = batch.tokens.shape[0], batch.text.shape[0]
    kinds = [("spatial", L), ("temporal", L), ("full", L), ("cross", S)]
    for backend in backends:
        attn = VarlenAttention(backend)
        for kind, kv_len in kinds:
            q = torch.randn(L, heads, dim, device=device, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(kv_len, heads, dim, device=device, dtype=dtype, requires_grad=True) for _ in "kv")
            seg = batch.segments(kind)

            def step():
                attn(q, k, v, seg).float().square().mean().backward()
            result(bench="attention", kind=kind, backend=backend, seconds=time_it(step, device, args.warmup,
                                                                                  args.steps),
                   max_q=seg.max_q, segments=seg.cu_q.shape[0] - 1)
    if device.type == "cuda":  # which SDPA kernel suits temporal columns (SDPA's own choice above: dense)
        bench_dense_kernels(heads, dim, dtype, batch.segments("temporal"), L, device, args)


def bench_dense_kernels(heads, dim, dtype, seg, L, device, args) -> None:
    """Temporal attention on the dense backend with each SDPA kernel forced: flash and memory-efficient pad a
    1-17-token column to their tiles, math does not (but writes the small score matrices)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    attn = VarlenAttention("dense")
    q, k, v = (torch.randn(L, heads, dim, device=device, dtype=dtype, requires_grad=True) for _ in "qkv")
    for kernel in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        def step():
            with sdpa_kernel(kernel):
                attn(q, k, v, seg).float().square().mean().backward()
        try:
            seconds = time_it(step, device, args.warmup, args.steps)
        except RuntimeError as e:  # a kernel that does not take this shape or dtype here
            result(bench="attention", kind="temporal", backend=f"dense_{kernel.name.lower()}", error=type(e).__name__)
            continue
        result(bench="attention", kind="temporal", backend=f"dense_{kernel.name.lower()}", seconds=seconds,
               max_q=seg.max_q, segments=seg.cu_q.shape[0] - 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (automatic without CUDA)")
    ap.add_argument("--budget", type=int, help="tokens per micro-batch (default: XL 8192, tiny 512)")
    ap.add_argument("--steps", type=int, help="timed steps per figure (default: 5, tiny 1)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default: 2, tiny 1)")
    ap.add_argument("--compile", default=None, help="inductor | aot_eager | eager | off (default: inductor on "
                                                    "CUDA, off with --tiny)")
    args = ap.parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    args.steps = args.steps or (1 if tiny else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    args.compile = args.compile or ("off" if tiny else "inductor")
    cfg, text_dim, shapes, budget = bench_config(tiny)
    budget = args.budget or budget
    backends = available_backends(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result(bench="setup", device=name.replace(" ", "_"), torch=torch.__version__, hidden=cfg.hidden_size,
           depth=cfg.depth, heads=cfg.num_heads, budget=budget, backends=",".join(backends))

    grids = fill(shapes, budget)
    packed = make_batch(grids, budget, cfg, text_dim, device)
    dense_shape = shapes[3]  # 9x16x16 (tiny: 3x4x4)
    n_dense = max(1, packed[0].num_real_tokens // math.prod(dense_shape))
    dense_budget = n_dense * math.prod(dense_shape)
    dense = make_batch([dense_shape] * n_dense, dense_budget, cfg, text_dim, device, seed=1)
    batches = {"packed": packed, "dense": dense}

    torch.manual_seed(0)
    model = build_model(cfg, text_dim).to(device)
    optimizer = build_optimizer(model, argparse.Namespace(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0))
    # auto: what the trainer runs (dense temporal attention, the first varlen kernel for the other kinds)
    bench_steps(model, optimizer, cfg, text_dim, batches, ["auto", *backends], device, args, "off")
    bench_kinds(cfg, packed[0], packed[2], backends, device, args)
    if args.compile != "off":
        apply_compile(model, backend=args.compile)
        start = time.perf_counter()
        train_step(model, optimizer, *packed[:2], device)()
        result(bench="compile", backend=args.compile, first_step_s=time.perf_counter() - start,
               graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"])
        bench_steps(model, optimizer, cfg, text_dim, batches, ["auto"], device, args, args.compile)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        result(bench="compile", backend=args.compile, graphs_after=graphs)
    if device.type == "cuda":
        result(bench="memory", max_allocated_gib=torch.cuda.max_memory_allocated() / 2 ** 30)


if __name__ == "__main__":
    main()
