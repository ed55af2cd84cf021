"""Configuration: the schema's dataclasses (stdit/schema.py) merged as defaults -> recipe YAML (with `defaults:`
bases) -> CLI dotlist.

OmegaConf struct mode makes an unknown key an error that names it. `validate` runs before any heavy work and
says which key to change.
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from stdit.grid import token_grid
# the schema's names are part of this module's interface: callers import them from stdit.config
from stdit.schema import (CheckpointConfig, Config, ConfigError, DataConfig, DiffusionConfig, ModelConfig,  # noqa: F401
                          OptimConfig, ParallelConfig, RunConfig, TextConfig, TrainingError, VAEConfig)


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
        raise ConfigError(f"unknown config key `{key}`: check its spelling against `stdit/schema.py`") from None
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
    _check(cfg.run.precision in ("auto", "fp32", "bf16"), "run.precision",
           f"must be auto, fp32 or bf16, got {cfg.run.precision!r}")
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
    _check(m.caption_time_gain > 0, "model.caption_time_gain", f"must be > 0, got {m.caption_time_gain}")
    _check(m.caption_time_scale in ("frames", "clip"), "model.caption_time_scale",
           f"must be frames or clip, got {m.caption_time_scale!r}")
    _check(m.pos_embed in ("none", "sincos"), "model.pos_embed", f"must be none or sincos, got {m.pos_embed!r}")
    _check(cfg.diffusion.prediction in ("velocity", "x0"), "diffusion.prediction",
           f"must be velocity or x0, got {cfg.diffusion.prediction!r}")
    _check(m.pos_embed == "none" or m.hidden_size % 4 == 0, "model.pos_embed",
           f"sincos needs model.hidden_size divisible by 4, got {m.hidden_size}")
    _check(m.depth >= 1, "model.depth", f"must be >= 1, got {m.depth}")
    _check(m.attention in ("factorized", "full"), "model.attention",
           f"must be factorized or full, got {m.attention!r}")
    _check(not (m.temporal_causal and m.attention == "full"), "model.temporal_causal",
           "causal time needs model.attention=factorized (full attention is one bidirectional segment per video)")
    for key in ("attention_backend", "temporal_attention_backend"):
        _check(getattr(m, key) in ("auto", "flash_attn", "torch_varlen", "dense", "reference"), f"model.{key}",
               f"must be auto, flash_attn, torch_varlen, dense or reference, got {getattr(m, key)!r}")
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
    _check(cfg.diffusion.cfg_scale_given is None or cfg.diffusion.cfg_scale_given >= 1.0,
           "diffusion.cfg_scale_given", "must be >= 1 (1: no guidance) or null (as diffusion.cfg_scale)")
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
    _check(0.0 <= d.round_trips <= 1.0, "data.round_trips", f"must be in [0, 1], got {d.round_trips}")
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
    _check(p.cp_mode in ("dsp", "ulysses"), "parallel.cp_mode", f"must be dsp or ulysses, got {p.cp_mode!r} "
           "(model.attention=full always runs ulysses)")
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
    ulysses = p.cp > 1 and (p.cp_mode == "ulysses" or m.attention == "full")  # Ulysses splits heads, DSP tokens
    if m.num_heads % (p.tp * p.cp if ulysses else p.tp):
        raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by parallel.tp * parallel.cp = "
                          f"{p.tp * p.cp}; Ulysses context parallelism (parallel.cp_mode=ulysses, or "
                          "model.attention=full) splits heads over both" if ulysses else
                          f"model.num_heads={m.num_heads} is not divisible by parallel.tp={p.tp}")
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
