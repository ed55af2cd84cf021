"""`stdit plan RECIPE [key=value ...] --gpus N [--gpu-mem GIB] [--suggest]`: parameters, model FLOPs and memory per
GPU of a recipe's model and layout, from formulas, before any GPU is used (stdit/estimate.py)."""
from __future__ import annotations

import argparse
import json

from stdit.config import ConfigError, load_config
from stdit.estimate import GIB, Estimator, layout_of, report, suggestions


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="stdit plan", description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--gpus", type=int, required=True, help="processes (GPUs) in all")
    p.add_argument("--gpu-mem", type=float, help="GiB of memory per GPU, to say whether it fits")
    p.add_argument("--suggest", action="store_true", help="list layouts of --gpus that fit in --gpu-mem")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: fp32 and the reference attention kernel, as the trainer runs on CPU")
    p.add_argument("--json", action="store_true", help="print the figures as JSON (bytes, FLOPs)")
    args = p.parse_intermixed_args(argv)
    if args.gpus < 1:
        raise ConfigError(f"--gpus {args.gpus}: need at least 1")
    if args.suggest and not args.gpu_mem:
        raise ConfigError("--suggest needs the memory per GPU: --gpu-mem GIB")
    cfg = load_config(args.recipe, args.overrides)
    estimator = Estimator(cfg, args.device)
    layout = layout_of(cfg, args.gpus)
    found = suggestions(estimator, args.gpus, args.gpu_mem) if args.suggest else []
    if args.json:
        mem = estimator.memory(layout)
        print(json.dumps({"params": estimator.params, "frozen_params": estimator.frozen,
                          "frozen_on_gpu_params": estimator.frozen_on_gpu, "flops": estimator.flops,
                          "layout": layout.describe(), "rank_params": mem["rank_params"], "memory": mem["parts"],
                          "total": mem["total"], "backend": mem["backend"],
                          "suggestions": [{"layout": lay.describe(), "total": b} for lay, b in found]}, indent=1))
        return
    print(report(estimator, layout, args.gpu_mem))
    if args.suggest:
        print(f"\nlayouts of {args.gpus} GPUs that fit in {args.gpu_mem:g} GiB (set parallel.*):" if found else
              (f"\nno layout of {args.gpus} GPUs fits in {args.gpu_mem:g} GiB: add GPUs, lower data.token_budget "
               "or set model.activation_checkpointing=full"))
        for lay, b in found:
            print(f"  {lay.describe():<28} {b / GIB:8.2f} GiB   parallel.tp={lay.tp} parallel.pp={lay.pp} "
                  f"parallel.cp={lay.cp} parallel.zero={lay.zero}")
