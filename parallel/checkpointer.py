"""Checkpointer: saves a run's state at a step and restores it, on the same layout or another one.

What goes where is in parallel/checkpoint.py (the format and the commit protocol). Here is the order of things:

    ckpt = Checkpointer(run_dir, dims, keep, config_yaml)
    path = ckpt.find(resume)             # before any process-group work: a missing / truncated file stops here
    ckpt.prepare(path, model, shapes)    # shapes checked; on another layout, full weights into the plain model
    ...  parallelize, build the engine ...
    ckpt.attach(engine, names)           # names: the plain model's name of each of engine.module's parameters
    meta, state = ckpt.load()            # engine shards (same layout, bit-exact) or the layout-free copy
    ckpt.save(step, meta, state)         # collective
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from parallel import checkpoint as fmt
from parallel.dims import ParallelDims


class Checkpointer:
    def __init__(self, run_dir, dims: ParallelDims, keep: int, config_yaml: str):
        self.run_dir, self.dims, self.keep, self.config_yaml = Path(run_dir), dims, keep, config_yaml
        self.path, self.meta, self.full = None, None, None

    # ---- before the engine --------------------------------------------------------------------------------
    def find(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `never` -> None, `auto` -> the run's newest complete one, or a path."""
        if resume == "never":
            return None
        path = fmt.latest(self.run_dir) if resume == "auto" else Path(resume)
        return None if path is None else fmt.verify(path)

    def same_layout(self) -> bool:
        """Whether the engine's own shards can be loaded (same layout, written by a distributed run)."""
        return (self.dims.distributed and self.meta["layout"] == self.dims.describe()
                and (self.path / "engine").is_dir())

    def prepare(self, path: Path | None, model: torch.nn.Module, shapes: dict) -> None:
        """Check the checkpoint fits the configured model; on another layout (or one process) load its full
        weights into the plain model now, before it is sharded."""
        self.path, self.shapes = path, shapes
        if path is None:
            return
        self.meta = fmt.read_meta(path)
        fmt.check_shapes(path, self.meta, shapes)
        if not self.same_layout():
            self.full = fmt.FullTensors(path)
            model.load_state_dict(self.full.state_dict("model"))

    # ---- with the engine ----------------------------------------------------------------------------------
    def attach(self, engine, names: list[str]) -> None:
        self.engine, self.names = engine, names

    def _named(self) -> list:
        return list(zip(self.names, self.engine.module.parameters()))

    def _ema_file(self) -> str:
        """One EMA file per (stage, tensor rank), and per ZeRO partition under ZeRO-3."""
        d = self.dims
        return fmt.ema_shard_name(d.rank("pp"), d.rank("tp"), d.rank("dp_cp") if d.zero == 3 else 0)

    def load(self) -> tuple[dict, dict] | tuple[None, None]:
        """Restore weights, optimizer, EMA, LR schedule and (same layout) RNG; returns (meta, trainer state)."""
        if self.path is None:
            return None, None
        path, meta, ema = self.path, self.meta, self.engine.ema.shadow
        if self.full is None:
            self.engine.load_shards(path / "engine")
            shard = fmt.read_tensors(path / "ema" / self._ema_file())
            for i, e in enumerate(ema):
                e.copy_(shard[str(i)])
        else:
            fmt.load_full_state(self.full, self._named(), ema, self.engine.optimizer, meta["optimizer_step"])
            self.full = None
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        scheduler = self.engine.scheduler
        scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(fmt.base_optimizer(self.engine.optimizer).param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the scheduler's state does not carry over to the optimizer by itself
        if meta["layout"] == self.dims.describe():  # every rank's random streams, where ranks are the same
            rank = self.dims.rank("world")
            fmt.set_rng_state(torch.load(path / "rng" / f"rank_{rank:05d}.pt", map_location="cpu",
                                         weights_only=False))
        if self.dims.rank("world") == 0:
            how = "same layout" if meta["layout"] == self.dims.describe() else f"re-laid out from {meta['layout']}"
            print(f"resumed from {path} at step {meta['step']} ({how})", file=sys.stderr)
        return meta, state

    def save(self, step: int, meta: dict, state: dict) -> Path:
        """Checkpoint `step` (collective): engine shards, EMA shard, layout-free copy, RNG, then rank 0's meta,
        trainer state and config; committed (renamed, `latest`, pruned to `keep`) once every rank is done."""
        d, engine = self.dims, self.engine
        tmp = fmt.begin(self.run_dir, step)
        ema = engine.ema.shadow
        if d.distributed:
            engine.save_shards(tmp / "engine")
            if d.zero == 3 or d.rank("dp_cp") == 0:
                fmt.write_tensors(tmp / "ema" / self._ema_file(), {str(i): e for i, e in enumerate(ema)})
        fmt.write_full(tmp, self._named(), ema, engine.optimizer, d.rank("stage"), d.size("stage"))
        fmt.write_rank_state(tmp)
        if d.rank("world") == 0:
            meta = {"step": step, **meta, "layout": d.describe(), "world_size": d.world_size,
                    "optimizer_step": fmt.optimizer_step(engine.optimizer), "params": self.shapes}
            fmt.write_main(tmp, meta, state, self.config_yaml)
        return fmt.commit(self.run_dir, tmp, self.keep)
