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
  Recomputation in Large Transformer Models", sec. 4): the tensors autograd keeps for backward, in bytes per token
  and unit of the hidden size h: under bf16 autocast (GPU) mostly 2-byte tensors plus the fp32 copies autocast
  makes (QK-norm statistics, LayerNorm), in fp32 (CPU) 4-byte ones; parts inside the tensor-parallel region divide
  by tp, everything divides by cp (Ulysses). See `block_activations` for the count (checked against autograd's
  saved tensors in tests/test_plan.py); `recompute` modes follow model.activation_checkpointing. A pipeline stage
  holds pp micro-batches in flight (1F1B), of its blocks.
- attention workspace: the largest transient of one attention call (the reference kernel gathers q, k, v into
  segment order; flash-attn works in on-chip tiles).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from parallel.dims import ParallelDims
from stdit.config import Config, ConfigError, sample_token_grids, validate_layout
from stdit.flops import forward_flops
from stdit.models.stdit import build_model
from stdit.parallelize import TP_STYLES, cp_mode

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

def kernel_keeps(backend: str, recompute: str) -> dict:
    """What one attention kernel call keeps beyond the layer's own tensors, in units of h / tp per query token
    (text: per text token), measured with autograd's saved-tensor hooks (tests/test_plan.py):
    - flash_attn, torch_varlen, dense ("flash") keep their inputs and output: q and k after RoPE (v is a view of the
      qkv output) and the output, 3; temporal attention's inputs are the copies gathered into column order: q, k, v
      and the output, 4; cross-attention: q and the output, 2; per text token k, 1;
    - the reference kernel keeps its own gathered copies of q, k, v, its output and the scattered output: 5
      (temporal too); cross: the q copy and two outputs, 3; per text token the k, v copies, 2;
    - selective recomputation keeps only the kernel's inputs: q, k 2; temporal the gathered q, k, v 3; cross q 1;
      per text token k 1."""
    if recompute == "selective":
        return {"self": 2, "temporal": 3, "cross": 1, "text": 1}
    if backend == "reference":
        return {"self": 5, "temporal": 5, "cross": 3, "text": 2}
    return {"self": 3, "temporal": 4, "cross": 2, "text": 1}


def block_activations(cfg: Config, tp: int, backend: str, recompute: str, precision: str = "fp32",
                      temporal_backend: str | None = None) -> tuple[float, float]:
    """(per video token, per text token) bytes one block keeps for backward, in units of the hidden size h,
    counted from its code and checked against what autograd saves (tests/test_plan.py, within 10%).

    `precision`: fp32 | bf16 (CPU bf16 autocast) | bf16_cuda (CUDA bf16 autocast, which also runs LayerNorm in
    fp32). E = bytes of the compute dtype (4 or 2); under autocast QK-norm keeps an fp32 copy of each tensor it
    normalises (its statistics are fp32), C = 4 bytes each; on CUDA each LayerNorm keeps an fp32 copy of its input
    instead of the bf16 one, N = 2 more bytes. Per token, [replicated] or [/ tp]:
    self-attention: LayerNorm input 1, modulate (normed x, 1 + scale) 2, qkv input 1, gate and branch output 2
      [E * 6 + N]; qkv output 3, QK-norm products (x * rms, kept by the weight multiply) 2, proj input 1, the
      kernel's keeps (kernel_keeps) [E * (6 + kernel) + 2C]
    cross-attention: q input 1 [E]; q output 1, q-norm product 1, proj input 1, kernel [E * (3 + kernel) + C];
      per text token: kv input 1 [E]; kv output 2, k-norm product 1, kernel [E * (3 + kernel) + C]
    MLP: LayerNorm input 1, modulate 2, fc1 input 1, gate and output 2 [E * 6 + N]; fc1 and GELU outputs
      [E * 2 r], r = mlp_ratio
    `full` keeps only the block input [E]. Not counted (< 1% at XL): RoPE's cos / sin copies in the compute dtype
    (4 x head_dim / 2 per token and self-attention), per-head norm statistics, index tensors.
    """
    m = cfg.model
    E = 4 if precision == "fp32" else 2
    C = 0 if precision == "fp32" else 4
    N = 2 if precision == "bf16_cuda" else 0
    if recompute == "full":
        return float(E), 0.0
    keep = kernel_keeps(backend, recompute)
    temporal = kernel_keeps(temporal_backend or backend, recompute)["temporal"]
    selfs = [keep["self"]] + ([temporal] if m.attention == "factorized" else [])
    replicated = len(selfs) * (E * 6 + N) + E + (E * 6 + N)
    split = sum(E * (6 + k) + 2 * C for k in selfs) + E * (3 + keep["cross"]) + C + E * 2 * m.mlp_ratio
    return replicated + split / tp, E + (E * (3 + keep["text"]) + C) / tp


def kernel_backends(m, device: str) -> tuple[str, str]:
    """The estimate's kernel of spatial / full / cross attention and of temporal attention: flash (a kernel that
    keeps its inputs: flash_attn, torch_varlen, dense) or reference, as `auto` resolves them on `device`."""
    other = m.attention_backend
    if other == "auto":
        other = "flash" if device == "cuda" else "reference"
    temporal = m.temporal_attention_backend
    if temporal == "auto":
        temporal = "dense" if m.attention_backend == "auto" else m.attention_backend
    return tuple("reference" if b == "reference" else "flash" for b in (other, temporal))


OUTSIDE_BLOCKS = 5  # x_embedder output 1; final layer: LayerNorm input 1, modulate 2, linear input 1


def cp_tokens(cfg: Config, layout: ParallelDims) -> dict:
    """Tokens of a micro-batch on the busiest context-parallel rank. Ulysses: L / cp exactly. DSP
    (parallel.cp_mode): a rank holds whole frames, balanced by tokens (and whole temporal columns, dealt out the
    same way), so the busiest rank holds up to the largest frame less one token more than L / cp (a frame larger
    than L / cp: the rank holding it, the others padded to its length); that excess is padding every rank
    computes. The activations count the busiest rank's tokens."""
    share = cfg.data.token_budget / layout.cp
    if layout.cp == 1 or cp_mode(cfg) != "dsp":
        return {"mode": "ulysses" if layout.cp > 1 else "none", "share": share, "busiest": share, "frame": 0}
    frame = max(h * w for _, h, w in sample_token_grids(cfg))
    busiest = min(cfg.data.token_budget, math.ceil(share) + frame - 1)
    return {"mode": "dsp", "share": share, "busiest": busiest, "frame": frame}


def activation_bytes(cfg: Config, layout: ParallelDims, device: str) -> dict:
    """Activation memory of the busiest rank (bytes) for one micro-batch of data.token_budget tokens."""
    m, h = cfg.model, cfg.model.hidden_size
    backend, temporal = kernel_backends(m, device)
    precision = "bf16_cuda" if device == "cuda" else "fp32"  # the trainer: bf16 autocast on GPU, fp32 on CPU
    elem = 2 if device == "cuda" else 4
    tokens = cp_tokens(cfg, layout)["busiest"]  # L / cp, + DSP's worst-case frame imbalance
    samples = max(1.0, cfg.data.token_budget / mean_sample_tokens(cfg))  # per micro-batch
    text_tokens = samples * cfg.text.max_length / layout.cp
    per_token, per_text = block_activations(cfg, layout.tp, backend, m.activation_checkpointing, precision, temporal)
    blocks = math.ceil(m.depth / layout.pp)
    in_flight = layout.pp  # 1F1B: the first stage holds up to pp micro-batches before its first backward
    kept = blocks * (per_token * tokens + per_text * text_tokens) * h
    recompute = 0.0
    if m.activation_checkpointing == "full":  # backward recomputes one block at a time, keeping all of it
        full_tok, full_text = block_activations(cfg, layout.tp, backend, "none", precision, temporal)
        recompute = (full_tok * tokens + full_text * text_tokens) * h
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
                        cfg = dataclasses.replace(self.cfg, parallel=dataclasses.replace(
                            self.cfg.parallel, tp=tp, pp=pp, cp=cp, zero=zero))  # its cp_mode too
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
    lines = [model, flop, where]
    cp = cp_tokens(cfg, layout)
    if cp["mode"] == "dsp":
        lines.append(f"context parallel: DSP, whole frames per rank (largest frame {cp['frame']:,} tokens): the "
                     f"busiest rank holds up to {cp['busiest']:,.0f} tokens of a micro-batch, L/cp = "
                     f"{cp['share']:,.0f}: up to {cp['busiest'] / cp['share'] - 1:.1%} cp padding (counted in the "
                     "activations below)")
    elif cp["mode"] == "ulysses":
        lines.append(f"context parallel: Ulysses, {cp['share']:,.0f} tokens per rank (no cp padding)")
    lines.append("memory per GPU:")
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
