"""SLURM: render slurm/train.sbatch for a recipe and an allocation, check the layout fits, submit it; and the run's
progress, from which the batch script decides whether it is finished or should be requeued.

The commands (`stdit slurm submit`, `stdit slurm progress`): stdit/commands/slurm.py.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from stdit.config import ConfigError, load_config, validate_layout

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"


def progress(recipe: str, overrides: list[str]) -> tuple[int, int, Path]:
    """(step of the newest complete checkpoint or 0, run.steps, run.dir) of a recipe + overrides."""
    from parallel import checkpoint
    cfg = load_config(recipe, overrides)
    run_dir = Path(cfg.run.dir).resolve()
    latest = checkpoint.latest(run_dir)
    step = checkpoint.read_meta(latest)["step"] if latest is not None else 0
    return step, cfg.run.steps, run_dir


def check_layout(args: argparse.Namespace, cfg) -> int:
    """Processes per node after checking the allocation can hold the recipe's parallel layout."""
    if args.nodes < 1 or args.gpus_per_node < 0:
        raise ConfigError(f"--nodes {args.nodes} --gpus-per-node {args.gpus_per_node}: need >= 1 node, >= 0 GPUs")
    procs = args.procs_per_node if args.procs_per_node is not None else args.gpus_per_node
    if procs < 1:
        raise ConfigError("--gpus-per-node 0 (CPU nodes): give the training processes per node, --procs-per-node N")
    if args.gpus_per_node and procs != args.gpus_per_node:
        raise ConfigError(f"--procs-per-node {procs} must equal --gpus-per-node {args.gpus_per_node}: one "
                          "process per GPU")
    world = args.nodes * procs
    dims = validate_layout(cfg, world)  # names the parallel.* keys that do not divide
    if dims.tp > procs:
        print(f"warning: parallel.tp={dims.tp} spans nodes ({procs} processes per node); tensor parallelism "
              "communicates in every layer, keep it within a node", file=sys.stderr)
    print(f"layout {dims.describe()} on {args.nodes} node(s) x {procs} = {world} processes", file=sys.stderr)
    return procs


def render(args: argparse.Namespace, procs: int, run_dir: Path) -> str:
    """slurm/train.sbatch with this allocation's #SBATCH lines, the interpreter and the recipe + overrides."""
    if not TEMPLATE.is_file():
        raise FileNotFoundError(f"{TEMPLATE} is missing: `stdit slurm submit` needs a source checkout "
                                "(pip install -e .)")
    tasks = procs if args.launcher == "srun" else 1
    cpus = args.cpus_per_proc * (1 if args.launcher == "srun" else procs)
    sbatch = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", f"--ntasks-per-node={tasks}",
              f"--cpus-per-task={cpus}", f"--time={args.time}", f"--signal=B:USR1@{args.signal_seconds}",
              "--requeue" if not args.no_requeue else "--no-requeue", "--open-mode=append",
              f"--chdir={Path.cwd()}", f"--output={run_dir / 'slurm' / '%j.log'}"]
    if args.gpus_per_node:
        sbatch.append(f"--gpus-per-node={args.gpus_per_node}")
    sbatch += [f"--partition={args.partition}"] * bool(args.partition)
    sbatch += [f"--account={args.account}"] * bool(args.account)
    lines = TEMPLATE.read_text().splitlines()
    body = [line for line in lines[1:] if not line.startswith("#SBATCH")]
    # the job runs this interpreter and this checkout's code, whatever the compute nodes' PATH says
    env = {"STDIT_PYTHON": sys.executable, "PYTHONPATH": f"{TEMPLATE.parents[1]}${{PYTHONPATH:+:$PYTHONPATH}}",
           "STDIT_LAUNCHER": args.launcher, "STDIT_PROCS_PER_NODE": procs,
           "STDIT_REQUEUE": f"${{STDIT_REQUEUE:-{int(not args.no_requeue)}}}"}  # slurm/chain.sh sets 0
    return "\n".join([lines[0]] + [f"#SBATCH {s}" for s in sbatch]
                     + [f'export {k}="{v}"' for k, v in env.items()]
                     + [f"set -- {shlex.join([args.recipe, *args.overrides])}"] + body) + "\n"


def submit(args: argparse.Namespace) -> None:
    """Load the recipe, check the layout, render the script and sbatch it (or print it with args.dry_run)."""
    cfg = load_config(args.recipe, args.overrides)
    procs = check_layout(args, cfg)
    run_dir = Path(cfg.run.dir).resolve()
    script = render(args, procs, run_dir)
    # SLURM opens the job's --output file there before the script runs: a missing directory fails the job silently
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    path = run_dir / "slurm" / "submit.sbatch"
    if args.dry_run:
        print(script, end="")
        print(f"# dry run: created {run_dir / 'slurm'} for the logs; submitting would write {path} and run: "
              f"sbatch --parsable {path}", file=sys.stderr)
        return
    path.write_text(script)
    if shutil.which("sbatch") is None:
        raise SystemExit(f"stdit slurm submit: no `sbatch` here: run it on a SLURM login node (the script is "
                         f"{path}; --dry-run prints it)")
    out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"stdit slurm submit: sbatch failed: {out.stderr.strip()}")
    job = out.stdout.strip().split(";")[0]
    print(f"submitted job {job}; log {run_dir / 'slurm' / f'{job}.log'}")
