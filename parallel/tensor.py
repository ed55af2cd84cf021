"""Tensor parallelism: swap the plain model's nn.Linear for megatron-core Column/RowParallelLinear by style.

The styles (module suffix -> "column" | "row") are the model's knowledge (`stdit/parallelize.py`). Weights
are copied from the full, already initialised layer, so a tp=N model equals the tp=1 model of the same seed.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class _MegatronLinear(nn.Module):
    """Calls a megatron parallel linear and drops the (output, bias) tuple down to the output."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.inner(x)
        return out


def _parallel_linear(linear: nn.Linear, style: str, config) -> _MegatronLinear:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    out_f, in_f = linear.weight.shape
    bias = linear.bias is not None
    no_init = lambda w: None  # noqa: E731  (weights are copied from the full layer below)
    if style == "column":
        layer = ColumnParallelLinear(in_f, out_f, config=config, init_method=no_init, bias=bias, gather_output=False)
        shard = out_f // tp
        with torch.no_grad():
            layer.weight.copy_(linear.weight[rank * shard:(rank + 1) * shard])
            if bias:
                layer.bias.copy_(linear.bias[rank * shard:(rank + 1) * shard])
    elif style == "row":
        layer = RowParallelLinear(in_f, out_f, config=config, init_method=no_init, bias=bias, input_is_parallel=True,
                                  skip_bias_add=False)
        shard = in_f // tp
        with torch.no_grad():
            layer.weight.copy_(linear.weight[:, rank * shard:(rank + 1) * shard])
            if bias:
                layer.bias.copy_(linear.bias)
    else:
        raise ValueError(f"unknown tensor-parallel style {style!r} (column | row)")
    # megatron sets these only when it initialises weights itself; ZeRO's norm and clipping read them to count a
    # sharded parameter on every TP rank and a replicated one once
    if not hasattr(layer.weight, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(layer.weight, True, 0 if style == "column" else 1, 1)
    return _MegatronLinear(layer.to(linear.weight.device))


def _all_reduce_grad_over_tp(param: nn.Parameter) -> None:
    """A replicated weight applied to this rank's heads only (QK-norm) gets a partial gradient: sum it over TP."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        return grad
    param.register_hook(hook)


def apply_tp(model: nn.Module, styles: dict[str, str], head_shared: tuple[str, ...] = ()) -> nn.Module:
    """Replace every Linear whose qualified name ends with a key of `styles` by its tensor-parallel shard, in place.

    `head_shared` names replicated parameters used per head (QK-norm weights) whose gradients are summed over TP.
    """
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return model
    config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                 perform_initialization=False, params_dtype=torch.float32, sequence_parallel=False)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(name == k or name.endswith("." + k) for k in styles)]
    for name, linear in targets:
        style = next(v for k, v in styles.items() if name == k or name.endswith("." + k))
        if (linear.weight.shape[0] if style == "column" else linear.weight.shape[1]) % tp:
            raise ValueError(f"{name}: {tuple(linear.weight.shape)} does not split over parallel.tp={tp}")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _parallel_linear(linear, style, config))
    for name, param in model.named_parameters():
        if any(name.endswith(k) for k in head_shared):
            _all_reduce_grad_over_tp(param)
    return model
