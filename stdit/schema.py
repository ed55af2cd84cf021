"""The config schema: one dataclass per recipe section, each key with its default and meaning.

`stdit.config` loads recipes into these (and re-exports them); its `validate` checks values against each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field


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
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16: the forward under bf16 autocast on any device (on
    CPU: fp32 weights and optimizer, bf16 matmuls; the CI tier that shows dtype mistakes without a GPU)."""
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
    """auto | flash_attn | torch_varlen | dense | reference: the attention kernel (stdit/ops/attention.py); auto takes
    the first of flash_attn, torch_varlen, reference that runs here, and dense for temporal attention."""
    temporal_attention_backend: str = "auto"
    """auto | flash_attn | torch_varlen | dense | reference: the kernel of temporal attention alone. auto: what
    model.attention_backend names, where that is auto dense (each run of equally long columns one batched SDPA,
    no padded flash tiles, no device sync)."""
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
    caption_time: bool = False
    """Add to each frame's conditioning (adaLN) a fixed sinusoid of its time times caption_time_gain x a linear
    map of its caption's layer-normed mean token, so the conditioning holds (caption x frame time) features at
    first order: what "moving left" means for frame k. Without it no model here learned the motion words; with
    it, on 8-frame clips, the probe's opposite-direction gap was +0.07 at 2000 steps (README "Evaluation")."""
    caption_time_gain: float = 6.0
    """caption_time's scale on the caption's linear map: a word's share of the pooled caption is ~0.2 of its rms
    (the rest is common to all captions), and x6 makes it order 1 (at x1 the motion words were not learned)."""
    caption_time_scale: str = "frames"
    """The time caption_time reads: frames (the frame's index counted from its sample's first frame) | clip (that
    index over the length of the clip the sample comes from, times 16: a frame halfway through a 4-frame or a
    64-frame clip reads the same). Shifting a sample's time indices changes neither."""
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
    cfg_scale_given: float | None = None
    """Guidance scale for samples with given frames (image-to-video, extensions, loops, connections, keyframes,
    long videos' later chunks); None: cfg_scale. The given frames already fix the layout and the motion; strong
    text guidance then draws the generated frames away from them (larger boundary jumps; README)."""
    prediction: str = "velocity"
    """What the network outputs: velocity (noise - x0) | x0 (the clean tokens; JiT, arXiv 2511.13720). Both train
    on the velocity error: with x0, v = (x_t - x0_hat) / t, i.e. the x0 error weighted by 1 / t^2 (t clamped at
    `x0_min_t`). With x0 the network never has to carry the noise through its layers."""
    x0_min_t: float = 0.05
    """With prediction=x0: the smallest t in v = (x_t - x0_hat) / t (bounds the weight of nearly clean samples)."""


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
    round_trips: float = 0.0
    """data.source=synthetic: the fraction of moving clips that go out and come back ("a red square moving left and
    back on a blue background": out in the first half, back in the second, the last frame where the first was);
    without them the world has no motion a loop can be made of. With data.window, only clips of at most that many
    frames are round trips: a window of a longer one could not tell where it turns (the model reads time from the
    sample's first frame)."""
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
    """Context-parallel size: the ranks a packed micro-batch's tokens are split over (see parallel.cp_mode)."""
    zero: int = 0
    """DeepSpeed ZeRO stage 0-3 over the data-parallel group."""
    timeout_s: float = 1800.0
    """Seconds a collective may wait for the other processes (the process groups' timeout): a process that is
    stopped, hung or unreachable for longer makes the others exit with an error naming this key, instead of a
    hang (under torchrun --max-restarts, the group then restarts from the newest checkpoint)."""
    cp_mode: str = "dsp"
    """How context parallelism splits the tokens: dsp (Dynamic Sequence Parallelism: each rank holds whole frames,
    balanced by tokens, so spatial and cross-attention, MLP and modulation need no communication; one all-to-all
    per block moves the hidden states to whole temporal columns for temporal attention and one moves them back;
    a frame larger than its share makes the ranks unequal, the shorter ones padded, as `stdit plan` reports) |
    ulysses (a contiguous slice per rank, all-to-alls trading it for a head slice around every attention kernel:
    >= 5x the bytes; heads must divide by parallel.tp * parallel.cp). model.attention=full always runs ulysses."""


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
