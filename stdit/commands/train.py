"""`stdit train RECIPE [key=value ...]` (also `python -m stdit.train ...`): train the stage the recipe names
(run.stage: dit -> stdit.train.Trainer, vae -> stdit.train_vae.VAETrainer)."""
from __future__ import annotations

from parallel.dims import launch_env
from stdit.config import load_config
from stdit.train import Trainer
from stdit.train_vae import VAETrainer


def main(argv: list[str]) -> None:
    # the deepspeed launcher passes --local_rank=N (LOCAL_RANK is in the environment as well)
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: stdit train RECIPE [key=value ...]   (or python -m stdit.train RECIPE [key=value ...])")
        raise SystemExit(0 if argv else 2)
    cfg = load_config(argv[0], argv[1:])
    trainer = VAETrainer(cfg) if cfg.run.stage == "vae" else Trainer(cfg)
    history = trainer.train()
    if history and launch_env()[0] == 0:
        first, last = history[0], history[-1]
        print(f"done: step {last['step']}, loss {first['loss']:.4f} -> {last['loss']:.4f}; run dir {cfg.run.dir}")
