"""`stdit data shard SRC OUT` (video / image files with captions -> webdataset tar shards, stdit/data/ingest.py) and
`stdit data cache` (shards -> autoencoder latents + caption embeddings, stdit/data/cache.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from stdit.data import cache as cache_lib
from stdit.data import ingest


def shard(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="stdit data shard", description=ingest.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="folder of video / image files")
    ap.add_argument("out", help="output folder for shard-XXXXXX.tar and summary.json")
    ap.add_argument("--manifest", help="CSV or JSONL of path,caption (paths relative to SRC)")
    ap.add_argument("--shard-size", type=float, default=1e9, help="bytes per shard before a new one starts")
    args = ap.parse_args(argv)
    try:
        summary = ingest.shard(args.src, args.out, args.manifest, args.shard_size)
    except ValueError as e:  # a malformed manifest
        ap.error(str(e))
    print(f"wrote {summary['written']} samples ({summary['frames']} frames) into {len(summary['shards'])} shards "
          f"in {args.out}; skipped {len(summary['skipped'])}")
    for s in summary["skipped"]:
        print(f"  skipped {s['file']}: {s['why']}")


def cache(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="stdit data cache", description=cache_lib.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", required=True, help="autoencoder: VAE run directory, checkpoint or export")
    ap.add_argument("--text-encoder", help="local transformers model directory (T5 v1.1 family or CLIP text); "
                    "default: the recipe's text.*")
    ap.add_argument("--text-kind", choices=("t5", "clip"), help="kind of --text-encoder (default: recipe's text.kind)")
    ap.add_argument("--recipe", default="recipes/base.yaml", help="recipe whose data.* buckets and text.* apply")
    ap.add_argument("--workers", type=int, default=1, help="encoding processes (one per GPU when there are GPUs)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("paths", nargs="+", help="SRC_SHARDS... OUT, then optional key=value overrides of the recipe")
    args = ap.parse_args(argv)
    overrides = [p for p in args.paths if "=" in p]
    paths = [p for p in args.paths if "=" not in p]
    if len(paths) < 2:
        ap.error("give one or more source shards (or patterns) and the output folder")
    if args.text_encoder:
        overrides.append(f"text.path={Path(args.text_encoder).resolve()}")
    if args.text_kind:
        overrides.append(f"text.kind={args.text_kind}")
    from stdit.config import load_config
    cfg = load_config(args.recipe, overrides)
    summary = cache_lib.cache(paths[:-1], paths[-1], args.vae, cfg, args.workers, args.device)
    shards = summary["shards"].values()
    print(f"cached {sum(s['written'] for s in shards)} samples in {len(summary['shards'])} shards in {paths[-1]}; "
          f"skipped {sum(len(s['skipped']) for s in shards)}")
    for s in shards:
        for skip in s["skipped"]:
            print(f"  skipped {skip['shard']}/{skip['key']}: {skip['why']}")
