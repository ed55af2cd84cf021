"""The estimator behind `stdit plan`: parameters, model FLOPs and memory per GPU of a recipe's model and layout,
from formulas, before any GPU is used (the command itself: stdit/commands/plan.py).

Memory per GPU (bytes; Ψ = parameters this rank holds after tensor and pipeline splitting, N = dp * cp, the ranks
ZeRO partitions over):
- model state, Rajbhandari et al. 2020 (ZeRO), mixed-precision Adam: bf16 weights 2Ψ, bf16 gradients 2Ψ, fp32
  master weights + Adam moments 12Ψ; ZeRO-1 divides the 12Ψ by N, ZeRO-2 also the gradients, ZeRO-3 also the
  weights. fp32 training (CPU; one CUDA process without DeepSpeed keeps fp32 weights under autocast): weights 4Ψ,
  gradients 4Ψ, Adam moments 8Ψ, plus a 4Ψ fp32 master copy where DeepSpeed's ZeRO optimizer makes one.
  The trainer's EMA adds 4Ψ (its shard under ZeRO-3). Frozen encoders (text, autoencoder) are held whole, fp32,
  on every GPU; with cached latents on none (the trainer keeps the text encoder on the CPU, where it encodes the
  empty caption, and loads the autoencoder only to decode the end-of-run samples).
- activations, counted per block as Korthikanti et al. 2022 count them for GPT ("Reducing Activation
  Recomputation in Large Transformer Models", sec. 4): the tensors autograd keeps for backward, per token, in
  units of the hidden size h (2 bytes each in bf16, 4 in fp32); parts inside the tensor-parallel region divide by
  tp, everything divides by cp (Ulysses). See `block_activations` for the count; `recompute` modes follow
  model.activation_checkpointing. A pipeline stage holds pp micro-batches in flight (1F1B), of its blocks.
- attention workspace: the largest transient of one attention call (the reference kernel gathers q, k, v into
  segment order; flash-attn works in on-chip tiles).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from parallel.dims import ParallelDims
from stdit.config import Config, ConfigError, ParallelConfig, sample_token_grids, validate_layout
from stdit.flops import forward_flops
from stdit.models.stdit import build_model
from stdit.parallelize import TP_STYLES

GIB = 2 ** 30
HEADROOM = 0.9  # a layout fits when the estimate is below 90% of the GPU: CUDA context, NCCL buffers, fragmentation


# ----------------------------------------------------------------------------------------------------------
# Parameters (counted on a model built on the meta device: no memory, any size)
# ----------------------------------------------------------------------------------------------------------

def text_dim_and_params(cfg: Config) -> tuple[int, int]:
    """Width and parameter count of the frozen caption encoder the config asks for."""
    import transformers as tf

    from stdit.models.text import _random_model, build_tokenizer
    with torch.device("meta"):
        if cfg.text.path is not None:
            from pathlib import Path
            if not (Path(cfg.text.path) / "config.json").is_file():
                raise ConfigError(f"text.path={cfg.text.path}: no config.json there; the plan reads the text "
                                  "encoder's size from it (the weights are not needed)")
            config = tf.AutoConfig.from_pretrained(cfg.text.path, local_files_only=True)
            model = (tf.T5EncoderModel if cfg.text.kind == "t5" else tf.CLIPTextModel)(config)
        else:
            t = cfg.text
            model = _random_model(t.kind, t.hidden_size, t.num_layers, t.num_heads, t.ff_size, t.max_length,
                                  build_tokenizer(t.tokenizer))
    return model.config.hidden_size, sum(p.numel() for p in model.parameters())


def vae_params(cfg: Config) -> int:
    """Parameters of the frozen autoencoder (model.vae): it encodes clips on the fly, or with cached latents
    decodes the end-of-run samples."""
    if cfg.model.vae is None:
        return 0
    from stdit.config import vae_config_of
    from stdit.models.vae import VideoVAE
    with torch.device("meta"):
        return sum(p.numel() for p in VideoVAE(vae_config_of(cfg.model.vae)).parameters())


def _tp_split(name: str) -> bool:
    """Whether tensor parallelism splits this parameter: a Linear named in the block's TP styles (a row Linear's
    bias is whole on every rank)."""
    module, _, kind = name.rpartition(".")
    return any(module.endswith(suffix) and (style == "column" or kind == "weight")
               for suffix, style in TP_STYLES.items())


def rank_params(model: torch.nn.Module, depth: int, tp: int, pp: int) -> int:
    """Parameters of the busiest rank: its tensor shard of the first or last pipeline stage (stage 0 holds the
    embedders, the last the final layer, blocks are dealt evenly as DeepSpeed's type:BlockPipe partition does)."""
    per_stage = math.ceil(depth / pp)
    first, last = 0, 0
    for name, p in model.named_parameters():
        n = p.numel() // tp if _tp_split(name) else p.numel()
        if pp == 1:
            first += n
        elif name.startswith("blocks."):
            block = int(name.split(".")[1])
            first += n if block < per_stage else 0
            last += n if block >= depth - per_stage else 0
        elif name.startswith("final_layer."):
            last += n
        else:
            first += n
    return max(first, last)


# ----------------------------------------------------------------------------------------------------------
# Token shapes and FLOPs
# ----------------------------------------------------------------------------------------------------------

def mean_sample_tokens(cfg: Config) -> float:
    """Tokens of the mean sample, every (frame count, resolution) of data.* weighted alike (the estimator's
    assumption about the mix)."""
    tokens = [math.prod(g) for g in sample_token_grids(cfg)]
    return sum(tokens) / len(tokens)


def flops(cfg: Config, text_dim: int) -> dict:
    """Model FLOPs (forward + backward = 3x forward, recomputation not counted) per token and per step."""
    grids, text = sample_token_grids(cfg), cfg.text.max_length
    tokens = [math.prod(g) for g in grids]
    per_token = 3 * sum(forward_flops(cfg.model, text_dim, [g], [text]) for g in grids) / sum(tokens)
    mean_tokens = mean_sample_tokens(cfg)
    if cfg.data.micro_batches > 0:
        step_tokens = cfg.data.micro_batches * cfg.data.token_budget
    else:
        step_tokens = cfg.data.batch_size * mean_tokens
    return {"per_token": per_token, "tokens_per_step": step_tokens, "per_step": per_token * step_tokens,
            "mean_sample_tokens": mean_tokens}


# ----------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------

def kernel_saves(backend: str) -> tuple[int, int]:
    """What one attention kernel keeps beyond its q, k, v inputs, per query token in units of h:
    (self-attention, cross-attention). flash-attn keeps its output (and a per-head log-sum-exp, not counted);
    the reference kernel also keeps its gathered copies of q, k, v (cross: of q only; k, v are text tokens)."""
    return (1, 1) if backend == "flash" else (4, 2)


def block_activations(cfg: Config, tp: int, backend: str, recompute: str) -> tuple[float, float]:
    """(per video token, per text token) elements kept for backward by one block, counted from its code:

    self-attention: LayerNorm input 1, modulate (normed x, 1 + scale) 2, qkv input 1, gate and branch output 2
      [replicated: 6]; qkv output 3, q/k RMSNorm outputs 2, q/k after RoPE 2, proj input 1, kernel k [/ tp]
    cross-attention: q input 1 [replicated]; q output 1, q-norm output 1, proj input 1, kernel c [/ tp];
      per text token: kv input 1 [replicated]; kv output 2, k-norm output 1, (reference) k, v copies 2 [/ tp]
    MLP: LayerNorm input 1, modulate 2, fc1 input 1, gate and output 2 [replicated: 6]; fc1 output r, GELU
      output r [/ tp], r = mlp_ratio
    `selective` drops the kernels' own saves (k, c, the text copies); `full` keeps only the block input (1).
    """
    m = cfg.model
    if recompute == "full":
        return 1.0, 0.0
    k, c = (0, 0) if recompute == "selective" else kernel_saves(backend)
    text_copies = 0 if recompute == "selective" or backend == "flash" else 2
    attentions = 2 if m.attention == "factorized" else 1
    replicated = attentions * 6 + 1 + 6
    split = attentions * (8 + k) + (3 + c) + 2 * m.mlp_ratio
    return replicated + split / tp, 1 + (3 + text_copies) / tp


OUTSIDE_BLOCKS = 5  # x_embedder output 1; final layer: LayerNorm input 1, modulate 2, linear input 1


def activation_bytes(cfg: Config, layout: ParallelDims, device: str) -> dict:
    """Activation memory of the busiest rank (bytes) for one micro-batch of data.token_budget tokens."""
    m, h = cfg.model, cfg.model.hidden_size
    backend = "flash" if device == "cuda" and m.attention_backend in ("auto", "flash_attn", "torch_varlen") \
        else "reference"
    elem = 2 if device == "cuda" else 4
    tokens = cfg.data.token_budget / layout.cp
    samples = max(1.0, cfg.data.token_budget / mean_sample_tokens(cfg))  # per micro-batch
    text_tokens = samples * cfg.text.max_length / layout.cp
    per_token, per_text = block_activations(cfg, layout.tp, backend, m.activation_checkpointing)
    blocks = math.ceil(m.depth / layout.pp)
    in_flight = layout.pp  # 1F1B: the first stage holds up to pp micro-batches before its first backward
    kept = blocks * (per_token * tokens + per_text * text_tokens) * h * elem
    recompute = 0.0
    if m.activation_checkpointing == "full":  # backward recomputes one block at a time, keeping all of it
        full_tok, full_text = block_activations(cfg, layout.tp, backend, "none")
        recompute = (full_tok * tokens + full_text * text_tokens) * h * elem
    heads = m.num_heads / layout.tp
    small = tokens * (m.hidden_size // m.num_heads + (2 if m.attention == "factorized" else 1) * heads) * 4
    outside = OUTSIDE_BLOCKS * tokens * h * elem + small  # + RoPE cos/sin, per-head log-sum-exp (fp32)
    workspace = 0.0 if backend == "flash" else 3 * tokens * h / layout.tp * elem
    return {"activations": in_flight * kept + outside, "recompute": recompute, "workspace": workspace,
            "backend": backend}


# ----------------------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------------------

def state_bytes(psi: int, layout: ParallelDims, device: str, distributed: bool) -> dict:
    """Weights, gradients, optimizer state and EMA of one rank holding psi parameters (ZeRO paper's model)."""
    n = layout.dp * layout.cp
    z = layout.zero
    mixed = device == "cuda" and distributed  # DeepSpeed bf16: bf16 weights and grads, fp32 master copy
    w, g = (2, 2) if mixed else (4, 4)
    opt = 8 + (4 if mixed or z >= 1 else 0)  # Adam moments (+ the fp32 master copy)
    return {"weights": w * psi / (n if z >= 3 else 1), "gradients": g * psi / (n if z >= 2 else 1),
            "optimizer": opt * psi / (n if z >= 1 else 1), "ema": 4 * psi / (n if z >= 3 else 1)}


class Estimator:
    """Counts for one config: parameters once, then memory for any layout."""

    def __init__(self, cfg: Config, device: str = "cuda"):
        self.cfg, self.device = cfg, device
        self.text_dim, self.text_params = text_dim_and_params(cfg)
        with torch.device("meta"):
            self.model = build_model(cfg.model, self.text_dim)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.frozen = self.text_params + vae_params(cfg)
        self.frozen_on_gpu = 0 if cfg.data.cached else self.frozen  # see the module docstring
        self.flops = flops(cfg, self.text_dim)

    def memory(self, layout: ParallelDims) -> dict:
        """Bytes per GPU by part, and their total."""
        world = layout.world_size
        psi = rank_params(self.model, self.cfg.model.depth, layout.tp, layout.pp)
        parts = state_bytes(psi, layout, self.device, world > 1 or layout.zero > 0)
        parts["frozen encoders"] = 4 * self.frozen_on_gpu
        act = activation_bytes(self.cfg, layout, self.device)
        parts["activations"], parts["attention workspace"] = act["activations"], act["workspace"]
        if act["recompute"]:
            parts["recomputed block"] = act["recompute"]
        return {"parts": parts, "total": sum(parts.values()), "rank_params": psi, "backend": act["backend"]}

    def layouts(self, world: int) -> list[ParallelDims]:
        """Every layout of `world` processes the trainer accepts (config.validate_layout, the trainer's own check),
        with tp * cp within a node of 8 GPUs."""
        out = []
        for tp in (1, 2, 4, 8):
            for cp in (1, 2, 4, 8):
                if tp * cp > 8:
                    continue
                for pp in (1, 2, 4, 8, 16):
                    for zero in (0, 1, 2, 3):
                        cfg = dataclasses.replace(self.cfg, parallel=ParallelConfig(tp, pp, cp, zero))
                        try:
                            out.append(layout_of(cfg, world))
                        except ConfigError:
                            continue
        return out


def layout_of(cfg: Config, world: int) -> ParallelDims:
    """The config's layout on `world` processes; ConfigError names the keys that do not fit."""
    return validate_layout(cfg, world)


def _fmt(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def report(estimator: Estimator, layout: ParallelDims, gpu_mem: float | None) -> str:
    """The human-readable estimate of one layout (what `stdit plan` prints)."""
    cfg, f = estimator.cfg, estimator.flops
    mem = estimator.memory(layout)
    world = layout.world_size
    m, recompute = cfg.model, cfg.model.activation_checkpointing
    model = (f"model: {estimator.params:,} parameters ({_fmt(estimator.params)}), depth {m.depth}, hidden "
             f"{m.hidden_size}, {m.attention} attention; frozen encoders {_fmt(estimator.frozen)} (text "
             f"{_fmt(estimator.text_params)}, autoencoder {_fmt(estimator.frozen - estimator.text_params)}"
             + ("; cached latents: the text encoder stays on the CPU, the autoencoder decodes the end-of-run samples)"
                if cfg.data.cached else ")"))
    flop = (f"model FLOPs (forward + backward): {_fmt(f['per_token'])} per token, {_fmt(f['per_step'])} per step of "
            f"{f['tokens_per_step']:,.0f} tokens ({_fmt(f['per_step'] / world)} per GPU)")
    if recompute == "full":
        flop += " (+1/3 recomputed with full checkpointing)"
    where = (f"layout {layout.describe()} on {world} {estimator.device.upper()} process(es); the busiest rank holds "
             f"{mem['rank_params']:,} parameters; {cfg.data.token_budget} tokens per micro-batch, activation "
             f"checkpointing {recompute}, {mem['backend']} attention kernel")
    lines = [model, flop, where, "memory per GPU:"]
    for name, b in mem["parts"].items():
        lines.append(f"  {name:<20} {b / GIB:10.3f} GiB")
    lines.append(f"  {'total':<20} {mem['total'] / GIB:10.3f} GiB")
    if gpu_mem:
        ok = mem["total"] <= HEADROOM * gpu_mem * GIB
        lines.append(f"{'fits' if ok else 'does NOT fit'} in {gpu_mem:g} GiB (limit {HEADROOM:.0%} of it)")
    return "\n".join(lines)


def suggestions(estimator: Estimator, world: int, gpu_mem: float, limit: int = 10) -> list[tuple[ParallelDims, float]]:
    """Layouts that fit, least model parallelism first (less communication), then the lowest ZeRO stage."""
    fits = [(lay, estimator.memory(lay)["total"]) for lay in estimator.layouts(world)]
    fits = [(lay, b) for lay, b in fits if b <= HEADROOM * gpu_mem * GIB]
    fits.sort(key=lambda x: (x[0].tp * x[0].pp * x[0].cp, x[0].zero, x[0].pp, x[0].cp, x[1]))
    return fits[:limit]


# ----------------------------------------------------------------------------------------------------------
# Sampling (`stdit generate`): checked before sampling starts
# ----------------------------------------------------------------------------------------------------------

def sampling_bytes(cfg: Config, tokens: int, frames: int, height: int, width: int, upscale: int,
                   device: str) -> dict[str, float]:
    """Peak memory of sampling, by part (bytes; the model and encoders are already loaded, not counted):
    - latents: `tokens` tokens per model call (both copies under guidance): the noisy latents, noise, the velocity
      of both copies and the packed batch's tokens, in fp32 (6 values per token channel)
    - activations of the biggest call (no autograd: a block's tensors die with it), per token in units of the
      hidden size: the residual stream and the model's input and output (OUTSIDE_BLOCKS), the block's per-token
      adaLN modulation (6), and the larger of self-attention (qkv 3, normed and rotated q, k 2, the kernel's
      output 1, and the reference kernel's gathered q, k, v and two output copies 5; the kernels compute scores
      tile by tile: no score matrix) and the MLP (normed input 1, fc1 and GELU outputs 2 * mlp_ratio). Measured
      (tiny recipe, 16x128x128 with guidance, CPU): peak RSS 26 h per token, this count 23
    - video (host memory): the decoded fp32 pixels, their uint8 frames and the upscaled frames written."""
    m = cfg.model
    token_dim = m.in_channels * math.prod(m.patch_size)
    flash = device == "cuda" and m.attention_backend in ("auto", "flash_attn", "torch_varlen")
    attention = 3 + 2 + 1 + (0 if flash else 5)
    per_token = 1 + OUTSIDE_BLOCKS + 6 + max(attention, 1 + 2 * m.mlp_ratio)
    pixels = 3 * frames * height * width
    return {"latents": 6 * tokens * token_dim * 4, "activations": per_token * tokens * m.hidden_size * 4,
            "video": pixels * (4 + 1 + upscale ** 2)}


def available_bytes(device) -> tuple[float, float]:
    """(free memory of `device`, available host memory) in bytes; the same pool twice on the CPU."""
    import psutil
    host = psutil.virtual_memory().available
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0], host
    return host, host
