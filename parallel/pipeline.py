"""Pipeline parallelism: STDiT cut into DeepSpeed PipelineModule stages.

Stage 0 holds the embedders, the last stage the final layer and the loss; blocks are spread evenly. Between
stages travels one tuple of tensors: the hidden tokens, the per-frame conditioning and caption embeddings (they
need gradients back to stage 0), and the packed metadata as integer tensors (segment boundaries, permutation,
this rank's token frames and coordinates). Shapes change per micro-batch, so the engine runs with dynamic shapes.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from stdit.models.layers import rope_cos_sin
from stdit.packing import PackedBatch

META = ("token_frame", "coords", "cu_spatial", "cu_temporal", "cu_full", "cu_text", "temporal_perm", "temporal_inv")
MAXES = ("max_spatial", "max_temporal", "max_full", "max_text")


def batch_inputs(x_t, t_frame, batch: PackedBatch) -> tuple:
    """The first stage's input tuple for one micro-batch (batch already cut to this cp rank's tokens)."""
    maxes = torch.tensor([getattr(batch, k) for k in MAXES], device=x_t.device)
    return (x_t, t_frame, batch.fps, batch.frame_sample, batch.text, *[getattr(batch, k) for k in META], maxes)


def _view(meta: tuple) -> PackedBatch:
    """A PackedBatch holding just what blocks and the final layer read."""
    fields = dict(zip(META, meta[:len(META)]))
    fields.update(zip(MAXES, meta[len(META)].tolist()))
    empty = {f.name: None for f in dataclasses.fields(PackedBatch)}
    return PackedBatch(**{**empty, **fields})


class EmbedPipe(nn.Module):
    """Stage 0: token, timestep/fps and caption embeddings (the modules of the plain model, same names)."""

    def __init__(self, model):
        super().__init__()
        self.cfg, self.num_mod, self.head_dim = model.cfg, model.num_mod, model.head_dim
        for name in ("x_embedder", "t_embedder", "fps_embedder", "t_block", "y_embedder"):
            setattr(self, name, getattr(model, name))

    def forward(self, inputs):
        from stdit.models.stdit import STDiT
        x_t, t_frame, fps, frame_sample, text, *meta = inputs
        view = dataclasses.replace(_view(tuple(meta)), fps=fps, frame_sample=frame_sample, text=text)
        x, t_emb, frame_mod, text_emb, _ = STDiT.embed(self, x_t, t_frame, view)  # same code as the plain model
        return (x, t_emb, frame_mod, text_emb, *meta)


class BlockPipe(nn.Module):
    """One STDiT block; RoPE angles are recomputed from the integer coordinates on each stage."""

    def __init__(self, block, head_dim: int, rope_theta: float):
        super().__init__()
        self.block, self.head_dim, self.rope_theta = block, head_dim, rope_theta

    def forward(self, inputs):
        x, t_emb, frame_mod, text_emb, *meta = inputs
        view = _view(tuple(meta))
        rope = rope_cos_sin(view.coords, self.head_dim, self.rope_theta)
        return (self.block(x, frame_mod, text_emb, rope, view), t_emb, frame_mod, text_emb, *meta)


class FinalPipe(nn.Module):
    """Last stage: the final layer; the loss is the module's loss_fn."""

    def __init__(self, final_layer):
        super().__init__()
        self.final_layer = final_layer

    def forward(self, inputs):
        x, t_emb, _, _, token_frame, *_ = inputs
        return self.final_layer(x, t_emb, token_frame)


def plain_name(pipe_name: str, depth: int) -> str:
    """PipelineModule parameter name ('3.block.mlp.fc1.weight') -> the plain model's ('blocks.2.mlp.fc1.weight')."""
    idx, _, rest = pipe_name.partition(".")
    idx = int(idx)
    if idx == 0:
        return rest
    if idx <= depth:
        return f"blocks.{idx - 1}.{rest.removeprefix('block.')}"
    return rest


def count_replicated_once_per_stage(module) -> None:
    """DeepSpeed's gradient norm (and so clipping) counts a parameter if it is marked tensor-parallel or this rank
    is rank 0 of the pipeline grid's model group (all stages x TP). Replicated parameters of later stages would
    drop out of the norm: mark them on TP rank 0 of each later stage, so every parameter counts exactly once."""
    from megatron.core import parallel_state as ps
    if ps.get_pipeline_model_parallel_rank() == 0 or ps.get_tensor_model_parallel_rank() != 0:
        return
    for p in module.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.tensor_model_parallel = True


def build_pipeline(model, dims, loss_fn):
    """A DeepSpeed PipelineModule over the (TP/CP-applied) plain model, ranks ordered as megatron's grid."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import ProcessTopology

    layers = [EmbedPipe(model)]
    layers += [BlockPipe(b, model.head_dim, model.cfg.rope_theta) for b in model.blocks]
    layers += [FinalPipe(model.final_layer)]
    # megatron order tp-cp-dp-pp: tensor ranks adjacent, then context, data, pipeline slowest
    topo = ProcessTopology(axes=["pipe", "data", "model"], dims=[dims.pp, dims.dp * dims.cp, dims.tp])
    pipe = PipelineModule(layers=layers, topology=topo, loss_fn=loss_fn, partition_method="type:BlockPipe",
                          activation_checkpoint_interval=0, dynamic_shape=True)
    count_replicated_once_per_stage(pipe)
    return pipe
