"""Reading and writing checkpoint files safely: nothing read from disk runs code, every file written is hashed
as it is written.

- JSON for state (trainer.json, rng/rank_X.json); tensors in safetensors (parallel/checkpoint.py).
- Older pickles (trainer.pt, rng/rank_X.pt) and DeepSpeed's engine files: torch.load(weights_only=True) with an
  allow-list of exactly the non-tensor types they hold; anything else is refused with an error naming the file.
- hashed_open: a file whose size and sha256 are recorded while it is written (the manifest's checksums, with no
  second read).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
from pathlib import Path

import torch

HASH = "sha256"  # of every file, in the manifest


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file or the keys."""


def _read_json(path: Path, what: str):
    """JSON from a checkpoint file; a CheckpointError naming it if it is missing or not JSON."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing ({what})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({what}; {type(e).__name__}: {e}); the file is corrupt")\
            from None


# What this process wrote, hashed as it was written: {absolute path: (size, sha256)}. commit() hands the entries
# under the checkpoint being written to rank 0 (tmp/.hashes/rank_X.json), which puts them in the manifest.
_WRITTEN: dict[str, tuple[int, str]] = {}


class _HashingWriter:
    """A binary file that hashes what goes through it (torch.save and our safetensors writer write into it)."""

    def __init__(self, f):
        self.f, self.hash, self.size = f, hashlib.new(HASH), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        self.size += view.nbytes
        self.f.write(view)
        return view.nbytes

    def flush(self) -> None:
        self.f.flush()


@contextlib.contextmanager
def hashed_open(path: Path):
    """Open `path` for writing through a hashing writer; its size and hash are recorded for the manifest."""
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        yield writer
    _WRITTEN[str(Path(path).resolve())] = (writer.size, writer.hash.hexdigest())


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with hashed_open(path) as f:
        f.write(data)


def file_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def rng_state() -> dict:
    import random

    import numpy as np
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8)


def rng_to_json(state: dict) -> dict:
    """RNG states as plain JSON: torch's byte states in base64, Python's and NumPy's Mersenne Twisters as ints."""
    version, mt, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    return {"format": 1, "torch": _b64(state["torch"]),
            "cuda": None if state["cuda"] is None else [_b64(t) for t in state["cuda"]],
            "python": [version, list(mt), gauss],
            "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}


def rng_from_json(d: dict) -> dict:
    import numpy as np
    version, mt, gauss = d["python"]
    name, keys, pos, has_gauss, cached = d["numpy"]
    return {"torch": _unb64(d["torch"]), "cuda": None if d["cuda"] is None else [_unb64(s) for s in d["cuda"]],
            "python": (int(version), tuple(int(x) for x in mt), None if gauss is None else float(gauss)),
            "numpy": (str(name), np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))}


def _numpy_array_globals() -> list:
    """What a pickled NumPy uint32 array (the legacy RNG files' NumPy state) needs: rebuilding an ndarray of a
    dtype, nothing else; under its name in NumPy 2 and in NumPy 1 (which wrote numpy.core...)."""
    import numpy as np
    core = np._core if hasattr(np, "_core") else np.core
    rebuild = core.multiarray._reconstruct
    return [rebuild, (rebuild, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            np.dtypes.UInt32DType]


def deepspeed_globals() -> list:
    """The non-tensor objects DeepSpeed 0.19's engine files hold (ZeRO optimizer states: the loss scaler, the
    ZeRO stage enum, tensor-fragment addresses); plain data classes, allow-listed by name."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path, allow: list = (), map_location="cpu", mmap: bool = False):
    """torch.load(weights_only=True) with only `allow` added to torch's own allow-list (tensors, containers,
    numbers, strings); a file holding anything else is refused with an error naming it, and nothing of it runs.
    `mmap`: tensors are read from the file as they are used."""
    import pickle
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        text = str(e)
        what = [x.strip() for x in text.splitlines() if re.search(r"unsupported|blocked|not an allowed", x, re.I)]
        if what:
            raise CheckpointError(
                f"{path} holds an object that is not plain data or tensors ({what[0].rstrip('.')}); refused: "
                "unpickling it could run code. Use checkpoints from sources you trust, or retrain") from None
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {text.splitlines()[0] if text else ''}); "
                              "the file is truncated or corrupt") from None


def safe_checkpoint_engine(config_params=None):
    """DeepSpeed's torch checkpoint engine, made safe: it loads with weights_only=True and only DeepSpeed's own
    plain types allow-listed (deepspeed_globals), and hashes what it saves as it writes it (for the manifest).
    Installed as `engine.checkpoint_engine`, it is what every DeepSpeed load and save of engine files goes
    through (the module states, ZeRO optimizer partitions and pipeline layer files)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str):
            with hashed_open(Path(path)) as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)

        def load(self, path: str, map_location=None):
            return safe_torch_load(path, deepspeed_globals(), map_location=map_location)
    return SafeCheckpointEngine(config_params)


def read_rng(path: Path, rank: int) -> dict:
    """A rank's RNG states: rng/rank_X.json, or (older checkpoints) rng/rank_X.pt read without code execution."""
    new, old = path / "rng" / f"rank_{rank:05d}.json", path / "rng" / f"rank_{rank:05d}.pt"
    if not new.is_file() and old.is_file():
        return safe_torch_load(old, _numpy_array_globals())
    try:
        return rng_from_json(_read_json(new, "a rank's random number generator states"))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{new} does not hold RNG states ({type(e).__name__}: {e}); the file is corrupt")\
            from None


def read_trainer_state(path: Path) -> dict:
    """trainer.json (LR schedule), or trainer.pt of older checkpoints read without code execution."""
    if not (path / "trainer.json").is_file() and (path / "trainer.pt").is_file():
        return safe_torch_load(path / "trainer.pt")
    state = _read_json(path / "trainer.json", "the trainer's state: LR schedule")
    if not isinstance(state, dict) or not isinstance(state.get("scheduler"), dict):
        raise CheckpointError(f"{path / 'trainer.json'} does not hold a trainer state (no scheduler); it is corrupt")
    return state
