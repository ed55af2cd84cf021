"""ParallelDims: the process grid tp x cp x dp x pp, validated before any process-group work.

megatron-core's `parallel_state` builds the groups (order tp-cp-dp-pp: tensor-parallel ranks are adjacent);
`MegatronMPU` exposes them under the names DeepSpeed's `mpu` argument expects, so both engines agree who is who.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from stdit.config import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of each parallel dimension; dp is what the world size leaves."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    zero: int = 0

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @classmethod
    def from_config(cls, cfg, world_size: int) -> "ParallelDims":
        """Validate `parallel.*` against the world size and the model; errors name the keys to change."""
        p, m = cfg.parallel, cfg.model
        dims = cls(world_size, p.tp, p.pp, p.cp, p.zero)
        grid = p.tp * p.pp * p.cp
        if world_size % grid:
            raise ConfigError(f"parallel.tp * parallel.pp * parallel.cp = {p.tp}*{p.pp}*{p.cp} = {grid} does not divide "
                              f"the world size {world_size}; launch a multiple of {grid} processes or change them")
        if m.num_heads % (p.tp * p.cp):
            raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by parallel.tp * parallel.cp = "
                              f"{p.tp * p.cp}; heads are split over both")
        if cfg.data.token_budget % p.cp:
            raise ConfigError(f"data.token_budget={cfg.data.token_budget} is not divisible by parallel.cp={p.cp}; "
                              "each context-parallel rank holds an equal slice of the packed sequence")
        if cfg.data.micro_batches % dims.dp:
            raise ConfigError(f"data.micro_batches={cfg.data.micro_batches} packed micro-batches per step do not "
                              f"divide over {dims.dp} data-parallel ranks; use a multiple of {dims.dp} so each "
                              "rank gets the same number of tokens")
        if p.pp > m.depth:
            raise ConfigError(f"parallel.pp={p.pp} stages cannot split model.depth={m.depth} blocks; "
                              f"use parallel.pp <= {m.depth}")
        if p.pp > 1 and p.zero > 1:
            raise ConfigError(f"parallel.zero={p.zero} cannot be combined with parallel.pp={p.pp}: DeepSpeed's "
                              "pipeline engine supports ZeRO stage 0 or 1 only")
        return dims

    def describe(self) -> str:
        return f"tp{self.tp}.pp{self.pp}.cp{self.cp}.dp{self.dp}.zero{self.zero}"


# ----------------------------------------------------------------------------------------------------------
# Process groups
# ----------------------------------------------------------------------------------------------------------

def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / the deepspeed launcher (RANK...) or srun (SLURM_PROCID...)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(dims: ParallelDims, backend: str | None = None) -> None:
    """Join the process group (gloo on CPU, nccl on GPU) and build megatron-core's tp x cp x dp x pp grid."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    rank, world, local_rank = launch_env()
    if world != dims.world_size:
        raise ConfigError(f"ParallelDims was built for {dims.world_size} processes but {world} were launched")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    # DeepSpeed reads these; under srun only SLURM_* are set
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, rank=rank, world_size=world)
    import deepspeed
    deepspeed.init_distributed(dist_backend=backend)  # DeepSpeed's comm layer wraps the same process group
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp, pipeline_model_parallel_size=dims.pp,
        context_parallel_size=dims.cp, order="tp-cp-dp-pp")


class MegatronMPU:
    """megatron-core's groups under the names DeepSpeed's `mpu` expects.

    DeepSpeed's 'data parallel' group is where gradients are averaged: data x context ranks, since context
    ranks hold the same weights and see different tokens. Its 'model parallel' group is the tensor group
    (ZeRO's gradient-norm counts a TP-sharded parameter on every TP rank, a replicated one once).
    """

    def __init__(self):
        from megatron.core import parallel_state
        self.ps = parallel_state

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank(with_context_parallel=True)

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()
