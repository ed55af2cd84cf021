"""What parallelism needs to know about STDiT, and `parallelize_stdit(model, dims)` applying it from outside.

The generic mechanisms live in parallel/ (tensor, context and pipeline parallelism); this module holds the
model-specific knowledge they take: which Linear is column- or row-parallel, which modules call an attention
kernel, how the model is cut into pipeline stages and what travels between them, how parameter names of the
parallel model map to the plain one, and how a packed batch is cut for a context-parallel rank.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from parallel.context import apply_cp, local_tokens
from parallel.dims import ParallelDims
from parallel.pipeline import build_pipeline
from parallel.tensor import apply_tp
from stdit.models.layers import rope_tables
from stdit.models.stdit import STDiT, STDiTBlock
from stdit.packing import PackedBatch, to_device

# Which Linear of a block is column- or row-parallel.
TP_STYLES = {
    "spatial_attn.qkv": "column", "spatial_attn.proj": "row",
    "temporal_attn.qkv": "column", "temporal_attn.proj": "row",
    "cross_attn.q": "column", "cross_attn.kv": "column", "cross_attn.proj": "row",
    "mlp.fc1": "column", "mlp.fc2": "row",
}
# Replicated weights applied per head (QK-norm): under TP each rank sees its heads only, so their grads are summed.
TP_HEAD_SHARED = ("q_norm.weight", "k_norm.weight")
# The modules that call the attention kernel, wrapped by context parallelism (value: is it cross-attention).
ATTENTION_KERNELS = {"spatial_attn.attn": False, "temporal_attn.attn": False, "cross_attn.attn": True}


def parallelize_stdit(model: STDiT, dims: ParallelDims) -> nn.Module:
    """Tensor, context and pipeline parallelism applied to the plain model, in that order. With a pipeline the
    result is a PipelineModule holding this rank's stage; its inputs are `model_inputs(...)`."""
    apply_tp(model, TP_STYLES, TP_HEAD_SHARED)
    apply_cp(model, ATTENTION_KERNELS, dims.group("cp"))
    if dims.pp == 1:
        return model
    layers = [EmbedStage(model)]
    layers += [BlockStage(b, model.head_dim, model.cfg) for b in model.blocks]
    layers += [FinalStage(model.final_layer)]
    return build_pipeline(layers, dims, partition_method="type:BlockStage")


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """torch.compile each block's computation (model.compile), with dynamic shapes so packed batches of any
    segment mix reuse its graphs. The attention kernels (and context parallelism's all-to-alls around them) stay
    outside: opaque to the compiler anyway, and their host-side segment bookkeeping must not be traced. Compiling
    `_forward` (not the module) keeps parameter names and works under every activation checkpointing mode."""
    for name, module in model.named_modules():
        if any(name.endswith(k) for k in ATTENTION_KERNELS):
            module.forward = torch.compiler.disable(module.forward)
    for module in model.modules():
        if isinstance(module, STDiTBlock):
            module._forward = torch.compile(module._forward, dynamic=True, backend=backend)
    return model


def model_inputs(x_t: torch.Tensor, t_frame: torch.Tensor, batch: PackedBatch, pipelined: bool) -> tuple:
    """A micro-batch's positional inputs: (x_t, t, batch) for the model, or the first stage's tensor tuple."""
    return stage_inputs(x_t, t_frame, batch) if pipelined else (x_t, t_frame, batch)


def cp_slice(batch: PackedBatch, rank: int, size: int) -> PackedBatch:
    """A context-parallel rank's view: per-token fields cut to its contiguous slice; segment boundaries and
    num_real_tokens stay global (the kernels see whole segments, and the padding tail, after Ulysses' all-to-all)."""
    if size == 1:
        return batch
    s = local_tokens(batch.tokens.shape[0], rank, size)
    return dataclasses.replace(batch, tokens=batch.tokens[s], coords=batch.coords[s],
                               token_sample=batch.token_sample[s], token_frame=batch.token_frame[s],
                               loss_mask=batch.loss_mask[s])


def plain_name(name: str, depth: int, pipelined: bool) -> str:
    """Parameter name of the parallel model -> the plain model's: TP wraps megatron layers in `.inner`;
    PipelineModule numbers its layers ('3.block.mlp.fc1.weight' -> 'blocks.2.mlp.fc1.weight')."""
    name = name.replace(".inner.", ".")
    if not pipelined:
        return name
    idx, _, rest = name.partition(".")
    idx = int(idx)
    if 1 <= idx <= depth:
        return f"blocks.{idx - 1}.{rest.removeprefix('block.')}"
    return rest


# ----------------------------------------------------------------------------------------------------------
# Pipeline stages. Between stages travels one tuple of tensors: the hidden tokens, the per-frame conditioning
# and caption embeddings (they need gradients back to stage 0), and the packed metadata as integer tensors
# (segment boundaries, permutation, this rank's token frames and coordinates).
# ----------------------------------------------------------------------------------------------------------

META = ("token_frame", "coords", "cu_spatial", "cu_temporal", "cu_full", "cu_text", "cu_cross", "temporal_perm",
        "temporal_inv")
MAXES = ("max_spatial", "max_temporal", "max_full", "max_text", "max_cross", "num_real_tokens")


def stage_inputs(x_t, t_frame, batch: PackedBatch) -> tuple:
    """The first stage's input tuple for one micro-batch (batch already cut to this cp rank's tokens)."""
    host = [getattr(batch, k) for k in MAXES]
    maxes = to_device(torch.tensor(host), x_t.device)
    maxes.host = host  # this stage's blocks read the numbers from here; later stages wait for them once
    return (x_t, t_frame, batch.fps, batch.frame_sample, batch.frame_time, batch.text,
            *[getattr(batch, k) for k in META], maxes)


def _view(meta: tuple) -> PackedBatch:
    """A PackedBatch holding just what blocks and the final layer read."""
    fields = dict(zip(META, meta[:len(META)]))
    maxes = meta[len(META)]
    if not hasattr(maxes, "host"):  # one wait per micro-batch and stage, not one per block
        maxes.host = maxes.tolist()
    fields.update(zip(MAXES, maxes.host))
    empty = {f.name: None for f in dataclasses.fields(PackedBatch)}
    return PackedBatch(**{**empty, **fields})


class EmbedStage(nn.Module):
    """Stage 0: token, timestep/fps and caption embeddings (the plain model's modules, under the same names)."""

    def __init__(self, model: STDiT):
        super().__init__()
        self.cfg, self.num_mod, self.head_dim = model.cfg, model.num_mod, model.head_dim
        for name in ("x_embedder", "t_embedder", "fps_embedder", "time_embedder", "t_block", "y_embedder"):
            setattr(self, name, getattr(model, name))

    def forward(self, inputs):
        x_t, t_frame, fps, frame_sample, frame_time, text, *meta = inputs
        view = dataclasses.replace(_view(tuple(meta)), fps=fps, frame_sample=frame_sample, frame_time=frame_time,
                                   text=text)
        x, t_emb, frame_mod, text_emb, _ = STDiT.embed(self, x_t, t_frame, view)  # reads the embedders only
        return (x, t_emb, frame_mod, text_emb, *meta)


class BlockStage(nn.Module):
    """One STDiT block; RoPE angles are recomputed from the integer coordinates on each stage."""

    def __init__(self, block, head_dim: int, cfg):
        super().__init__()
        self.block, self.head_dim, self.cfg = block, head_dim, cfg

    def forward(self, inputs):
        x, t_emb, frame_mod, text_emb, *meta = inputs
        view = _view(tuple(meta))
        rope = rope_tables(view.coords, self.head_dim, self.cfg.rope_theta, self.cfg.rope_axes == "per_attention")
        return (self.block(x, frame_mod, text_emb, rope, view), t_emb, frame_mod, text_emb, *meta)


class FinalStage(nn.Module):
    """Last stage: the final layer; the loss is the pipeline's loss_fn."""

    def __init__(self, final_layer):
        super().__init__()
        self.final_layer = final_layer

    def forward(self, inputs):
        x, t_emb, _, _, token_frame, *_ = inputs
        return self.final_layer(x, t_emb, token_frame)
