"""`stdit ckpt convert CKPT`: the layout-free copy full/ of a checkpoint written without it (checkpoint.full_copy
= last | never), built offline in one process from its engine shards; tensor for tensor what the run would have
written (model: ZeRO's fp32 master where there is one, else the module's weight; EMA; Adam's two moments).

Each EMA shard (one per pipeline stage and tensor rank, and per ZeRO-3 partition) lists in its metadata the
engine's parameters: plain name, engine name, TP dimension, TP-local shape, and DeepSpeed's model-parallel rank
(Checkpointer._shard_index). DeepSpeed's files under engine/state/ hold the rest:
- ZeRO-1/2 and bf16 (an fp32 master copy): `[bf16_]zero_pp_rank_D_mp_rank_M_optim_states.pt`, one per ZeRO rank
  D: its part of each parameter group's flat fp32 tensor and of Adam's moments. Concatenated over D, the group's
  parameters follow one another in `param_shapes` order, with DeepSpeed's alignment padding after each.
- ZeRO-3: the same files; every parameter is split in D equal parts of ceil(numel / D) (the last one padded).
- no ZeRO, fp32: `mp_rank_M_model_states.pt`: the module's weights and torch's AdamW state dict (state by
  parameter index); under a pipeline the weights are in `layer_XX-model_YY-model_states.pt`, one per layer.
TP shards are concatenated along their dimension. DeepSpeed's files are opened memory-mapped (torch.load mmap,
weights_only): only the pieces of the parameter at hand are read. Output files hold ~2 GiB each.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from parallel import checkpoint as fmt
from parallel.safe_io import _WRITTEN, CheckpointError, deepspeed_globals, file_hash, safe_torch_load

KINDS = ("model", "ema", "exp_avg", "exp_avg_sq")
FILE_BYTES = 2 * 2 ** 30


def convert(path: str | Path) -> Path:
    """Write CKPT/full/ from the engine shards and add it to the manifest; returns the checkpoint directory."""
    path = fmt.resolve(path)
    if fmt.has_full(path):
        raise CheckpointError(f"checkpoint {path} already holds the layout-free copy full/; nothing to convert")
    meta = fmt.read_meta(path)
    layout = dict(re.findall(r"([a-z]+)(\d+)", meta["layout"]))
    params = sum(torch.Size(s).numel() for s in meta["params"].values())
    need, free = 16 * params, fmt.free_bytes(path)
    if free < need:
        raise CheckpointError(f"not enough disk space to convert {path}: full/ needs about {need:,} bytes, the "
                              f"filesystem has {free:,} free")
    stages = _index(path, int(layout["pp"]), int(layout["tp"]))
    listed = {e[1] for shards in stages for e in shards[0][0]}
    if listed != set(meta["params"]):
        raise CheckpointError(f"checkpoint {path}: its EMA shards list other parameters than meta.json "
                              f"({sorted(listed ^ set(meta['params']))[:3]}...); it cannot be converted")
    tmp = path / ".tmp-full"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted conversion
    shutil.rmtree(path / "full", ignore_errors=True)  # renamed but not yet in the manifest: redo
    out = _Writer(tmp)
    try:
        for pp, shards in enumerate(stages):
            readers = [_Shard(path, pp, tp, entries, mp) for tp, (entries, mp) in enumerate(shards)]
            for k, (_, plain, _, dim, _) in enumerate(shards[0][0]):
                for kind in KINDS:
                    parts = [r.tensor(kind, k) for r in readers]
                    out.add(f"{kind}/{plain}", torch.cat(parts, dim) if dim is not None else parts[0])
        out.close()
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if fmt.no_space(e) is None:
            raise
        raise CheckpointError(f"the disk filled up while converting {path} ({e}); full/ needs about {need:,} "
                              "bytes; nothing of the checkpoint was changed") from None
    os.replace(tmp, path / "full")
    _add_to_manifest(path, "full")
    return path


def _index(path: Path, pp: int, tp: int) -> list[list[tuple[list, int]]]:
    """[stage][tensor rank] -> (the engine's parameters [index, plain, engine name, TP dim, local shape], DeepSpeed's
    model-parallel rank), from the EMA shards' metadata."""
    stages = []
    for s in range(pp):
        shards = []
        for t in range(tp):
            f = path / "ema" / fmt.ema_shard_name(s, t, 0)
            try:
                with safe_open(str(f), "pt") as h:
                    info = json.loads((h.metadata() or {}).get("params", "null"))
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint {path} is missing ema/{f.name}; it cannot be converted") from None
            except Exception as e:
                raise CheckpointError(f"{f} cannot be read ({e}); it is truncated or corrupt") from None
            if not isinstance(info, dict):
                raise CheckpointError(f"checkpoint {path} was written before `stdit ckpt convert` existed (its EMA "
                                      "shards do not list their parameters); it cannot be converted: resume it on "
                                      "its own layout with checkpoint.full_copy=every and save again")
            shards.append((info["params"], int(info["mp_rank"])))
        if any([e[1] for e in entries] != [e[1] for e in shards[0][0]] for entries, _ in shards):
            raise CheckpointError(f"checkpoint {path}: the tensor ranks of stage {s} list different parameters")
        stages.append(shards)
    return stages


class _Shard:
    """One (stage, tensor rank)'s TP-local tensors of every kind, read from its EMA and DeepSpeed files."""

    def __init__(self, path: Path, pp: int, tp: int, entries: list, mp: int):
        self.entries, state = entries, path / "engine" / "state"
        # EMA shards (ZeRO-3: one per partition), memory-mapped: tensors are read one at a time
        self.ema = [safe_open(str(f), "pt") for f in sorted((path / "ema").glob(f"pp{pp:02d}_tp{tp:02d}_dp*"))]
        optim = sorted(state.glob(f"*zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt"),
                       key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name)[1]))
        self.files = [_load(f) for f in optim]
        self.zero3 = bool(self.files) and "fp32_flat_groups" in self.files[0]["optimizer_state_dict"]
        if self.zero3 and len(self.ema) != len(self.files):
            raise CheckpointError(f"checkpoint {path}: {len(self.ema)} EMA partitions but {len(self.files)} ZeRO-3 "
                                  f"optimizer files for stage {pp}, tensor rank {tp}; it cannot be converted")
        model_states = sorted(state.glob(f"*mp_rank_{mp:02d}_model_states.pt"))
        if self.files:
            self._flat_layout(_load(model_states[0])["param_shapes"], path)
        else:  # no ZeRO, fp32: the module's weights and torch's AdamW state
            if not model_states:
                raise CheckpointError(f"checkpoint {path} holds no DeepSpeed engine files for stage {pp}, tensor "
                                      f"rank {tp} (engine/state/mp_rank_{mp:02d}_model_states.pt); it cannot be "
                                      "converted")
            states = _load(model_states[0])
            self.optimizer = states["optimizer"]
            self.module = states["module"] or {}
            if not self.module:  # a pipeline: one file per layer, names relative to the layer
                for f in sorted(state.glob(f"layer_*-model_{tp:02d}-model_states.pt")):
                    layer = int(re.match(r"layer_(\d+)-", f.name)[1])
                    self.module.update({f"{layer}.{k}": v for k, v in _load(f).items()})

    def _flat_layout(self, param_shapes: list, path: Path) -> None:
        """Where each engine parameter lies in its group's flat tensors: {name: (group, offset, numel)}."""
        self.where = {}
        osd = [f["optimizer_state_dict"] for f in self.files]
        if self.zero3:  # per rank: its sub-groups' flat tensors, one after the other
            flats = [[t.reshape(-1) for t in o["fp32_flat_groups"]] for o in osd]
            self.flat = {"model": [flats]}
            for key in fmt.OPTIM_KEYS:
                self.flat[key] = [[[o["optimizer_state_dict"]["state"][j][key].reshape(-1)
                                    if j in o["optimizer_state_dict"]["state"] else torch.zeros_like(t)
                                    for j, t in enumerate(f)] for o, f in zip(osd, flats)]]
            offset, world = 0, len(self.files)
            for name, shape in ((n, s) for group in param_shapes for n, s in group.items()):
                part = math.ceil(torch.Size(shape).numel() / world)
                self.where[name] = (0, offset, torch.Size(shape).numel(), part)
                offset += part
            if offset != sum(t.numel() for t in flats[0]):
                raise CheckpointError(f"checkpoint {path}: DeepSpeed's ZeRO-3 partitions do not follow its parameter "
                                      "list; this DeepSpeed layout is not supported by `stdit ckpt convert`")
            return
        groups = [o["single_partition_of_fp32_groups"] for o in osd]
        self.flat = {"model": [[g[i].reshape(-1) for g in groups] for i in range(len(groups[0]))]}
        for key in fmt.OPTIM_KEYS:
            self.flat[key] = [[o["base_optimizer_state"]["state"][i][key].reshape(-1)
                               if i in o["base_optimizer_state"]["state"] else torch.zeros_like(g[i])
                               for o, g in zip(osd, groups)] for i in range(len(groups[0]))]
        paddings = osd[0].get("param_alignment_paddings")
        for g, shapes in enumerate(param_shapes):
            offset = 0
            for j, (name, shape) in enumerate(shapes.items()):
                n = torch.Size(shape).numel()
                self.where[name] = (g, offset, n, None)
                offset += n + (paddings[g][j] if paddings else 0)
            if offset > sum(t.numel() for t in self.flat["model"][g]):
                raise CheckpointError(f"checkpoint {path}: DeepSpeed's flat optimizer partitions are shorter than its "
                                      "parameter list; this DeepSpeed layout is not supported by `stdit ckpt convert`")

    def tensor(self, kind: str, k: int) -> torch.Tensor:
        """The TP-local fp32 tensor `kind` of the k-th engine parameter."""
        i, _, name, _, shape = self.entries[k]
        numel = torch.Size(shape).numel()
        if kind == "ema":
            parts = [e.get_tensor(str(i)).reshape(-1) for e in self.ema]
            return torch.cat(parts)[:numel].view(shape).float()
        if name not in (self.where if self.files else self.module):
            what = "optimizer" if self.files else "module"
            raise CheckpointError(f"parameter {name} is not in DeepSpeed's {what} files (a frozen parameter?); "
                                  "`stdit ckpt convert` does not support that")
        if not self.files:
            if kind == "model":
                return self.module[name].float().view(shape).clone()
            value = self.optimizer["state"].get(i, {}).get(kind)
            return torch.zeros(shape) if value is None else value.float().view(shape).clone()
        g, offset, n, part = self.where[name]
        flats = self.flat[kind][g]
        if part is not None:  # ZeRO-3: the same slice of every rank's flat tensors
            return torch.cat([_flat_slice(f, offset, part) for f in flats])[:n].view(shape).float()
        return _flat_slice(flats, offset, n).view(shape).float()


def _flat_slice(parts: list[torch.Tensor], start: int, n: int) -> torch.Tensor:
    """Elements [start, start + n) of the concatenation of `parts`, reading only the parts it spans."""
    out, at = [], 0
    for p in parts:
        lo, hi = max(start - at, 0), min(start + n - at, p.numel())
        if lo < hi:
            out.append(p[lo:hi])
        at += p.numel()
    return torch.cat(out).clone()


def _load(f: Path):
    return safe_torch_load(f, deepspeed_globals(), mmap=True)


class _Writer:
    """full/ files of about FILE_BYTES each, hashed as they are written."""

    def __init__(self, root: Path):
        self.root, self.buffer, self.size, self.count = root, {}, 0, 0

    def add(self, key: str, t: torch.Tensor) -> None:
        self.buffer[key] = t.contiguous()
        self.size += t.numel() * 4
        if self.size >= FILE_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            fmt.write_tensors(self.root / f"convert_{self.count:05d}.safetensors", self.buffer)
            self.buffer, self.size, self.count = {}, 0, self.count + 1

    def close(self) -> None:
        self.flush()


def _add_to_manifest(path: Path, folder: str) -> None:
    """The manifest with the files under `folder` (hashed as written) added; replaced atomically."""
    raw = json.loads((path / "manifest.json").read_text())
    files = raw["files"] if raw.get("format") == 2 else raw
    for f in sorted((path / folder).rglob("*")):
        if f.is_file():
            rel, size = str(f.relative_to(path)), f.stat().st_size
            tmp_name = str((path / ".tmp-full" / f.relative_to(path / folder)).resolve())
            recorded = _WRITTEN.pop(tmp_name, None)
            digest = recorded[1] if recorded and recorded[0] == size else file_hash(f)
            files[rel] = {"size": size, "sha256": digest} if raw.get("format") == 2 else size
    fmt._write_atomic(path / "manifest.json", json.dumps(raw, indent=1))
