"""`stdit train RECIPE [key=value ...]` (also `python -m stdit.train ...`): train the stage the recipe names
(run.stage: dit -> stdit.train.Trainer, vae -> stdit.train_vae.VAETrainer)."""
from __future__ import annotations

import re

from parallel.dims import launch_env
from stdit.config import TrainingError, load_config
from stdit.train import Trainer
from stdit.train_vae import VAETrainer


def main(argv: list[str]) -> None:
    # the deepspeed launcher passes --local_rank=N (LOCAL_RANK is in the environment as well)
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: stdit train RECIPE [key=value ...]   (or python -m stdit.train RECIPE [key=value ...])")
        raise SystemExit(0 if argv else 2)
    cfg = load_config(argv[0], argv[1:])
    try:
        trainer = VAETrainer(cfg) if cfg.run.stage == "vae" else Trainer(cfg)
        history = trainer.train()
    except RuntimeError as e:
        failure = collective_failure(e, cfg.parallel.timeout_s)
        if failure is None:
            raise
        raise failure from None
    if history and launch_env()[0] == 0:
        first, last = history[0], history[-1]
        print(f"done: step {last['step']}, loss {first['loss']:.4f} -> {last['loss']:.4f}; run dir {cfg.run.dir}")


def collective_failure(e: RuntimeError, timeout_s: float) -> TrainingError | None:
    """A process-group error (a collective or the rendezvous timed out, or a peer vanished) as one line naming
    parallel.timeout_s; None for any other error. gloo raises these; NCCL's watchdog ends the process itself."""
    import torch.distributed as dist
    if isinstance(e, TrainingError):
        return None
    text = str(e)
    gloo = re.search(r"gloo/|Gloo", text) is not None
    if not (isinstance(e, dist.DistError) or gloo):
        return None
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0] if text.strip() else type(e).__name__)
    detail = detail.split(". ")[0].rstrip(".")  # gloo adds advice and emoji after the first sentence
    rank = launch_env()[0]
    if re.search(r"timed out|timeout", text, re.IGNORECASE):
        return TrainingError(
            f"rank {rank}: a collective waited longer than parallel.timeout_s={timeout_s:g} s for the other processes "
            f"({detail}): one of them is stopped, hung or unreachable; this process stops. Find that process (its "
            "log, py-spy dump), or raise parallel.timeout_s if a step may legitimately take that long")
    if re.search(r"closed by peer|reset by peer|broken pipe|connection refused", text, re.IGNORECASE):
        return TrainingError(
            f"rank {rank}: another process of the run exited during a collective ({detail}); its log says why. "
            "Under torchrun --max-restarts the group restarts from the newest checkpoint")
    return None
