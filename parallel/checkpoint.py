"""Checkpoints of a run: RUN_DIR/checkpoints/step_XXXXXXXX/ plus a `latest` pointer.

A checkpoint is written under a temporary name and renamed when complete, and `latest` is replaced
atomically after that, so a crash at any moment leaves the previous checkpoint loadable.
(Single-process form: the sharded engine state of a parallel run plugs in here.)
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = checkpoints_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save(run_dir, step: int, model, ema, optimizer, scheduler, extra: dict, config_yaml: str, keep: int) -> Path:
    """Write checkpoint `step` and point `latest` at it; keep the `keep` newest."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_state_dict(model), str(tmp / "model.safetensors"))
    save_file(_state_dict(ema), str(tmp / "ema.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "extra": extra, "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               tmp / "state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer_tmp = root / ".latest.tmp"
    pointer_tmp.write_text(name + "\n")
    os.replace(pointer_tmp, root / "latest")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a safetensors file into a module; a shape or key mismatch names the differing keys."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing (incomplete or corrupt checkpoint)")
    try:
        state = load_file(str(path))
    except Exception as e:
        raise ValueError(f"checkpoint file {path} cannot be read ({e}); it is truncated or corrupt") from None
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        details = [f"missing: {missing}" if missing else "", f"unexpected: {unexpected}" if unexpected else "",
                   "shape differs: " + ", ".join(f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                                                 for k in shape) if shape else ""]
        raise ValueError(f"checkpoint {path} does not match the configured model; "
                         + "; ".join(d for d in details if d))
    module.load_state_dict(state)


def load(path: Path, model, ema, optimizer, scheduler) -> dict:
    """Restore everything `save` wrote; returns {'step': ..., **extra}."""
    load_weights(model, path / "model.safetensors")
    load_weights(ema, path / "ema.safetensors")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return {"step": state["step"], **state["extra"]}
