"""Checkpoints of a run: RUN_DIR/checkpoints/step_XXXXXXXX/ and a `latest` pointer.

A checkpoint directory holds
  engine/              DeepSpeed's sharded model and optimizer state (engine.save_checkpoint: each rank its shard)
  ema/                 the EMA weights, sharded like the model (one file per pp x tp [x dp under ZeRO-3] shard)
  full/                the layout-free copy: full fp32 tensors under the plain model's names (model/, ema/,
                       exp_avg/, exp_avg_sq/), spread over the ranks' files. A resume on another layout, export
                       and generation read it; a single process writes only this. A distributed run writes it
                       into every checkpoint, the last one or none (checkpoint.full_copy); parallel/convert.py
                       builds it offline from engine/ and ema/ (whose files list their parameters).
  rng/rank_XXXXX.json  every rank's RNG states (JSON)
  trainer.json         LR scheduler state (JSON)
  meta.json            step, tokens and samples seen, layout, the model's parameter shapes
  config.yaml          the resolved config
  manifest.json        every file with its size and sha256, written last: a missing, truncated or altered file is
                       named on load

Every rank writes under `.tmp-step_X`, hashing each file as it writes it (no second read); once all have finished
(barrier), rank 0 writes the manifest, renames the directory and only then replaces `latest`, so a kill at any
moment leaves the previous checkpoint loadable.

Nothing a checkpoint holds is unpickled with code execution: tensors are safetensors, state is JSON; the pickle
files of older checkpoints (trainer.pt, rng/rank_*.pt) and DeepSpeed's engine files are read with
`torch.load(weights_only=True)` and an allow-list of exactly the non-tensor types they hold (SafeCheckpointEngine).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from parallel.gather import full as full_of
from parallel.gather import _tp_sharded, gather_tp, is_zero3, local, slice_tp, zero3_partition
from parallel.safe_io import (HASH, _WRITTEN, CheckpointError, _read_json, file_hash, hashed_open, rng_state,
                             rng_to_json, write_bytes)

OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _is_complete(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def _pointer(run_dir: str | Path) -> str | None:
    """The step directory name `checkpoints/latest` names, or None (no pointer, or an unreadable one)."""
    pointer = checkpoints_dir(run_dir) / "latest"
    try:
        name = pointer.read_text().strip() if pointer.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None
    return name if name and re.fullmatch(r"step_\d+", name) else None


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (`latest`, or the newest step_* with a manifest), or None.
    Complete means it has a manifest; whether its files verify is `verify`'s question (see `candidates`)."""
    found = candidates(run_dir)
    return found[0] if found else None


def candidates(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, newest first: the one `latest` names, then older step_* by step. Step
    directories newer than the one `latest` names are left out (a run restarted with checkpoint.resume=never)."""
    root, name = checkpoints_dir(run_dir), _pointer(run_dir)
    steps = sorted((p for p in root.glob("step_*") if p.is_dir() and _is_complete(p)), reverse=True)
    if name is not None and (root / name).is_dir():
        steps = [p for p in steps if p.name < name]
        if _is_complete(root / name):
            steps.insert(0, root / name)
    return steps


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def begin(run_dir, step: int) -> Path:
    """The temporary directory every rank writes checkpoint `step` into (collective)."""
    tmp = checkpoints_dir(run_dir) / f".tmp-step_{step:08d}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


def commit(run_dir, tmp: Path, keep: int) -> Path:
    """After every rank has written its part: manifest, rename, `latest`, prune to `keep` (collective)."""
    mine = {k: v for k, v in _WRITTEN.items() if Path(k).is_relative_to(tmp.resolve())}
    for k in mine:
        del _WRITTEN[k]
    (tmp / ".hashes").mkdir(exist_ok=True)
    (tmp / ".hashes" / f"rank_{_rank():05d}.json").write_text(
        json.dumps({str(Path(k).relative_to(tmp.resolve())): v for k, v in mine.items()}))
    _barrier()
    root, final = checkpoints_dir(run_dir), checkpoints_dir(run_dir) / tmp.name.removeprefix(".tmp-")
    if _rank() == 0:
        recorded = {}
        for f in sorted((tmp / ".hashes").glob("*.json")):
            recorded.update(json.loads(f.read_text()))
        shutil.rmtree(tmp / ".hashes")
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                rel, size = str(f.relative_to(tmp)), f.stat().st_size
                # hashed as written, or (a file a library wrote on its own, e.g. DeepSpeed's recovery script) now
                digest = recorded[rel][1] if rel in recorded and recorded[rel][0] == size else file_hash(f)
                files[rel] = {"size": size, HASH: digest}
        _write_atomic(tmp / "manifest.json", json.dumps({"format": 2, "hash": HASH, "files": files}, indent=1))
        if final.exists():  # re-reaching a step (resumed from an older checkpoint): move the old one aside first
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name + "\n")
        older = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name < final.name)
        for old in older[:max(len(older) - (keep - 1), 0)] + list(root.glob(".tmp-step_*")):
            shutil.rmtree(old, ignore_errors=True)  # beyond `keep`, and partial ones left by killed runs
    _barrier()
    return final


def checkpoint_bytes(params: int, distributed: bool, full: bool, weight_bytes: int, zero: int,
                     stored: int | None = None) -> dict[str, int]:
    """Estimated bytes of a checkpoint of a model of `params` parameters, per part (its tensors; headers, RNG and
    JSON files are small): full/ 16 per parameter (fp32 model, EMA, 2 Adam moments). A distributed run adds, per
    parameter its shards hold (`stored`: TP-replicated ones once per tensor rank), its EMA shards (4) and
    DeepSpeed's engine files: the weights (`weight_bytes`; not under ZeRO-3, whose module files hold none), Adam's
    moments (8) and the fp32 master copy (4) that ZeRO and bf16 keep."""
    parts = {"full/": 16 * params if full else 0}
    if distributed:
        stored = params if stored is None else stored
        master = 4 if zero > 0 or weight_bytes < 4 else 0
        parts.update({"ema/": 4 * stored, "engine/": stored * ((weight_bytes if zero < 3 else 0) + 8 + master)})
    return parts


def free_bytes(run_dir) -> int:
    """Free bytes on the filesystem of a run directory (its nearest existing ancestor)."""
    path = Path(run_dir).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def no_space(e: BaseException) -> BaseException | None:
    """The full-disk error an exception is, or was raised from (torch.save's writer wraps it), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return e
        e = e.__cause__ or e.__context__
    return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def base_optimizer(optimizer):
    """The torch optimizer that holds the Adam state (DeepSpeed's ZeRO wrappers keep it as `.optimizer`)."""
    return getattr(optimizer, "optimizer", optimizer)


def optimizer_step(optimizer) -> float:
    """Adam's step count (the same for every parameter: all are updated each step); 0 before the first step."""
    states = [s for s in base_optimizer(optimizer).state.values() if "step" in s]
    return float(states[0]["step"]) if states else 0.0


def _optimizer_state_full(p, key: str, optimizer, stepped: bool) -> torch.Tensor:
    """Full (TP-gathered) Adam state `key` of parameter p, whatever owns it (collective); zeros before any step
    and for a parameter that has never had a gradient (torch's AdamW creates its state at its first update)."""
    from deepspeed.utils import safe_get_full_optimizer_state
    if is_zero3(p) or hasattr(p, "_hp_mapping"):
        value = safe_get_full_optimizer_state(p, key) if stepped else None  # gathered over the ZeRO partitions
    else:
        value = base_optimizer(optimizer).state.get(p, {}).get(key)
    if value is None:
        value = torch.zeros_like(_full_shape_local(p))
    return gather_tp(p, value)


def _full_shape_local(p) -> torch.Tensor:
    """An empty-valued tensor shaped like p's TP-local tensor (ZeRO-3 keeps p.data empty)."""
    return torch.empty(p.ds_shape, dtype=torch.float32, device=p.ds_tensor.device) if is_zero3(p) else p.data.float()


def _weight_full(p) -> torch.Tensor:
    """Full fp32 weight: ZeRO's fp32 master where there is one, else the module's tensor (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param
    master = safe_get_full_fp32_param(p) if (is_zero3(p) or hasattr(p, "_hp_mapping")) else None
    return gather_tp(p, master) if master is not None else full_of(p, local(p))


def tp_dim(p) -> int | None:
    """The dimension tensor parallelism splits parameter p along, or None."""
    return p.partition_dim if _tp_sharded(p) else None


def write_full(tmp: Path, named_params: list, ema: list, optimizer, rank_in_stage: int, stage_size: int) -> None:
    """The layout-free copy of this pipeline stage's parameters. Every rank of the stage joins each gather; the
    parameters are written round-robin by the stage's ranks, so no rank holds more than its share."""
    mine, stepped = {}, optimizer_step(optimizer) > 0
    for i, ((name, p), e) in enumerate(zip(named_params, ema)):
        entries = {"model": _weight_full(p), "ema": full_of(p, e),
                   **{k: _optimizer_state_full(p, k, optimizer, stepped) for k in OPTIM_KEYS}}
        if i % stage_size == rank_in_stage:
            mine.update({f"{kind}/{name}": t.float() for kind, t in entries.items()})
    if mine:
        write_tensors(tmp / "full" / f"rank_{_rank():05d}.safetensors", mine)


def write_rank_state(tmp: Path) -> None:
    write_bytes(tmp / "rng" / f"rank_{_rank():05d}.json", json.dumps(rng_to_json(rng_state())).encode())


def write_main(tmp: Path, meta: dict, trainer_state: dict, config_yaml: str) -> None:
    """Rank 0's part: meta.json, trainer.json (plain JSON: no pickle), config.yaml."""
    write_bytes(tmp / "meta.json", json.dumps(meta, indent=1).encode())
    write_bytes(tmp / "trainer.json", json.dumps(trainer_state, indent=1).encode())
    write_bytes(tmp / "config.yaml", config_yaml.encode())


def ema_shard_name(pp: int, tp: int, dp: int) -> str:
    return f"pp{pp:02d}_tp{tp:02d}_dp{dp:03d}.safetensors"


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, streamed one tensor at a time (moved to the CPU one at a time) through a hashing
    writer: the manifest's hash costs no second read, and no copy of the whole file is held in memory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        header[k] = {"dtype": _ST_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    with hashed_open(path) as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for v in tensors.values():
            if v.numel():
                f.write(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (a shard of this checkpoint)")
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read ({e}); it is truncated or corrupt") from None


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------

def read_manifest(path: Path) -> dict[str, dict]:
    """{file: {"size": bytes, "sha256": hex or absent}} of a checkpoint (manifests written before checksums hold
    sizes only)."""
    raw = _read_json(path / "manifest.json", "the checkpoint's list of files")
    try:
        if isinstance(raw, dict) and raw.get("format") == 2:
            files = {str(k): {"size": int(v["size"]), HASH: str(v[HASH])} for k, v in raw["files"].items()}
        else:  # {file: size}
            files = {str(k): {"size": int(v)} for k, v in raw.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'manifest.json'} is not a checkpoint manifest ({type(e).__name__}: {e}); "
                              "it is corrupt") from None
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{path / 'manifest.json'} names {rel!r}, outside the checkpoint; it is corrupt")
    return files


def verify(path: str | Path, hashes: bool = True, share: tuple[int, int] = (0, 1)) -> Path:
    """A complete, intact checkpoint directory, or an error naming the file that is missing, truncated or does
    not match its checksum. With `share` = (i, n) only every n-th file from the i-th is hashed (the ranks of a
    run split the reading); `hashes=False` checks sizes only."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not (path / "manifest.json").is_file():
        if path.name.startswith(".tmp-"):
            raise CheckpointError(f"{path} is a checkpoint whose writing was interrupted; resume from a complete one")
        raise CheckpointError(f"checkpoint {path} is incomplete (no manifest.json): its writing was interrupted; "
                              "resume from an earlier one")
    files = read_manifest(path)
    for i, (rel, entry) in enumerate(files.items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {rel} (a shard or state file); it cannot be loaded")
        if f.stat().st_size != entry["size"]:
            raise CheckpointError(f"checkpoint {path}: {rel} is truncated or altered ({f.stat().st_size} bytes, "
                                  f"{entry['size']} written)")
        if hashes and HASH in entry and i % share[1] == share[0] and file_hash(f) != entry[HASH]:
            raise CheckpointError(f"checkpoint {path}: {rel} does not match its {HASH} checksum (the file is "
                                  "corrupt or was altered)")
    read_meta(path)
    return path


def newest_intact(run_dir: str | Path, skip: Path | None = None) -> Path | None:
    """The newest checkpoint of a run that verifies (every file hashed), other than `skip`."""
    for c in candidates(run_dir):
        if skip is not None and c.resolve() == Path(skip).resolve():
            continue
        try:
            return verify(c)
        except CheckpointError:
            continue
    return None


def verify_or_offer(path: Path, hashes: bool = True) -> Path:
    """verify(path); its error also names the newest checkpoint of the same run that verifies."""
    try:
        return verify(path, hashes)
    except CheckpointError as e:
        run = path.parent.parent if path.parent.name == "checkpoints" else None
        other = newest_intact(run, skip=path) if run is not None else None
        offer = (f"; the newest checkpoint that verifies is {other} (checkpoint.resume={other})" if other is not None
                 else "; no other checkpoint of this run verifies" if run is not None else "")
        raise CheckpointError(f"{e}{offer}") from None


def read_meta(path: Path) -> dict:
    meta = _read_json(Path(path) / "meta.json", "the checkpoint's step, data position and model shapes")
    if not isinstance(meta, dict) or not {"step", "params", "layout"} <= set(meta):
        raise CheckpointError(f"{Path(path) / 'meta.json'} does not hold a checkpoint's meta data (step, params, "
                              "layout); it is corrupt")
    return meta


def check_config(path: Path, config_yaml: str, keys: list[str]) -> list[str]:
    """The `keys` (dotted, e.g. model.temporal_causal) whose value in the checkpoint's config.yaml differs from
    `config_yaml`, each as 'key: checkpoint value -> configured value'; keys one of them lacks are skipped."""
    import yaml
    try:
        saved = yaml.safe_load((Path(path) / "config.yaml").read_text()) or {}
    except FileNotFoundError:
        return []
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{Path(path) / 'config.yaml'} is not valid YAML ({e}); the file is corrupt") from None
    now = yaml.safe_load(config_yaml) or {}

    def get(d, key):
        for part in key.split("."):
            if not isinstance(d, dict) or part not in d:
                return KeyError
            d = d[part]
        return d
    out = []
    for key in keys:
        a, b = get(saved, key), get(now, key)
        if a is not KeyError and b is not KeyError and a != b:
            out.append(f"{key}: {a!r} in the checkpoint, {b!r} configured")
    return out


def check_shapes(path: Path, meta: dict, model_shapes: dict[str, tuple], changed: list[str] = ()) -> None:
    """The configured model's parameters must be the checkpoint's, and its architecture keys the same (`changed`:
    from check_config); the error lists the config keys and the parameters that differ."""
    saved = {k: tuple(v) for k, v in meta["params"].items()}
    missing, extra = sorted(set(model_shapes) - set(saved)), sorted(set(saved) - set(model_shapes))
    shape = sorted(k for k in set(saved) & set(model_shapes) if saved[k] != tuple(model_shapes[k]))
    if missing or extra or shape or changed:
        parts = ["changed: " + ", ".join(changed) + " (set them back, or start a new run: another run.dir or "
                 "checkpoint.resume=never)" if changed else "",
                 f"not in the checkpoint: {missing}" if missing else "",
                 f"not in the model: {extra}" if extra else "",
                 "shape differs: " + ", ".join(f"{k} {saved[k]} in the checkpoint vs {tuple(model_shapes[k])}"
                                               for k in shape) if shape else ""]
        raise CheckpointError(f"checkpoint {path} does not match the configured model (model.* keys); "
                              + "; ".join(p for p in parts if p))


class FullTensors:
    """Lazy reader of a checkpoint's layout-free tensors: `get('model', name)` reads one tensor."""

    def __init__(self, path: Path):
        files = sorted((path / "full").glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"checkpoint {path} holds no layout-free copy full/ (it was written with "
                                  f"checkpoint.full_copy=last or never); build it with `stdit ckpt convert {path}`")
        self.index = {}
        for f in files:
            try:
                with safe_open(str(f), "pt") as h:
                    self.index.update({k: f for k in h.keys()})
            except Exception as e:
                raise CheckpointError(f"{f} cannot be read ({e}); it is truncated or corrupt") from None
        self.path = path

    def get(self, kind: str, name: str) -> torch.Tensor:
        key = f"{kind}/{name}"
        if key not in self.index:
            raise CheckpointError(f"checkpoint {self.path} holds no {key}")
        with safe_open(str(self.index[key]), "pt") as h:
            return h.get_tensor(key)

    def state_dict(self, kind: str) -> dict[str, torch.Tensor]:
        prefix = kind + "/"
        return {k[len(prefix):]: self.get(kind, k[len(prefix):]) for k in self.index if k.startswith(prefix)}


def has_full(path: Path) -> bool:
    """Whether a checkpoint holds the layout-free copy (checkpoint.full_copy, or `stdit ckpt convert`): files
    under full/ that its manifest lists."""
    return any(k.startswith("full/") for k in read_manifest(Path(path)))


def read_weights(path: str | Path, kind: str = "ema") -> dict[str, torch.Tensor]:
    """Full weights (`ema` or `model`) of a checkpoint directory or of an exported directory."""
    path = Path(path)
    if (path / f"{kind}.safetensors").is_file():
        return read_tensors(path / f"{kind}.safetensors")
    return FullTensors(verify_or_offer(path)).state_dict(kind)


def load_weights(module: torch.nn.Module, path: str | Path, kind: str = "ema") -> None:
    """Load full weights into a plain model; a key or shape mismatch lists the differing keys."""
    state = read_weights(path, kind)
    check_shapes(Path(path), {"params": {k: list(v.shape) for k, v in state.items()}},
                 {k: tuple(v.shape) for k, v in module.state_dict().items()})
    module.load_state_dict(state)


@torch.no_grad()
def load_full_state(full: FullTensors, named_params: list, ema: list, optimizer, step: float) -> None:
    """Fill fp32 masters, Adam state and EMA of this rank's (sharded) parameters from full tensors, on any layout.
    The module weights were loaded into the plain model before it was sharded."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    base = base_optimizer(optimizer)
    # Adam's state, as torch.optim.AdamW lays it out after `step` steps, for the tensors it updates (ZeRO-3
    # empties its param groups between steps and keeps the flat partitions aside)
    flat = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    for q in flat if flat is not None else [q for g in base.param_groups for q in g["params"]]:
        state = base.state[q]  # DeepSpeed links views of this dict's tensors: fill it, do not replace it
        # the fused kernel reads its step count on the device, the others on the host (as AdamW makes it)
        state["step"] = torch.tensor(step, dtype=torch.float32, device=q.device if base.defaults.get("fused") else None)
        for k in OPTIM_KEYS:
            state[k] = torch.zeros_like(q)
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, bf16: link views of that state
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    for (name, p), e in zip(named_params, ema):
        weight = slice_tp(p, full.get("model", name))
        values = {k: slice_tp(p, full.get(k, name)).to(e.device) for k in OPTIM_KEYS}
        if is_zero3(p):
            # DeepSpeed's stage-3 setter narrows past the end of an unevenly split tensor: slice it ourselves
            for key, v in [(None, weight), *values.items()]:
                part, _ = optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
                part.copy_(zero3_partition(p, v.to(part.device))[:part.numel()])
        elif hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, weight.to(p.device))
            for k, v in values.items():
                safe_set_full_optimizer_state(p, v, k)
        else:
            for k, v in values.items():
                base.state[p][k].copy_(v)
        ema_full = slice_tp(p, full.get("ema", name))
        e.copy_(zero3_partition(p, ema_full) if is_zero3(p) else ema_full.view_as(e))


# ----------------------------------------------------------------------------------------------------------
# Inspection and export (`stdit ckpt info | export`)
# ----------------------------------------------------------------------------------------------------------

def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return not (path / "manifest.json").is_file() and checkpoints_dir(path).is_dir()


def resolve(path: str | Path, hashes: bool = True) -> Path:
    """A checkpoint directory, or a run directory's newest complete checkpoint; verified (a mismatch names the
    file and the newest checkpoint that verifies)."""
    path = Path(path)
    if is_run_dir(path):
        found = latest(path)
        if found is None:
            raise CheckpointError(f"run {path} holds no complete checkpoint")
        path = found
    return verify_or_offer(path, hashes)


def describe(path: str | Path, hashes: bool = True) -> str:
    """What a checkpoint holds, for `stdit ckpt info` (`hashes=False`: sizes only, --fast)."""
    path = resolve(path, hashes)
    meta, files = read_meta(path), read_manifest(path)
    params = sum(torch.Size(s).numel() for s in meta["params"].values())
    hashed = sum(HASH in e for e in files.values())

    def part(prefix: str) -> str:
        sel = {k: v["size"] for k, v in files.items() if k.startswith(prefix)}
        return f"{len(sel)} files, {sum(sel.values()) / 2 ** 20:.2f} MiB" if sel else "none"
    return "\n".join([
        f"checkpoint   {path}",
        f"step         {meta['step']} (optimizer step {meta['optimizer_step']:.0f})",
        f"data         {meta['samples_seen']} samples, {meta['tokens_seen']} tokens seen",
        f"layout       {meta['layout']} ({meta['world_size']} processes)",
        f"model        {len(meta['params'])} tensors, {params:,} parameters",
        f"engine/      {part('engine/')}  (DeepSpeed shards: resume on the same layout)",
        f"ema/         {part('ema/')}  (EMA shards)",
        f"full/        {part('full/')}  (layout-free model, EMA, Adam state: any layout, export)" if has_full(path)
        else f"full/        none (checkpoint.full_copy=last or never): resume on its layout only; "
             f"`stdit ckpt convert {path}` builds it for another layout, export, generate",
        f"complete     yes: {len(files)} files, sizes as written",
        "checksums    " + ("none recorded (written before checksums): sizes only" if not hashed else
                            f"verified: {HASH} of {hashed} files as written" if hashes else
                            f"not checked (--fast); {hashed} recorded"),
    ])


def export(path: str | Path, out: str | Path) -> Path:
    """Consolidated EMA and raw weights (safetensors) plus the resolved config: what `stdit generate --run OUT`
    loads on any single device."""
    path, out = resolve(path), Path(out)
    if (out / "ema.safetensors").exists() or (out / "model.safetensors").exists():
        raise CheckpointError(f"{out} already holds exported weights; choose another directory or remove them")
    full = FullTensors(path)
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("ema", "model"):
        write_tensors(out / f"{kind}.safetensors", full.state_dict(kind),
                      metadata={"step": str(read_meta(path)["step"]), "source": str(path)})
        _WRITTEN.pop(str((out / f"{kind}.safetensors").resolve()), None)
    shutil.copyfile(path / "config.yaml", out / "config.yaml")
    stats = path.parent.parent / "latent_stats.json"  # an autoencoder's latent scaling, kept in its run dir
    if stats.is_file():
        shutil.copyfile(stats, out / stats.name)
    return out
