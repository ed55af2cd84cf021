"""ParallelDims: the process grid tp x cp x dp x pp — its sizes, its rank order and its process groups.

The one place that says who is who. Ranks are laid out in the order tp-cp-dp-pp (tensor-parallel ranks adjacent,
pipeline stages outermost); megatron-core's `parallel_state` builds the groups in that order, DeepSpeed gets the
same order as its `mpu` (no pipeline) or its pipeline topology, so every engine agrees. Callers ask
`dims.rank("dp")`, `dims.group("dp_cp")`, ... and never read megatron-core's globals themselves.

Dimension names: tp, cp, dp, pp; `dp_cp` is data x context (where gradients are averaged: context ranks hold the
same weights and see different tokens); `stage` is the ranks of one pipeline stage; `world` is everyone.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

ORDER = ("tp", "cp", "dp", "pp")  # fastest-varying first


class LayoutError(ValueError):
    """A layout that cannot be built; the message names the parallel.* key to change."""


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of each parallel dimension; dp is what the world size leaves."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    zero: int = 0

    def __post_init__(self):
        for key in ("tp", "pp", "cp"):
            if getattr(self, key) < 1:
                raise LayoutError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")
        grid = self.tp * self.pp * self.cp
        if self.world_size % grid:
            raise LayoutError(f"parallel.tp * parallel.pp * parallel.cp = {self.tp}*{self.pp}*{self.cp} = {grid} "
                              f"does not divide the world size {self.world_size}; launch a multiple of {grid} "
                              "processes or change them")
        if self.zero not in (0, 1, 2, 3):
            raise LayoutError(f"parallel.zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.pp > 1 and self.zero > 1:
            raise LayoutError(f"parallel.zero={self.zero} cannot be combined with parallel.pp={self.pp}: "
                              "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def distributed(self) -> bool:
        """Whether the run needs process groups and DeepSpeed (several processes, or ZeRO on one)."""
        return self.world_size > 1 or self.zero > 0

    def describe(self) -> str:
        return f"tp{self.tp}.pp{self.pp}.cp{self.cp}.dp{self.dp}.zero{self.zero}"

    # ---- ranks --------------------------------------------------------------------------------------------
    def sizes(self) -> dict[str, int]:
        return {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp}

    def coords_of(self, global_rank: int) -> dict[str, int]:
        """This grid's coordinates of a global rank, in the order tp-cp-dp-pp."""
        out, rest = {}, global_rank
        for name in ORDER:
            out[name], rest = rest % self.sizes()[name], rest // self.sizes()[name]
        return out

    def global_rank(self) -> int:
        import torch.distributed as dist
        return dist.get_rank() if dist.is_initialized() else 0

    def rank(self, dim: str) -> int:
        """This process's rank along `dim` (tp, cp, dp, pp, dp_cp, stage, world)."""
        r = self.global_rank()
        c = self.coords_of(r)
        if dim in c:
            return c[dim]
        if dim == "dp_cp":
            return c["cp"] + self.cp * c["dp"]
        if dim == "stage":
            return r % (self.world_size // self.pp)
        if dim == "world":
            return r
        raise KeyError(f"unknown parallel dimension {dim!r}")

    def size(self, dim: str) -> int:
        extra = {"dp_cp": self.dp * self.cp, "stage": self.world_size // self.pp, "world": self.world_size}
        return {**self.sizes(), **extra}[dim]

    def is_last_stage(self) -> bool:
        return self.rank("pp") == self.pp - 1

    def group(self, dim: str):
        """The process group of `dim` (None on a single process: collectives are skipped there)."""
        import torch.distributed as dist
        if not dist.is_initialized():
            return None
        if dim == "world":
            return dist.group.WORLD
        from megatron.core import parallel_state as ps
        return {"tp": ps.get_tensor_model_parallel_group, "cp": ps.get_context_parallel_group,
                "dp": ps.get_data_parallel_group, "pp": ps.get_pipeline_model_parallel_group,
                "dp_cp": lambda: ps.get_data_parallel_group(with_context_parallel=True)}[dim]()

    def pipeline_topology(self):
        """DeepSpeed's pipeline grid in this rank order: stages outermost, then data x context, tensor fastest."""
        from deepspeed.runtime.pipe.topology import ProcessTopology
        return ProcessTopology(axes=["pipe", "data", "model"], dims=[self.pp, self.dp * self.cp, self.tp])

    # ---- process groups -----------------------------------------------------------------------------------
    def init(self, timeout_s: float = 1800.0) -> None:
        """Join the process group and build the grid. One group serves CPU tensors (gloo) and, with CUDA, GPU
        tensors (nccl), so a collective on either device works; megatron-core then builds tp x cp x dp x pp.
        Nothing to do where the layout is not distributed.

        `timeout_s` bounds every collective of every group (the world, megatron-core's, and those DeepSpeed makes
        later, e.g. its pipeline grid's): a collective still waiting for a stopped or hung peer after it raises."""
        if not self.distributed:
            return
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state

        rank, world, local_rank = launch_env()
        if world != self.world_size:
            raise LayoutError(f"the layout was built for {self.world_size} processes but {world} were launched")
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        # DeepSpeed reads these; under srun only SLURM_* are set
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
        timeout = timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=rank, world_size=world,
                                    timeout=timeout, store=attempt_store(world, timeout))
        # groups made without a timeout (DeepSpeed's `new_group(ranks)`) take torch's default: make it ours
        from torch.distributed import distributed_c10d
        distributed_c10d.default_pg_timeout = timeout
        if hasattr(distributed_c10d, "default_pg_nccl_timeout") and distributed_c10d.default_pg_nccl_timeout:
            distributed_c10d.default_pg_nccl_timeout = timeout
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout)  # wraps the same group
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
            context_parallel_size=self.cp, order="-".join(ORDER), distributed_timeout_minutes=timeout_s / 60)
        mine = self.coords_of(rank)
        theirs = {"tp": parallel_state.get_tensor_model_parallel_rank(), "cp": parallel_state.get_context_parallel_rank(),
                  "dp": parallel_state.get_data_parallel_rank(), "pp": parallel_state.get_pipeline_model_parallel_rank()}
        if mine != theirs:
            raise RuntimeError(f"rank {rank}: megatron-core placed it at {theirs}, ParallelDims at {mine}")


def attempt_store(world: int, timeout: timedelta):
    """The process group's store under torchrun when its workers share the agent's store (torch 2.13's
    default), with this attempt's keys under a prefix of their own; None otherwise (env:// as usual).

    The agent keeps that store across `--max-restarts` restarts, so a restarted group would read the previous
    attempt's addresses (gloo's, NCCL's unique id) from it and never connect: one killed worker would leave the
    new group hanging in its first collective. Every worker of one agent has the same TORCHELASTIC_RESTART_COUNT;
    agents on several nodes count their own restarts (one restarted for another's failure does not count it), so
    there TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 must give every attempt a fresh store (and this is not used)."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(env.get("GROUP_WORLD_SIZE", "1")) > 1 and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 \
            and env.get("RANK") == "0":
        print("warning: torchrun --max-restarts with several agents (nodes) sharing the launcher's store: a "
              "restarted group may not reconnect; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun "
              "(a fresh store for every attempt)", file=sys.stderr)
    import torch.distributed as dist
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"stdit/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / the deepspeed launcher (RANK...) or srun (SLURM_PROCID...)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


class MegatronMPU:
    """The grid under the names DeepSpeed's `mpu` expects.

    DeepSpeed's 'data parallel' group is where gradients are averaged: data x context ranks. Its 'model
    parallel' group is the tensor group (ZeRO's gradient norm counts a TP-sharded parameter on every TP rank, a
    replicated one once).
    """

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def get_model_parallel_group(self):
        return self.dims.group("tp")

    def get_model_parallel_world_size(self):
        return self.dims.tp

    def get_model_parallel_rank(self):
        return self.dims.rank("tp")

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_data_parallel_group(self):
        return self.dims.group("dp_cp")

    def get_data_parallel_world_size(self):
        return self.dims.size("dp_cp")

    def get_data_parallel_rank(self):
        return self.dims.rank("dp_cp")

    def get_pipeline_model_parallel_group(self):
        return self.dims.group("pp")

    def get_pipeline_model_parallel_world_size(self):
        return self.dims.pp

    def get_pipeline_model_parallel_rank(self):
        return self.dims.rank("pp")
