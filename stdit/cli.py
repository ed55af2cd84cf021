"""`stdit COMMAND ...`: the console entry point. It only dispatches to stdit/commands/<command>.py and turns the
errors a user can fix (bad config, damaged checkpoint, missing or existing files) into `stdit CMD: error: ...`,
exit status 2. The commands are imported when chosen, so `stdit plan` does not load the trainer."""
from __future__ import annotations

import sys

USAGE = """usage: stdit COMMAND ...

commands:
  train RECIPE [key=value ...]   train (same as python -m stdit.train)
  generate --run RUN_DIR --prompt TEXT [--frames N --height H --width W] --out FILE
                                 [--condition | --extend-forward | --extend-backward | --loop | --connect |
                                  --keyframe | --edit | --length N --scheme S]   every mode (stdit generate -h)
  eval --run RUN_DIR --out DIR [--n N] [--modes t2v,t2i,i2v|all]   does the model follow prompts? (synthetic world)
  vae reconstruct --run RUN_DIR IN_VIDEO OUT_VIDEO   encode + decode a video with a trained autoencoder
  vae stats --run RUN_DIR        measure the autoencoder's latent mean / std on its training data
  data shard SRC OUT [--manifest F] probe video/image files with captions, write webdataset tar shards
  data cache --vae RUN [--text-encoder PATH] SRC_SHARDS... OUT   encode shards once: latents + caption embeddings
  data stats SHARDS... [--recipe R] [key=value ...]   clips per bucket (data.buckets) and the packing's padding
  data caption SHARDS... OUT --model VLM   (re)caption clips with a local vision-language model (resumable)
  prompt expand --model LLM --prompt TEXT (--run RUN | --recipe R)   rewrite a short prompt in the training
                                 captions' style (also: generate / eval --expand-prompt LLM)
  ckpt info PATH [--fast]        what a checkpoint (or a run's newest one) holds; checks every file's size and
                                 checksum (--fast: sizes only)
  ckpt export PATH OUT           consolidated EMA + raw weights (safetensors) and config, for `generate --run OUT`
  ckpt convert PATH              build the layout-free copy full/ of a checkpoint written with checkpoint.full_copy
                                 =last|never (needed for another layout, export, generate)
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
    from stdit.config import ConfigError, TrainingError
    try:
        if command == "train":
            from stdit.commands import train
            train.main(rest)
        elif command == "generate":
            from stdit.commands import generate
            generate.main(rest)
        elif command == "eval":
            from stdit.commands import eval as eval_command
            eval_command.main(rest)
        elif command == "vae":
            from stdit.commands import vae
            vae.main(rest)
        elif command == "data" and rest[:1] == ["shard"]:
            from stdit.commands import data
            data.shard(rest[1:])
        elif command == "data" and rest[:1] == ["cache"]:
            from stdit.commands import data
            data.cache(rest[1:])
        elif command == "data" and rest[:1] == ["stats"]:
            from stdit.commands import data
            data.stats(rest[1:])
        elif command == "data" and rest[:1] == ["caption"]:
            from stdit.commands import data
            data.caption(rest[1:])
        elif command == "prompt":
            from stdit.commands import prompt
            prompt.main(rest)
        elif command == "ckpt":
            from stdit.commands import ckpt
            ckpt.main(rest)
        elif command == "slurm":
            from stdit.commands import slurm
            slurm.main(rest)
        elif command == "plan":
            from stdit.commands import plan
            plan.main(rest)
        else:
            print(f"stdit: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            raise SystemExit(2)
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError, FileExistsError) as e:
        print(f"stdit {command}: error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
