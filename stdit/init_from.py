"""`checkpoint.init_from`: a new run starts from another run's weights -- step 0, a fresh optimizer, LR schedule and
data order -- for curricula (images -> video -> higher resolution) and fine-tuning (text-to-video ->
image-to-video).

The weights are read from a layout-free source (a checkpoint's `full/` tensors, or an export), into the plain
model before it is sharded, so the source and the new run may have any parallel layouts. Parameters the new model
has and the source lacks (e.g. added conditioning) keep their usual initialisation; parameters only the source
has are left out; both are listed. A shape that differs is an error naming the parameters.

A checkpoint of the run itself always wins: a preempted fine-tune resumes (checkpoint.resume=auto), it does not
start again from the source (the Trainer asks here only when there is nothing to resume).
"""
from __future__ import annotations

from pathlib import Path

import torch

from parallel import checkpoint as fmt
from stdit.config import ConfigError


def find_source(path: str, kind: str, share: tuple[int, int] = (0, 1)) -> Path:
    """The directory init_from reads: an export (KIND.safetensors), a checkpoint directory, or a run directory's
    newest checkpoint. A checkpoint is verified (this process's `share` of its files' checksums) and must hold
    the layout-free copy `full/`."""
    key = f"checkpoint.init_from={path}"
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{key} does not exist; give a run directory, a checkpoint directory or an export "
                          "(`stdit ckpt export`)")
    if (p / "ema.safetensors").is_file() or (p / "model.safetensors").is_file():  # an export
        if not (p / f"{kind}.safetensors").is_file():
            raise ConfigError(f"{key} is an export without {kind}.safetensors; set checkpoint.init_weights to the "
                              "weights it holds")
        return p
    if fmt.is_run_dir(p):
        found = fmt.latest(p)
        if found is None:
            raise ConfigError(f"{key}: that run directory holds no complete checkpoint")
        p = found
    elif not (p / "manifest.json").is_file():
        raise ConfigError(f"{key} is neither a run directory (no checkpoints/), a checkpoint directory (no "
                          "manifest.json) nor an export (no ema.safetensors)")
    try:
        fmt.verify(p, share=share)
    except fmt.CheckpointError as e:
        run = p.parent.parent if p.parent.name == "checkpoints" else None
        other = fmt.newest_intact(run, skip=p) if run is not None else None
        offer = f"; the newest checkpoint that verifies is {other} (checkpoint.init_from={other})" if other else ""
        raise fmt.CheckpointError(f"{key}: {e}{offer}") from None
    if not any(f.startswith("full/") for f in fmt.read_manifest(p)):
        raise ConfigError(f"{key}: checkpoint {p} has no layout-free copy (full/), which init_from reads; write "
                          f"one with `stdit ckpt convert {p}` and start again")
    return p


def read_source(source: Path, kind: str) -> tuple[dict[str, torch.Tensor], str]:
    """(full weights of `kind`, a description of where they come from)."""
    if (source / f"{kind}.safetensors").is_file():
        return fmt.read_tensors(source / f"{kind}.safetensors"), f"export {source}"
    return fmt.FullTensors(source).state_dict(kind), f"{source} (step {fmt.read_meta(source)['step']})"


@torch.no_grad()
def init_weights(model: torch.nn.Module, source: Path, kind: str) -> str:
    """Copy the source's `kind` weights (ema | model) into the plain model's parameters of the same name; returns
    the log line: what was loaded, what is new (initialised as usual), what the source has beyond the model."""
    state, where = read_source(source, kind)
    own = model.state_dict()
    differ = [f"{k} {tuple(state[k].shape)} in the source vs {tuple(v.shape)} configured"
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if differ:
        raise ConfigError(f"checkpoint.init_from={source}: shapes differ: {'; '.join(differ)}; init_from copies "
                          "weights of the same width, depth, patch and channels (model.*, text encoder width): "
                          "set those as the source run had them")
    loaded = [k for k in own if k in state]
    new, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    for k in loaded:
        own[k].copy_(state[k])
    return (f"init_from {where}: {kind} weights, {len(loaded)} of {len(own)} tensors; "
            f"new (initialised as usual): {new if new else 'none'}; "
            f"in the source only (not used): {extra if extra else 'none'}")
