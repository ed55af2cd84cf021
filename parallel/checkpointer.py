"""Checkpointer: saves a run's state at a step and restores it, on the same layout or another one.

What goes where is in parallel/checkpoint.py (the format and the commit protocol). Here is the order of things:

    ckpt = Checkpointer(run_dir, dims, keep, config_yaml, fixed_keys, full_copy)
    path = ckpt.find(resume)             # before any process-group work: a missing / truncated / altered file
                                         # stops here (auto: the newest intact checkpoint, said loudly)
    path = ckpt.agree()                  # after dims.init(): every rank hashed its share of the files; all agree
    ckpt.prepare(path, model, shapes)    # config keys and shapes checked; on another layout, full weights into
                                         # the plain model
    ...  parallelize, build the engine ...
    ckpt.attach(engine, names)           # names: the plain model's name of each of engine.module's parameters
    meta, state = ckpt.load()            # engine shards (same layout, bit-exact) or the layout-free copy
    ckpt.save(step, meta, state, final)  # collective; checks the disk space first; full/ as full_copy says
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from parallel import checkpoint as fmt
from parallel import safe_io
from parallel.dims import ParallelDims, launch_env


class Checkpointer:
    def __init__(self, run_dir, dims: ParallelDims, keep: int, config_yaml: str, fixed_keys: list[str] = (),
                 full_copy: str = "every"):
        """`fixed_keys`: dotted config keys a resumed run must not change (the architecture: model.*);
        `full_copy`: every | last | never, which checkpoints hold the layout-free copy (one process: all)."""
        self.run_dir, self.dims, self.keep, self.config_yaml = Path(run_dir), dims, keep, config_yaml
        self.full_copy = full_copy
        self.fixed_keys = list(fixed_keys)
        self.path, self.meta, self.full = None, None, None
        self._cands, self._choice, self._explicit, self._agreed = [], 0, False, None

    # ---- before the engine --------------------------------------------------------------------------------
    def find(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `never` -> None; `auto` -> the run's newest checkpoint that verifies
        (an older one when newer ones are damaged, said loudly on stderr; none deleted); a checkpoint PATH
        (verified, or an error naming the file and the newest one that verifies); a run directory PATH -> its
        newest that verifies. Each process hashes its share of the files; agree() settles on one for all."""
        if resume == "never":
            return None
        rank, world, _ = launch_env()
        self._share = (rank, world)
        if resume != "auto" and not fmt.is_run_dir(resume):
            path = Path(resume)
            if path.is_dir() and not (path / "manifest.json").is_file() and not path.name.startswith(".tmp-"):
                raise fmt.CheckpointError(f"checkpoint.resume={resume} is neither a checkpoint directory (no "
                                          "manifest.json) nor a run directory (no checkpoints/)")
            self._cands, self._explicit = [path], True
        else:
            run = self.run_dir if resume == "auto" else Path(resume)
            self._cands = fmt.candidates(run)
            if not self._cands:
                self._refuse_lost_run(run)
                if resume != "auto":
                    raise fmt.CheckpointError(f"checkpoint.resume={resume}: that run directory holds no complete "
                                              "checkpoint")
                return None
        self._problems: dict[int, str] = {}
        self._choice, self._agreed = self._first_intact(0), None
        if world == 1:  # nothing to agree on: decided (or refused) before any process-group work
            self._agreed = self._chosen()
            return self._agreed
        return self._cands[self._choice] if self._choice < len(self._cands) else None

    def _refuse_lost_run(self, run: Path) -> None:
        """A run whose metrics exist but whose checkpoints are gone would restart at step 0 and append to them."""
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and metrics.stat().st_size > 0:
            pointer = fmt.checkpoints_dir(run) / "latest"
            gone = (f"checkpoints/latest names {pointer.read_text(errors='replace').strip()!r}, which is gone"
                    if pointer.is_file() else "no complete checkpoint is left in checkpoints/")
            raise fmt.CheckpointError(
                f"run directory {run} has logged steps (metrics.jsonl) but {gone}; starting over would restart at "
                "step 0 and mix two runs' metrics. Use another run.dir, or set checkpoint.resume=never to start "
                "over here deliberately")

    def _first_intact(self, start: int) -> int:
        """Index of the first candidate from `start` whose share of files verifies on this process."""
        for i in range(start, len(self._cands)):
            try:
                fmt.verify(self._cands[i], share=self._share)
                return i
            except fmt.CheckpointError as e:
                self._problems[i] = str(e)
                if self._explicit:  # a checkpoint named by the user: no fallback, but say what does verify
                    self._problems[i] = str(self._offer(e))
        return len(self._cands)

    def _offer(self, e: Exception) -> Exception:
        path = self._cands[0]
        run = path.parent.parent if path.parent.name == "checkpoints" else None
        other = fmt.newest_intact(run, skip=path) if run is not None else None
        if other is None:
            return e
        return fmt.CheckpointError(f"{e}; the newest checkpoint that verifies is {other} "
                                   f"(checkpoint.resume={other})")

    def agree(self) -> Path | None:
        """After the process groups exist: the newest candidate every process verified its share of (collective;
        one process: what find() chose)."""
        if not self._cands:
            return None
        if self._agreed is not None:
            return self._agreed
        if dist.is_initialized():
            while True:
                t = torch.tensor([self._choice], dtype=torch.int64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                changed = torch.tensor([0], dtype=torch.int64)
                if int(t) != self._choice:
                    self._choice, changed[0] = self._first_intact(int(t)), 1
                dist.all_reduce(changed, op=dist.ReduceOp.MAX)
                if not int(changed):
                    break
        return self._chosen()

    def _chosen(self) -> Path:
        """The agreed candidate, after saying loudly which newer ones were passed over; or the error."""
        if self._choice >= len(self._cands):
            mine = [self._problems[i] for i in sorted(self._problems)]
            if self._explicit:
                raise fmt.CheckpointError(mine[0] if mine else f"checkpoint {self._cands[0]} does not verify on "
                                          "another process (see its error)")
            raise fmt.CheckpointError(
                "no checkpoint of the run verifies: " + ("; ".join(mine) if mine else "see the other processes' "
                                                         "errors") + ". Set checkpoint.resume=never to start over")
        chosen = self._cands[self._choice]
        if self._choice > 0:
            skipped = [self._problems.get(i, f"{self._cands[i].name}: a file checked by another process does not "
                                          "verify") for i in range(self._choice)]
            if launch_env()[0] == 0 or any(i in self._problems for i in range(self._choice)):
                print("!" * 100 + "\nWARNING: the newest checkpoint(s) do not verify:\n  " + "\n  ".join(skipped)
                      + f"\nresuming from the newest intact checkpoint {chosen} instead (nothing was deleted)\n"
                      + "!" * 100, file=sys.stderr, flush=True)
        return chosen

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
        fmt.check_shapes(path, self.meta, shapes, fmt.check_config(path, self.config_yaml, self.fixed_keys))
        if not self.same_layout():
            if not fmt.has_full(path):
                raise fmt.CheckpointError(
                    f"checkpoint {path} (layout {self.meta['layout']}) holds no layout-free copy full/ (written with "
                    f"checkpoint.full_copy=last or never), which a resume on layout {self.dims.describe()} needs: run "
                    f"`stdit ckpt convert {path}`, or resume on its own layout")
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
        state = safe_io.read_trainer_state(path)
        scheduler = self.engine.scheduler
        scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(fmt.base_optimizer(self.engine.optimizer).param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the scheduler's state does not carry over to the optimizer by itself
        if meta["layout"] == self.dims.describe():  # every rank's random streams, where ranks are the same
            rank = self.dims.rank("world")
            safe_io.set_rng_state(safe_io.read_rng(path, rank))
        if self.dims.rank("world") == 0:
            how = "same layout" if meta["layout"] == self.dims.describe() else f"re-laid out from {meta['layout']}"
            print(f"resumed from {path} at step {meta['step']} ({how})", file=sys.stderr)
        return meta, state

    def save(self, step: int, meta: dict, state: dict, final: bool = False) -> Path:
        """Checkpoint `step` (collective): engine shards, EMA shard, layout-free copy (as checkpoint.full_copy
        says; `final`: the run's last checkpoint, at its end or on a stop signal), RNG, then rank 0's meta,
        trainer state and config; committed (renamed, `latest`, pruned to `keep`) once every rank is done.
        It must fit the free disk space (estimated first); a full disk while writing leaves `latest` as it was."""
        d, engine = self.dims, self.engine
        full = not d.distributed or self.full_copy == "every" or (self.full_copy == "last" and final)
        need = self._check_space(step, full)
        tmp = fmt.begin(self.run_dir, step)
        try:
            ema = engine.ema.shadow
            if d.distributed:
                engine.save_shards(tmp / "engine")
                if d.zero == 3 or d.rank("dp_cp") == 0:
                    fmt.write_tensors(tmp / "ema" / self._ema_file(), {str(i): e for i, e in enumerate(ema)},
                                      metadata={"params": json.dumps(self._shard_index())})
            if full:
                fmt.write_full(tmp, self._named(), ema, engine.optimizer, d.rank("stage"), d.size("stage"))
            fmt.write_rank_state(tmp)
            if d.rank("world") == 0:
                meta = {"step": step, **meta, "layout": d.describe(), "world_size": d.world_size,
                        "optimizer_step": fmt.optimizer_step(engine.optimizer), "params": self.shapes}
                fmt.write_main(tmp, meta, state, self.config_yaml)
            return fmt.commit(self.run_dir, tmp, self.keep)
        except Exception as e:
            full_disk = fmt.no_space(e)
            if full_disk is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # incomplete: never loadable; `latest` was not touched
            raise fmt.CheckpointError(
                f"the disk filled up while writing checkpoint step_{step:08d} in {self.run_dir} ({full_disk}); it "
                f"needs about {need:,} bytes, {fmt.free_bytes(self.run_dir):,} are free now; `latest` still names "
                f"the previous complete checkpoint. {self._space_advice()}") from None

    def _shard_index(self) -> dict:
        """What `stdit ckpt convert` needs to rebuild full tensors offline from this rank's shards (parallel/
        convert.py): per engine parameter (its index in the EMA file) its plain name, engine name, TP dimension
        (None: not split) and TP-local shape; and DeepSpeed's model-parallel rank, which names its files."""
        named = self.engine.module.named_parameters()
        return {"mp_rank": getattr(getattr(self.engine, "engine", None), "checkpoint_mp_rank", 0),
                "params": [[i, plain, name, fmt.tp_dim(p), list(p.ds_shape if fmt.is_zero3(p) else p.shape)]
                           for i, (plain, (name, p)) in enumerate(zip(self.names, named))]}

    def _check_space(self, step: int, full: bool) -> int:
        """The checkpoint's estimated bytes, if the run directory's filesystem has them free on every rank
        (collective); else an error naming the bytes needed and free and the keys that reduce them."""
        d, module = self.dims, self.engine.module
        params = sum(torch.Size(s).numel() for s in self.shapes.values())
        # what the shards hold: each (stage, tensor rank) its TP-local tensors, summed over one data-parallel replica
        mine = sum(torch.Size(p.ds_shape if fmt.is_zero3(p) else p.shape).numel() for p in module.parameters())
        stored = torch.tensor([mine if d.rank("dp_cp") == 0 else 0], dtype=torch.int64)
        if dist.is_initialized():
            dist.all_reduce(stored)
        weight_bytes = next(module.parameters()).element_size()
        parts = fmt.checkpoint_bytes(params, d.distributed, full, weight_bytes, d.zero, int(stored))
        need, free = sum(parts.values()), fmt.free_bytes(self.run_dir)
        fits = torch.tensor([int(free >= need)])
        if dist.is_initialized():
            dist.all_reduce(fits, op=dist.ReduceOp.MIN)
        if not int(fits):
            where = f"{self.run_dir}" if free < need else f"{self.run_dir} (on another process's filesystem)"
            raise fmt.CheckpointError(
                f"not enough disk space for checkpoint step_{step:08d} in {where}: it needs about {need:,} bytes ("
                + ", ".join(f"{k} {v:,}" for k, v in parts.items() if v) + f"), {free:,} are free; nothing was "
                f"written or removed. {self._space_advice()}")
        return need

    def _space_advice(self) -> str:
        keep = f"Free space there or lower checkpoint.keep (now {self.keep} checkpoints are kept)"
        if not self.dims.distributed:
            return keep + "; checkpoint.full_copy does not apply to one process (its full/ copy is all its state)"
        return (f"{keep}, or set checkpoint.full_copy=last or never (now {self.full_copy}; the layout-free copy full/ "
                "is 16 bytes per parameter)")
