"""STDiT: a spatial-temporal diffusion transformer over NaViT-packed video tokens.

Each block: spatial self-attention (a token sees its own frame), temporal self-attention (a token sees its own
spatial position in the other frames of its video), cross-attention to the caption, MLP — all but the
cross-attention modulated by adaLN-single from the per-frame timestep (+ fps). `attention=full` replaces the
spatial/temporal pair by one self-attention over each whole video.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from stdit.models.attention import CrossAttention, SelfAttention
from stdit.models.layers import Mlp, ScalarEmbedder, modulate, rope_tables, sincos_2d, sinusoidal
from stdit.packing import PackedBatch


def frame_param(frame_mod: torch.Tensor, table: torch.Tensor, i: int, token_frame: torch.Tensor) -> torch.Tensor:
    """Modulation parameter i for every token: (per-frame adaLN-single output + block table)[token's frame], in
    the compute dtype (the fp32 table must not turn modulation, gates and residual into fp32 under autocast)."""
    return (frame_mod[:, i] + table[i]).to(frame_mod.dtype)[token_frame]


#################################################################################
#                                 STDiT Blocks                                  #
#################################################################################


class STDiTBlock(nn.Module):
    """Spatial (or full) attention, temporal attention, cross-attention, MLP with adaLN-single modulation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, factorized: bool, temporal_causal: bool,
                 qk_norm: bool, backend: str, checkpointing: str = "none", temporal_backend: str | None = None):
        super().__init__()
        self.factorized, self.temporal_causal = factorized, temporal_causal
        self.full_recompute = checkpointing == "full"
        recompute = checkpointing == "selective"  # the attention kernels only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.spatial_attn = SelfAttention(hidden_size, num_heads, qk_norm, backend, recompute)
        if factorized:
            self.norm_t = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.temporal_attn = SelfAttention(hidden_size, num_heads, qk_norm, temporal_backend or backend, recompute)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm, backend, recompute)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        # rows: shift/scale/gate for attention, MLP, and (factorized) temporal attention
        self.num_mod = 9 if factorized else 6
        self.scale_shift_table = nn.Parameter(torch.randn(self.num_mod, hidden_size) / hidden_size ** 0.5)

    def forward(self, x, frame_mod, text, rope, batch: PackedBatch):
        if self.full_recompute and torch.is_grad_enabled():  # keep x only; run the block again in backward
            return checkpoint(self._forward, x, frame_mod, text, rope, batch, use_reentrant=False)
        return self._forward(x, frame_mod, text, rope, batch)

    def _forward(self, x, frame_mod, text, rope, batch: PackedBatch):
        # modulation, gates and the residual stream stay in x's dtype (autocast runs the LayerNorms in fp32)
        p = lambda i: frame_param(frame_mod, self.scale_shift_table, i, batch.token_frame)  # noqa: E731
        shift_msa, scale_msa, gate_msa = p(0), p(1), p(2)
        kind = "spatial" if self.factorized else "full"
        x = x + gate_msa * self.spatial_attn(modulate(self.norm1(x).to(x.dtype), shift_msa, scale_msa), rope[kind],
                                             batch.segments(kind))
        if self.factorized:
            x = x + self.temporal_branch(x, frame_mod, rope["temporal"], batch)
        x = x + self.cross_attn(x, text, batch.segments("cross"))
        shift_mlp, scale_mlp, gate_mlp = p(3), p(4), p(5)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x).to(x.dtype), shift_mlp, scale_mlp))

    def temporal_branch(self, x, frame_mod, rope, batch: PackedBatch):
        """The temporal sub-block's gated update. A method of its own: context parallelism (DSP) runs it on
        another token layout, whole temporal columns, by wrapping it from outside."""
        p = lambda i: frame_param(frame_mod, self.scale_shift_table, i, batch.token_frame)  # noqa: E731
        shift_tmp, scale_tmp, gate_tmp = p(6), p(7), p(8)
        seg = batch.segments("temporal", causal=self.temporal_causal)
        return gate_tmp * self.temporal_attn(modulate(self.norm_t(x).to(x.dtype), shift_tmp, scale_tmp), rope, seg)


class FinalLayer(nn.Module):
    """adaLN-single modulated norm, then a linear to patch values."""

    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def forward(self, x, t_frame, token_frame):
        shift = (t_frame + self.scale_shift_table[0]).to(x.dtype)[token_frame]
        scale = (t_frame + self.scale_shift_table[1]).to(x.dtype)[token_frame]
        return self.linear(modulate(self.norm_final(x).to(x.dtype), shift, scale))


#################################################################################
#                                 Core STDiT Model                              #
#################################################################################


class STDiT(nn.Module):
    """Packed-sequence STDiT: forward(x_t tokens [L, C*pt*ph*pw], per-frame t [F], batch) -> velocity [L, ...]."""

    def __init__(self, cfg, text_dim: int):
        super().__init__()
        self.cfg = cfg
        h, patch_dim = cfg.hidden_size, cfg.in_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        self.head_dim = h // cfg.num_heads
        factorized = cfg.attention == "factorized"
        self.x_embedder = nn.Linear(patch_dim, h)  # a 3D patch conv with stride = kernel, on patchified tokens
        self.t_embedder = ScalarEmbedder(h, scale=1000.0)
        self.fps_embedder = ScalarEmbedder(h) if cfg.fps_conditioning else None
        self.time_embedder = ScalarEmbedder(h) if cfg.time_embed == "relative" else None
        self.num_mod = 9 if factorized else 6
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(h, self.num_mod * h))  # adaLN-single, shared by blocks
        self.y_embedder = Mlp(text_dim, h, h)
        self.caption_time = nn.Linear(text_dim, h) if cfg.caption_time else None
        temporal = cfg.attention_backend if cfg.temporal_attention_backend == "auto" else cfg.temporal_attention_backend
        self.blocks = nn.ModuleList([
            STDiTBlock(h, cfg.num_heads, cfg.mlp_ratio, factorized, cfg.temporal_causal, cfg.qk_norm,
                       cfg.attention_backend, cfg.activation_checkpointing, temporal)
            for _ in range(cfg.depth)
        ])
        self.final_layer = FinalLayer(h, patch_dim)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(_basic_init)
        for emb in (self.t_embedder, self.fps_embedder, self.time_embedder):
            if emb is not None:
                nn.init.normal_(emb.mlp[0].weight, std=0.02)
                nn.init.normal_(emb.mlp[2].weight, std=0.02)
        nn.init.normal_(self.y_embedder.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.fc2.weight, std=0.02)
        # DiT-style zero init: every block starts as the identity, the model predicts zero.
        nn.init.zeros_(self.t_block[1].weight)
        for block in self.blocks:
            with torch.no_grad():
                block.scale_shift_table[[2, 5] + ([8] if block.factorized else [])] = 0
            nn.init.zeros_(block.cross_attn.proj.weight)
        nn.init.zeros_(self.final_layer.linear.weight)

    def embed(self, x, t, batch: PackedBatch):
        """Token, per-frame conditioning and text embeddings, and the RoPE angles (the pipeline's first stage)."""
        t_frame = self.t_embedder(t)                                   # [F, h]
        if self.fps_embedder is not None:
            t_frame = t_frame + self.fps_embedder(batch.fps)[batch.frame_sample]
        if self.time_embedder is not None:  # where the frame sits in its sample, unchanged by a common shift
            t_frame = t_frame + self.time_embedder(batch.frame_time)
        if self.caption_time is not None:
            t_frame = t_frame + STDiT.caption_time_features(self, batch).to(t_frame.dtype)  # stage 0 too
        frame_mod = self.t_block(t_frame).view(t.shape[0], self.num_mod, -1)  # [F, num_mod, h]
        rope = rope_tables(batch.coords, self.head_dim, self.cfg.rope_theta, self.cfg.rope_axes == "per_attention")
        x = self.x_embedder(x)
        if self.cfg.pos_embed == "sincos":
            x = x + sincos_2d(batch.coords, x.shape[-1]).to(x.dtype)
        return x, t_frame, frame_mod, self.y_embedder(batch.text), rope

    def caption_time_features(self, batch: PackedBatch) -> torch.Tensor:
        """[F, h] (caption x frame time): a fixed sinusoid of each frame's time (frequencies 1 to 1/100; the time
        is the frame's index from its sample's first frame, or with caption_time_scale=clip that index over its
        clip's length, x16) times model.caption_time_gain x a linear map of its caption's layer-normed mean token
        (the gain: at x1 the probe's gap for the motion words was +0.003 after 2000 steps, at x6 +0.07; README)."""
        pooled = nn.functional.layer_norm(batch.caption.float(), batch.caption.shape[-1:])
        caption = self.cfg.caption_time_gain * self.caption_time(pooled.to(self.caption_time.weight.dtype))
        time = batch.frame_time
        if self.cfg.caption_time_scale == "clip":
            time = 16 * time / (batch.clip_length - 1).clamp(min=1)[batch.frame_sample]
        return sinusoidal(time, caption.shape[-1], max_period=100.0).to(caption.dtype) * caption[batch.frame_sample]

    def forward(self, x: torch.Tensor, t: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        x, t_frame, frame_mod, text, rope = self.embed(x, t, batch)
        for block in self.blocks:
            x = block(x, frame_mod, text, rope, batch)
        return self.final_layer(x, t_frame, batch.token_frame)


def build_model(cfg, text_dim: int) -> STDiT:
    """The plain single-device model from `model.*`."""
    return STDiT(cfg, text_dim)
