"""`stdit slurm submit RECIPE [key=value ...] --nodes N --gpus-per-node G --time T [--dry-run]` renders
slurm/train.sbatch for the allocation, checks the layout fits and submits it; `stdit slurm progress RECIPE
[key=value ...]` prints "STEP STEPS RUN_DIR" (the newest complete checkpoint's step, or 0) for the batch script.
stdit/slurm.py does the work."""
from __future__ import annotations

import argparse
import sys

from stdit import slurm


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stdit slurm submit", description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0 for CPU nodes (then give --procs-per-node)")
    p.add_argument("--procs-per-node", type=int, help="training processes per node (default: --gpus-per-node)")
    p.add_argument("--launcher", choices=("torchrun", "srun"), default="torchrun",
                   help="torchrun: one per node with c10d rendezvous; srun: one task per process")
    p.add_argument("--time", required=True, help="time limit, SLURM syntax (e.g. 24:00:00, 2-00:00:00)")
    p.add_argument("--cpus-per-proc", type=int, default=1, help="CPU cores per training process")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name", default="stdit")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="USR1 this long before the time limit: one step + one checkpoint must fit (SLURM may send "
                        "it up to 60 s early)")
    p.add_argument("--no-requeue", action="store_true", help="stop after the signal's checkpoint, do not requeue")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command, submit nothing")
    return p.parse_intermixed_args(argv)  # overrides may come after options


def main(argv: list[str]) -> None:
    if argv[:1] == ["submit"]:
        slurm.submit(parse(argv[1:]))
    elif argv[:1] == ["progress"] and len(argv) >= 2:
        step, steps, run_dir = slurm.progress(argv[1], argv[2:])
        print(step, steps, run_dir)
    else:
        print("usage: stdit slurm submit RECIPE [key=value ...] --nodes N --gpus-per-node G --time T [--dry-run] "
              "(--help for all options)", file=sys.stderr)
        raise SystemExit(2)
