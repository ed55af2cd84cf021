"""Pipeline parallelism: a model given as a list of stage layers becomes a DeepSpeed PipelineModule.

Which layers there are and what travels between them is the model's business (stdit/parallelize.py); here the
layers are spread over the stages of ParallelDims' grid, and the loss is a slot the engine fills per step.
"""
from __future__ import annotations

import torch.nn as nn

from parallel.dims import ParallelDims


class LossSlot:
    """The pipeline's loss_fn, fixed when the PipelineModule is built; the engine sets `fn` for each step."""

    fn = None

    def __call__(self, output, labels):
        return self.fn(output, labels)


def count_replicated_once_per_stage(module: nn.Module, dims: ParallelDims) -> None:
    """DeepSpeed's gradient norm (and so clipping) counts a parameter if it is marked tensor-parallel or this rank
    is rank 0 of the pipeline grid's model group (all stages x TP). Replicated parameters of later stages would
    drop out of the norm: mark them on TP rank 0 of each later stage, so every parameter counts exactly once."""
    if dims.rank("pp") == 0 or dims.rank("tp") != 0:
        return
    for p in module.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.tensor_model_parallel = True


def build_pipeline(layers: list[nn.Module], dims: ParallelDims, partition_method: str) -> nn.Module:
    """A PipelineModule over `layers` in the grid's rank order; keeps this stage's layers. Shapes may change per
    micro-batch (packed batches), so the engine runs with dynamic shapes."""
    from deepspeed.pipe import PipelineModule
    slot = LossSlot()
    pipe = PipelineModule(layers=layers, topology=dims.pipeline_topology(), loss_fn=slot,
                          partition_method=partition_method, activation_checkpoint_interval=0, dynamic_shape=True)
    pipe.loss_slot = slot
    count_replicated_once_per_stage(pipe, dims)
    return pipe
