import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from stdit.config import ModelConfig


def tiny_model_cfg(**kw) -> ModelConfig:
    base = dict(in_channels=3, patch_size=[1, 2, 2], hidden_size=32, depth=2, num_heads=4, attention_backend="reference")
    base.update(kw)
    return ModelConfig(**base)


def randomize(model: torch.nn.Module, std: float = 0.15, seed: int = 0) -> torch.nn.Module:
    """Replace the zero init (which makes every output 0) by random weights, so comparisons can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)
    return model


def rand_videos(shapes, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(channels, *s, generator=g) for s in shapes]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def logged_losses(run_dir) -> list[float]:
    """The loss of every line of a run's metrics.jsonl."""
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def start_srun_style(args: list[str], ntasks: int = 2, stdout=subprocess.PIPE) -> list[subprocess.Popen]:
    """`python -m stdit.train ARGS` as srun starts tasks: rank, size and local rank only in SLURM_* variables."""
    port, procs = str(free_port()), []
    for rank in range(ntasks):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "stdit.train", *args], env=env, text=True,
                                      stdout=stdout, stderr=subprocess.PIPE))
    return procs


@pytest.fixture(scope="session")
def zygote():
    """The warm launcher of tests/zygote.py, shared by every test of the session that forks ranks from it."""
    from zygote import Zygote
    with Zygote() as z:
        yield z
