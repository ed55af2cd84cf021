"""Configuration: nested dataclasses merged as defaults -> recipe YAML (with `defaults:` bases) -> CLI dotlist.

OmegaConf struct mode makes an unknown key an error that names it. `validate` runs before any heavy work and
says which key to change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from stdit.grid import token_grid


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what to change."""


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite steps, too much undecodable data); the message says why and what to do."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, checkpoints."""
    steps: int = 100
    """Number of optimizer steps."""
    seed: int = 0
    """Seed of everything: weights, data order, per-sample noise and timesteps."""
    log_every: int = 1
    """Write a metrics line (and TensorBoard scalars) every this many steps."""
    device: str = "auto"
    """auto | cpu | cuda."""
    samples_at_end: int = 2
    """Videos generated with the EMA weights at the end of training and logged to TensorBoard (0: none)."""
    stage: str = "dit"
    """dit (stage 2: the diffusion transformer) | vae (stage 1: the video autoencoder, `vae.*`)."""
    log_sample_ids: bool = False
    """Add each logged step's dataset sample ids to metrics.jsonl (to audit the data order, e.g. across resumes)."""


@dataclass
class ModelConfig:
    in_channels: int = 3
    """Channels of the (latent or pixel) video the model denoises; 3 for the pixel-space demo."""
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    """Spacetime patch (pt, ph, pw); each patch becomes one token."""
    hidden_size: int = 64
    """Transformer width."""
    depth: int = 2
    """Number of blocks (each: spatial + temporal self-attention, or one full self-attention; cross-attention; MLP)."""
    num_heads: int = 4
    """Attention heads; must divide hidden_size."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of hidden_size."""
    attention: str = "factorized"
    """factorized (spatial then temporal self-attention per block) | full (one segment per video)."""
    temporal_causal: bool = False
    """Temporal attention sees only the same or earlier frames (factorized attention only)."""
    attention_backend: str = "auto"
    """auto | flash_attn | torch_varlen | reference: the varlen kernel; auto takes the first that runs here."""
    qk_norm: bool = True
    """RMS-normalise queries and keys per head (keeps attention logits bounded)."""
    rope_theta: float = 10000.0
    """Base of the 3D rotary position embedding."""
    rope_axes: str = "shared"
    """shared (every self-attention rotates head dims split over time, row and column) | per_attention (each
    rotates all head dims by the axes it compares: spatial by row and column, temporal by time, full by all three)."""
    time_embed: str = "none"
    """none | relative: add an embedding of each frame's time index counted from its sample's first frame to the
    frame's conditioning (adaLN), so a frame knows where it sits in its clip (RoPE alone only tells attention
    relative offsets); shifting all of a sample's time indices still changes nothing."""
    pos_embed: str = "none"
    """none | sincos: add DiT's fixed 2D sinusoidal embedding of each token's (row, column) to its embedding, so
    the MLPs know where a token is in its frame (RoPE alone only tells attention relative offsets)."""
    fps_conditioning: bool = True
    """Add an fps embedding to the timestep embedding."""
    vae: str | None = None
    """Trained autoencoder (its run directory, a checkpoint or an export): the DiT then denoises its latents
    (model.in_channels = its latent channels), encoding clips on the fly; `stdit generate` decodes to pixels."""
    activation_checkpointing: str = "none"
    """What each block keeps for backward: none (every activation) | selective (recompute each attention kernel,
    softmax(QK^T)V, in backward) | full (keep only the block's input, recompute the whole block in backward)."""
    compile: bool = False
    """Compile each block with torch.compile (dynamic shapes: packed batches of any segment mix reuse one graph;
    recompiles are logged as `recompiles` in the metrics). Fuses the norm, RoPE, modulation and gate glue."""


@dataclass
class TextConfig:
    kind: str = "t5"
    """t5 (T5 encoder) | clip (CLIP text model)."""
    path: str | None = None
    """Local directory of a transformers model + tokenizer; null builds a small encoder with seeded random weights."""
    hidden_size: int = 64
    """Width of the random encoder (ignored when loading from path)."""
    num_layers: int = 2
    """Layers of the random encoder."""
    num_heads: int = 4
    """Heads of the random encoder."""
    ff_size: int = 128
    """Feed-forward width of the random encoder."""
    max_length: int = 64
    """Captions are truncated to this many tokens."""
    seed: int = 0
    """Seed of the random encoder's weights."""
    tokenizer: str = "byte"
    """Tokenizer of the random encoder (ignored when loading from path): byte (ByT5, any text) | word (one token
    per word of the synthetic captions, others [UNK]: a random encoder whose colour words differ, for the demo)."""
    position_bias_scale: float = 1.0
    """Random T5 only (ignored when loading from path): multiplies its relative position bias (1: transformers'
    init). At 1 a random T5 is nearly a bag of words (a colour word's embedding hardly depends on whether it names
    the object or the background); ~16 makes each token mix with its neighbours, so its role shows."""


@dataclass
class DiffusionConfig:
    logit_mean: float = 0.0
    """Mean of the logit-normal timestep distribution."""
    logit_std: float = 1.0
    """Std of the logit-normal timestep distribution."""
    shift_base_tokens: int = 256
    """Token count at which the timestep shift is 1; larger samples shift toward noise by sqrt(tokens / base)."""
    max_shift: float = 4.0
    """Upper bound of the resolution/length timestep shift."""
    caption_dropout: float = 0.1
    """Probability that a sample's caption is replaced by the empty caption (for classifier-free guidance)."""
    sample_steps: int = 30
    """Euler steps when sampling."""
    cfg_scale: float = 4.0
    """Classifier-free guidance scale when sampling (1: no guidance)."""


@dataclass
class DataConfig:
    source: str = "synthetic"
    """synthetic: procedurally generated moving shapes | shards: tar shards written by `stdit data shard`."""
    shards: list[str] = field(default_factory=list)
    """With data.source=shards: shard paths or patterns (brace ranges, globs)."""
    num_samples: int = 1024
    """Size of the synthetic dataset (samples per epoch)."""
    resolutions: list[list[int]] = field(default_factory=lambda: [[16, 16], [16, 24], [24, 16], [24, 24]])
    """(H, W) choices of the synthetic clips."""
    frame_counts: list[int] = field(default_factory=lambda: [1, 4, 8])
    """Frame-count choices of the synthetic clips (1 = image)."""
    fps_choices: list[float] = field(default_factory=lambda: [8.0, 16.0])
    """fps choices of the synthetic clips."""
    batch_size: int = 8
    """Samples per optimizer step (the global batch, whatever the parallel layout)."""
    token_budget: int = 2048
    """Tokens per micro-batch (fixed L of a packed sequence); a step is split into as many micro-batches as needed."""
    micro_batches: int = 0
    """0: a step is data.batch_size samples. M > 0: a step is M micro-batches of data.token_budget, packed from a
    look-ahead buffer (mixed shapes, little padding; samples per step vary). See stdit/data/loader.py."""
    lookahead: int = 64
    """With data.micro_batches > 0: samples in the look-ahead buffer that packing chooses from."""
    num_workers: int = 0
    """Worker processes decoding samples ahead of training (0: in the training process)."""
    frame_stride: int = 1
    """data.source=shards: keep every k-th source frame."""
    target_fps: float = 0.0
    """data.source=shards: when > 0, the frame stride is source fps / target_fps (rounded, >= 1) per clip."""
    cached: bool = False
    """data.source=shards: the shards are `stdit data cache` output (autoencoder latents + caption embeddings)."""
    buckets: list[list[float]] = field(default_factory=list)
    """data.source=shards: [height, width, frames] or [height, width, frames, weight] per bucket; when given they
    replace data.resolutions and data.frame_counts. A clip goes to the largest bucket that fits inside it at its
    aspect ratio; weight in (0, 1] is the share of clips that stay in a bucket rather than move to the next
    smaller one that fits them (stdit/data/buckets.py). `stdit data stats` prints where the clips go."""
    allow_upscale: bool = False
    """With data.buckets: a clip smaller than every bucket of its aspect ratio is enlarged to the smallest of them
    (false: left out and counted)."""
    captions: str | None = None
    """data.source=shards: a caption manifest written by `stdit data caption` (OUT/captions.jsonl); its captions
    replace the shards' own for training (the originals stay in the shards and beside each one in the manifest)."""
    max_bad_fraction: float = 0.01
    """data.source=shards: a sample that cannot be read (truncated shard, empty or corrupt member) is replaced by a
    deterministic substitute of the same shape (logged with shard and offset, counted in metrics as bad_samples);
    the run stops when more than this fraction of max(samples seen, dataset size) was bad."""
    window: int = 0
    """Token frames a training sample holds at most: a longer clip trains on this many of its frames per step,
    drawn from a span of at most data.max_span frames, each with its time index (FDM long-video training;
    stdit/diffusion/masks.py draw_frames). 0: whole clips."""
    max_span: int = 0
    """With data.window: the frames of a sample come from at most this many consecutive frames (0: the clip)."""
    masks: dict[str, float] = field(default_factory=lambda: {"none": 1.0})
    """Conditioning mix, weight per strategy: none (text-to-video), first_frame (image-to-video), first_frames,
    last_frames (backward extension), first_last (looping), ends (connecting clips), random_frames. Conditioning frames
    are given clean and are not in the loss. A recipe's weights add to the default none: 1.0 (set it to 0 to
    drop it). See stdit/diffusion/masks.py."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    ema_decay: float = 0.99
    """EMA of the weights used for generation (0: EMA equals the weights)."""
    max_bad_steps: int = 10
    """A step whose loss or gradient norm is not finite is skipped (no optimizer or LR step, counted in metrics as
    skipped_steps); this many in a row stop the run (non-zero exit) without writing a checkpoint."""


@dataclass
class VAEConfig:
    """Stage 1: the spacetime autoencoder (stdit/models/vae.py)."""

    in_channels: int = 3
    """Channels of the pixel video."""
    latent_channels: int = 4
    """Channels of the latent (4 or 16); the DiT's model.in_channels when it trains in this latent space."""
    base_channels: int = 32
    """Width of the first level; level i has base_channels * channel_mult[i]."""
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    """Width multipliers per level; each level but the last halves height and width (3 halvings: 8x8)."""
    temporal_down: list[bool] = field(default_factory=lambda: [False, True, True])
    """Which of the downsamplings also halve time (two: 4x; T = 1 + 4k frames -> 1 + k latent frames)."""
    num_res_blocks: int = 1
    """Residual blocks per level (the decoder has one more)."""
    mid_attention: bool = True
    """Self-attention within each frame in the middle block (lowest resolution, where it is cheap)."""
    norm_groups: int = 8
    """GroupNorm groups (must divide every level's width)."""
    kl_weight: float = 1.0e-4
    """Weight of the KL term (per latent element) against the L1 reconstruction (per pixel)."""
    perceptual_weight: float = 0.0
    """Weight of a perceptual term: squared distance of features from vae.perceptual_net (0: off)."""
    perceptual_net: str | None = None
    """Local TorchScript file of a frozen feature network [N, 3, H, W] -> features (e.g. an exported LPIPS trunk)."""
    trust_perceptual_net: bool = False
    """Loading a TorchScript file runs the code it holds: vae.perceptual_net is refused unless this is true, which
    says you made that file or trust whoever did."""
    tile_frames: int = 8
    """Tiled encode/decode: latent frames per temporal chunk, streamed through causal caches (exact; 0: whole)."""
    tile_size: int = 256
    """Tiled encode/decode: pixel tile height and width (0: no spatial tiling); a multiple of the 8x compression."""
    tile_overlap: int = 64
    """Pixels two neighbouring tiles share, blended linearly."""
    stats_samples: int = 64
    """Training samples encoded at the end of training to measure the latents' per-channel mean and std."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel stages."""
    cp: int = 1
    """Context-parallel (Ulysses) size."""
    zero: int = 0
    """DeepSpeed ZeRO stage 0-3 over the data-parallel group."""
    timeout_s: float = 1800.0
    """Seconds a collective may wait for the other processes (the process groups' timeout): a process that is
    stopped, hung or unreachable for longer makes the others exit with an error naming this key, instead of a
    hang (under torchrun --max-restarts, the group then restarts from the newest checkpoint)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Write a checkpoint every this many steps (0: none during the run; one is always written at the end and
    when a stop signal arrives)."""
    keep: int = 2
    """Keep this many newest checkpoints."""
    resume: str = "auto"
    """auto (from run.dir's newest checkpoint whose files verify, if any; an older one when newer ones are damaged,
    said loudly) | never | PATH to a checkpoint directory | PATH to a run directory (its newest). The layout
    (parallel.*, number of processes) may differ from the one that wrote it."""
    full_copy: str = "every"
    """Which checkpoints hold the layout-free copy full/ (fp32 model, EMA and Adam moments under the plain model's
    names: 16 bytes per parameter, ~480 GB at 30B), which a resume on another layout, `stdit ckpt export` and
    `stdit generate` read: every | last (only the checkpoint written when the run ends or stops on a signal, e.g. a
    preemption: the one likely to move to another allocation; periodic ones keep engine shards only) | never. A
    resume on the same layout never needs it; `stdit ckpt convert CKPT` builds it offline for one that lacks it
    (run.samples_at_end, which samples from it, is skipped without it). One process always writes it (it is all its
    state)."""
    init_from: str | None = None
    """Start a new run (step 0, fresh optimizer, LR schedule and data order) from another run's weights: its run
    directory (newest checkpoint), a checkpoint directory or an export, on any layout (stdit/init_from.py).
    Parameters the source lacks (e.g. added conditioning) are initialised as usual, parameters only it has are
    dropped, both listed; a shape that differs is an error. Ignored when run.dir holds a checkpoint: resume wins,
    so a preempted fine-tune continues instead of starting over."""
    init_weights: str = "ema"
    """Which weights of checkpoint.init_from: ema (the EMA, what generation uses) | model (the raw weights)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------

def _read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read a recipe, merging its `defaults:` list (paths relative to it, applied in order, then the recipe)."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    if path in seen:
        raise ConfigError(f"recipe {path} includes itself through `defaults`")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"recipe {path}{where}: not valid YAML ({what})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {path}: not UTF-8 text ({e})") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"recipe {path}: must be a mapping of config keys (key: value lines), got a list")
    bases = raw.pop("defaults", [])
    if isinstance(bases, str) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"recipe {path}: `defaults` must be a list of recipe paths, e.g. `defaults: [base]`, "
                          f"got {OmegaConf.to_container(bases) if not isinstance(bases, str) else repr(bases)}")
    merged = OmegaConf.create()
    for base in bases:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        if base_path.suffix == "":
            base_path = base_path.with_suffix(".yaml")
        merged = OmegaConf.merge(merged, _read_recipe(base_path, seen + (path,)))
    return OmegaConf.merge(merged, raw)


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Structured defaults -> recipe (with bases) -> `key=value` overrides, validated, as a Config object."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_struct(cfg.data.masks, False)  # its keys are strategy names (checked in validate)
    try:
        if recipe is not None:
            cfg = OmegaConf.merge(cfg, _read_recipe(Path(recipe)))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must be key=value, got {bad}")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except (ConfigAttributeError, ConfigKeyError) as e:
        key = getattr(e, "full_key", None) or str(e).splitlines()[0]
        raise ConfigError(f"unknown config key `{key}`: check its spelling against `stdit/config.py`") from None
    except Exception as e:  # type errors from OmegaConf name the key too
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"bad config value: {str(e).splitlines()[0]} (key `{getattr(e, 'full_key', '?')}`)") from None
    conf: Config = OmegaConf.to_object(cfg)
    if conf.model.vae is not None and conf.run.stage == "dit":  # the DiT denoises that autoencoder's latents
        conf.model.vae = str(Path(conf.model.vae).resolve())  # the resolved config works from any directory
        conf.model.in_channels = vae_config_of(conf.model.vae).latent_channels
    if conf.checkpoint.init_from is not None:  # the resolved config works from any directory
        conf.checkpoint.init_from = str(Path(conf.checkpoint.init_from).resolve())
    validate(conf)
    return conf


def vae_config_of(path: str | Path) -> VAEConfig:
    """The autoencoder config stored with a trained VAE (run directory, checkpoint or export: its config.yaml)."""
    path = Path(path)
    found = path / "config.yaml"
    if not found.is_file():
        raise ConfigError(f"model.vae={path}: no config.yaml there; give the VAE's run directory, one of its "
                          "checkpoints or an export (`stdit ckpt export`)")
    raw = OmegaConf.load(found)
    if raw.get("run", {}).get("stage") != "vae":
        raise ConfigError(f"model.vae={path} is not an autoencoder run (its run.stage is not vae)")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(VAEConfig), raw.vae))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------

def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    """Fail before any heavy work, naming the key and what to change."""
    m, d, o, p = cfg.model, cfg.data, cfg.optim, cfg.parallel
    _check(cfg.run.steps >= 1, "run.steps", f"must be >= 1, got {cfg.run.steps}")
    _check(cfg.run.log_every >= 1, "run.log_every", f"must be >= 1, got {cfg.run.log_every}")
    _check(cfg.run.device in ("auto", "cpu", "cuda"), "run.device", f"must be auto, cpu or cuda, got {cfg.run.device!r}")
    _check(len(m.patch_size) == 3 and all(s >= 1 for s in m.patch_size), "model.patch_size",
           f"must be three positive ints (pt, ph, pw), got {m.patch_size}")
    _check(m.hidden_size >= 1, "model.hidden_size", f"must be >= 1, got {m.hidden_size}")
    _check(m.num_heads >= 1, "model.num_heads", f"must be >= 1, got {m.num_heads}")
    _check(m.hidden_size % m.num_heads == 0, "model.num_heads",
           f"{m.num_heads} heads do not divide model.hidden_size={m.hidden_size}; pick a divisor of it")
    head_dim = m.hidden_size // max(m.num_heads, 1)
    _check(head_dim % 2 == 0 and head_dim >= 6, "model.hidden_size",
           f"head dim hidden_size/num_heads={head_dim} must be even and >= 6 for 3D RoPE")
    _check(m.rope_axes in ("shared", "per_attention"), "model.rope_axes",
           f"must be shared or per_attention, got {m.rope_axes!r}")
    if m.rope_axes == "per_attention":
        _check(head_dim % 4 == 0, "model.rope_axes",
               f"per_attention splits the head dim in two even halves; hidden_size/num_heads={head_dim} is not a "
               "multiple of 4")
    _check(m.time_embed in ("none", "relative"), "model.time_embed",
           f"must be none or relative, got {m.time_embed!r}")
    _check(m.pos_embed in ("none", "sincos"), "model.pos_embed", f"must be none or sincos, got {m.pos_embed!r}")
    _check(m.pos_embed == "none" or m.hidden_size % 4 == 0, "model.pos_embed",
           f"sincos needs model.hidden_size divisible by 4, got {m.hidden_size}")
    _check(m.depth >= 1, "model.depth", f"must be >= 1, got {m.depth}")
    _check(m.attention in ("factorized", "full"), "model.attention",
           f"must be factorized or full, got {m.attention!r}")
    _check(not (m.temporal_causal and m.attention == "full"), "model.temporal_causal",
           "causal time needs model.attention=factorized (full attention is one bidirectional segment per video)")
    _check(m.attention_backend in ("auto", "flash_attn", "torch_varlen", "reference"), "model.attention_backend",
           f"must be auto, flash_attn, torch_varlen or reference, got {m.attention_backend!r}")
    _check(m.activation_checkpointing in ("none", "selective", "full"), "model.activation_checkpointing",
           f"must be none, selective or full, got {m.activation_checkpointing!r}")
    _check(cfg.text.kind in ("t5", "clip"), "text.kind", f"must be t5 or clip, got {cfg.text.kind!r}")
    _check(cfg.text.tokenizer in ("byte", "word"), "text.tokenizer",
           f"must be byte or word, got {cfg.text.tokenizer!r}")
    _check(cfg.text.position_bias_scale > 0, "text.position_bias_scale",
           f"must be > 0, got {cfg.text.position_bias_scale}")
    _check(cfg.text.position_bias_scale == 1.0 or cfg.text.kind == "t5" or cfg.text.path is not None,
           "text.position_bias_scale", "scales the random T5 encoder's position bias: needs text.kind=t5")
    _check(0.0 <= cfg.diffusion.caption_dropout <= 1.0, "diffusion.caption_dropout", "must be in [0, 1]")
    _check(cfg.diffusion.sample_steps >= 1, "diffusion.sample_steps", "must be >= 1")
    _check(d.source in ("synthetic", "shards"), "data.source", f"must be synthetic or shards, got {d.source!r}")
    _check(d.source != "shards" or len(d.shards) > 0, "data.shards", "data.source=shards needs shard paths")
    _check(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _check(d.source != "synthetic" or d.num_samples >= d.batch_size, "data.num_samples",
           f"must be >= data.batch_size={d.batch_size}")
    _check(d.micro_batches >= 0, "data.micro_batches", f"must be >= 0, got {d.micro_batches}")
    _check(d.micro_batches == 0 or d.lookahead >= 1, "data.lookahead", f"must be >= 1, got {d.lookahead}")
    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _check(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", f"must be in [0, 1], got {d.max_bad_fraction}")
    _check(d.frame_stride >= 1, "data.frame_stride", f"must be >= 1, got {d.frame_stride}")
    _check(d.target_fps >= 0, "data.target_fps", f"must be >= 0 (0: use data.frame_stride), got {d.target_fps}")
    _check(not d.cached or d.source == "shards", "data.cached", "cached latents are read from data.shards; "
           "set data.source=shards")
    missing = [k for k, v in (("text.path", cfg.text.path), ("model.vae", m.vae)) if v is None]
    _check(not d.cached or cfg.run.stage != "dit" or not missing, " and ".join(missing),
           f"data.cached=true trains on `stdit data cache` latents: set {'them' if len(missing) > 1 else 'it'} to "
           "the text encoder / autoencoder the cache was made with (its cache.json names them), which training "
           "checks against the cache and uses for dropped captions and the end-of-run samples")
    if d.buckets:
        from stdit.data.buckets import parse_buckets
        _check(d.source == "shards", "data.buckets", "buckets place real clips: set data.source=shards")
        try:
            parse_buckets(d.buckets)
        except ValueError as e:
            raise ConfigError(f"data.buckets: {e}") from None
    _check(d.captions is None or (d.source == "shards" and not d.cached), "data.captions",
           "replaces the captions of pixel shards (data.source=shards, data.cached=false); cached shards hold the "
           "captions they were encoded with")
    _check(d.window == 0 or d.window >= 2, "data.window", f"must be 0 (whole clips) or >= 2, got {d.window}")
    _check(d.max_span == 0 or d.max_span >= d.window, "data.max_span",
           f"must be 0 or >= data.window={d.window}, got {d.max_span}")
    from stdit.diffusion.masks import STRATEGIES
    unknown = sorted(set(d.masks) - set(STRATEGIES))
    _check(not unknown, "data.masks", f"unknown strategies {unknown}; use {list(STRATEGIES)}")
    _check(all(w >= 0 for w in d.masks.values()) and sum(d.masks.values()) > 0, "data.masks",
           f"weights must be >= 0 with a positive sum, got {dict(d.masks)}")
    _check(cfg.run.stage in ("dit", "vae"), "run.stage", f"must be dit or vae, got {cfg.run.stage!r}")
    _check(cfg.run.stage != "vae" or (d.micro_batches == 0 and not d.cached), "data.micro_batches",
           "run.stage=vae takes data.batch_size pixel samples per step; set data.micro_batches=0, data.cached=false")
    if cfg.run.stage == "vae":
        validate_vae(cfg)
    else:
        validate_dit_data(cfg)
    _check(o.lr > 0, "optim.lr", "must be > 0")
    _check(0.0 <= o.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(o.max_bad_steps >= 1, "optim.max_bad_steps", f"must be >= 1, got {o.max_bad_steps}")
    for key in ("tp", "pp", "cp"):
        _check(getattr(p, key) >= 1, f"parallel.{key}", f"must be >= 1, got {getattr(p, key)}")
    _check(p.zero in (0, 1, 2, 3), "parallel.zero", f"must be 0, 1, 2 or 3, got {p.zero}")
    _check(p.timeout_s > 0, "parallel.timeout_s", f"must be > 0 seconds, got {p.timeout_s}")
    _check(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _check(cfg.checkpoint.full_copy in ("every", "last", "never"), "checkpoint.full_copy",
           f"must be every, last or never, got {cfg.checkpoint.full_copy!r}")
    _check(cfg.checkpoint.init_weights in ("ema", "model"), "checkpoint.init_weights",
           f"must be ema or model, got {cfg.checkpoint.init_weights!r}")


def compression_factors(v: VAEConfig) -> tuple[int, int]:
    """(time, space) compression of an autoencoder -- the `factors` of stdit.grid: 2 per temporal downsampling,
    2 per level after the first."""
    return 2 ** sum(bool(t) for t in v.temporal_down), 2 ** (len(v.channel_mult) - 1)


def sample_grid_factors(cfg: Config) -> tuple[int, int]:
    """stdit.grid `factors` from a data clip to what the DiT sees: (1, 1) in pixels, the VAE's with model.vae."""
    return (1, 1) if cfg.model.vae is None else compression_factors(vae_config_of(cfg.model.vae))


def sample_token_grids(cfg: Config) -> list[tuple[int, int, int]]:
    """Token grid of every (frame count, resolution) clip data.* allows, as trained (at most data.window frames);
    ValueError if one does not fit."""
    factors = sample_grid_factors(cfg)
    return [token_grid(shape, cfg.model.patch_size, factors, cfg.data.window) for shape in clip_shapes(cfg.data)]


def clip_shapes(d: DataConfig) -> list[tuple[int, int, int]]:
    """(frames, H, W) of every clip data.* allows: data.buckets, else data.frame_counts x data.resolutions."""
    if d.buckets:
        return [(int(b[2]), int(b[0]), int(b[1])) for b in d.buckets]
    return [(t, h, w) for t in d.frame_counts for h, w in d.resolutions]


def _fits(shape, patch_size, factors) -> bool:
    try:
        token_grid(shape, patch_size, factors)
        return True
    except ValueError:
        return False


def validate_dit_data(cfg: Config) -> None:
    """Every data clip shape gives a whole token grid that fits data.token_budget.

    A frame count is checked with the smallest valid sides (one patch) and a resolution with the smallest valid
    frame count, so the error names the one key to change."""
    m, d = cfg.model, cfg.data
    factors = sample_grid_factors(cfg)
    (ft, fs), (pt, ph, pw) = factors, m.patch_size
    squeeze = f" after the autoencoder's {ft}x{fs}x{fs} compression" if (ft, fs) != (1, 1) else ""
    for t, h, w in clip_shapes(d) if d.buckets else []:
        _check(_fits((t, h, w), m.patch_size, factors), "data.buckets",
               f"[{h}, {w}, {t}] must have H, W divisible by the patch (ph, pw)={m.patch_size[1:]}{squeeze} and a "
               f"(latent) frame count divisible by model.patch_size[0]={pt}"
               + (f" (frames 1 + {ft}k for the autoencoder)" if ft > 1 else ""))
    for hw in [] if d.buckets else d.resolutions:
        _check(len(hw) == 2 and _fits((1 + ft * (pt - 1), *hw), m.patch_size, factors), "data.resolutions",
               f"{hw} is not (H, W) divisible by the patch (ph, pw)={m.patch_size[1:]}{squeeze}")
    for t in [] if d.buckets else d.frame_counts:
        _check(_fits((t, fs * ph, fs * pw), m.patch_size, factors), "data.frame_counts",
               f"frame count {t} must be >= 1" + (f", 1 + {ft}k for the autoencoder" if ft > 1 else "")
               + f" and give a (latent) frame count divisible by the temporal patch model.patch_size[0]={pt}")
    largest = max(math.prod(g) for g in sample_token_grids(cfg))
    _check(d.token_budget >= largest, "data.token_budget",
           f"{d.token_budget} tokens cannot hold the largest sample ({largest} tokens); raise it to >= {largest} "
           "or drop the largest entries of "
           + ("data.buckets" if d.buckets else "data.resolutions / data.frame_counts"))


def validate_vae(cfg: Config) -> None:
    v, d, p = cfg.vae, cfg.data, cfg.parallel
    _check(len(v.channel_mult) >= 1 and min(v.channel_mult) >= 1, "vae.channel_mult", "must be positive ints")
    _check(len(v.temporal_down) == len(v.channel_mult) - 1, "vae.temporal_down",
           f"needs one entry per downsampling: len(vae.channel_mult) - 1 = {len(v.channel_mult) - 1}")
    _check(all((v.base_channels * k) % v.norm_groups == 0 for k in v.channel_mult), "vae.norm_groups",
           f"{v.norm_groups} must divide every level's width vae.base_channels * vae.channel_mult")
    ft, fs = compression_factors(v)
    for t, h, w in clip_shapes(d) if d.buckets else []:
        _check(_fits((t, h, w), (1, 1, 1), (ft, fs)), "data.buckets", f"[{h}, {w}, {t}] must have H, W multiples "
               f"of the autoencoder's {fs}x spatial compression and frames 1 + {ft}k")
    for t in [] if d.buckets else d.frame_counts:
        _check(_fits((t, fs, fs), (1, 1, 1), (ft, fs)), "data.frame_counts",
               f"frame count {t} must be 1 + {ft}k for the autoencoder")
    for hw in [] if d.buckets else d.resolutions:
        _check(len(hw) == 2 and _fits((1, *hw), (1, 1, 1), (ft, fs)), "data.resolutions",
               f"{hw} must be (H, W) multiples of the autoencoder's {fs}x spatial compression")
    _check(v.tile_size % fs == 0 and v.tile_overlap % fs == 0 and v.tile_overlap < max(v.tile_size, 1),
           "vae.tile_size", f"vae.tile_size and vae.tile_overlap must be multiples of {fs}, overlap < size")
    _check(p.tp == 1 and p.pp == 1 and p.cp == 1, "parallel", "the autoencoder trains data parallel (+ ZeRO): "
           "set parallel.tp, parallel.pp and parallel.cp to 1")
    _check(v.perceptual_weight == 0 or v.perceptual_net is not None, "vae.perceptual_net",
           "vae.perceptual_weight > 0 needs a local TorchScript feature network in vae.perceptual_net")
    _check(v.perceptual_weight == 0 or v.trust_perceptual_net, "vae.perceptual_net",
           f"{v.perceptual_net} is a TorchScript program: loading it runs the code it holds. Set "
           "vae.trust_perceptual_net=true only if you made that file or trust whoever did")


def validate_layout(cfg: Config, world_size: int):
    """The parallel.* layout against the world size, the model and the data; the trainer, `stdit plan` (every
    candidate of --suggest) and `stdit slurm submit` all ask here, so they accept the same layouts. Returns the
    ParallelDims (which checks the layout's integers themselves)."""
    from parallel.dims import LayoutError, ParallelDims
    p, m, d = cfg.parallel, cfg.model, cfg.data
    try:
        dims = ParallelDims(world_size, p.tp, p.pp, p.cp, p.zero)
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    if m.num_heads % (p.tp * p.cp):
        raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by parallel.tp * parallel.cp = "
                          f"{p.tp * p.cp}; heads are split over both")
    if d.token_budget % p.cp:
        raise ConfigError(f"data.token_budget={d.token_budget} is not divisible by parallel.cp={p.cp}; "
                          "each context-parallel rank holds an equal slice of the packed sequence")
    if d.micro_batches % dims.dp:
        raise ConfigError(f"data.micro_batches={d.micro_batches} packed micro-batches per step do not divide over "
                          f"{dims.dp} data-parallel ranks; use a multiple of {dims.dp} so each rank gets the same "
                          "number of tokens")
    if p.pp > m.depth:
        raise ConfigError(f"parallel.pp={p.pp} stages cannot split model.depth={m.depth} blocks; "
                          f"use parallel.pp <= {m.depth}")
    return dims
