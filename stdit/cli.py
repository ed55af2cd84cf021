"""`stdit train | generate`: the console entry point."""
from __future__ import annotations

import sys

USAGE = """usage: stdit COMMAND ...

commands:
  train RECIPE [key=value ...]   train (same as python -m stdit.train)
  generate --run RUN_DIR --prompt TEXT [--frames N --height H --width W] --out FILE
  vae reconstruct --run RUN_DIR IN_VIDEO OUT_VIDEO   encode + decode a video with a trained autoencoder
  vae stats --run RUN_DIR        measure the autoencoder's latent mean / std on its training data
  data shard SRC OUT [--manifest F] probe video/image files with captions, write webdataset tar shards
  data cache --vae RUN [--text-encoder PATH] SRC_SHARDS... OUT   encode shards once: latents + caption embeddings
  ckpt info PATH                 what a checkpoint (or a run's newest one) holds; checks it is complete
  ckpt export PATH OUT           consolidated EMA + raw weights (safetensors) and config, for `generate --run OUT`
  slurm submit RECIPE [key=value ...] --nodes N --gpus-per-node G --time T [--dry-run]
                                 render slurm/train.sbatch for the allocation, check the layout fits, sbatch it
  plan RECIPE [key=value ...] --gpus N [--gpu-mem GIB] [--suggest]
                                 parameters, FLOPs and memory per GPU of the recipe's model and layout
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    from parallel.checkpoint import CheckpointError
    from stdit.config import ConfigError
    try:
        if command == "train":
            from stdit import train
            train.main(rest)
        elif command == "generate":
            from stdit import generate
            generate.main(rest)
        elif command == "vae":
            from stdit import autoencoder
            autoencoder.main(rest)
        elif command == "data" and rest[:1] == ["shard"]:
            from stdit.data import shard
            shard.main(rest[1:])
        elif command == "data" and rest[:1] == ["cache"]:
            from stdit.data import cache
            cache.main(rest[1:])
        elif command == "ckpt":
            ckpt(rest)
        elif command == "slurm":
            from stdit import slurm
            slurm.main(rest)
        elif command == "plan":
            from stdit import plan
            plan.main(rest)
        else:
            print(f"stdit: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            raise SystemExit(2)
    except (ConfigError, CheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"stdit {command}: error: {e}", file=sys.stderr)
        raise SystemExit(2)


def ckpt(argv: list[str]) -> None:
    from parallel import checkpoint
    if len(argv) == 2 and argv[0] == "info":
        print(checkpoint.describe(argv[1]))
    elif len(argv) == 3 and argv[0] == "export":
        out = checkpoint.export(argv[1], argv[2])
        print(f"wrote {out}/ema.safetensors, model.safetensors, config.yaml (stdit generate --run {out} ...)")
    else:
        print(f"usage: stdit ckpt info PATH | stdit ckpt export PATH OUT\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
