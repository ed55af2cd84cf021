"""`stdit data shard SRC OUT` (video / image files with captions -> webdataset tar shards, stdit/data/ingest.py),
`stdit data caption` (captions by a local vision-language model, stdit/data/caption.py), `stdit data stats`
(clips per bucket and packing padding, stdit/data/stats.py) and `stdit data cache` (shards -> autoencoder latents
+ caption embeddings, stdit/data/cache.py)."""
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
    ap.add_argument("--uncaptioned", action="store_true", help="keep files without a caption (empty caption), to "
                    "caption them with `stdit data caption`")
    args = ap.parse_args(argv)
    try:
        summary = ingest.shard(args.src, args.out, args.manifest, args.shard_size, uncaptioned=args.uncaptioned)
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
    overrides.append(f"model.vae={Path(args.vae).resolve()}")  # a recipe for cached latents requires it
    from stdit.config import load_config
    cfg = load_config(args.recipe, overrides)
    summary = cache_lib.cache(paths[:-1], paths[-1], args.vae, cfg, args.workers, args.device)
    shards = summary["shards"].values()
    print(f"cached {sum(s['written'] for s in shards)} samples in {len(summary['shards'])} shards in {paths[-1]}; "
          f"skipped {sum(len(s['skipped']) for s in shards)}")
    for s in shards:
        for skip in s["skipped"]:
            print(f"  skipped {skip['shard']}/{skip['key']}: {skip['why']}")


def stats(argv: list[str]) -> None:
    from stdit.data import stats as stats_lib
    ap = argparse.ArgumentParser(prog="stdit data stats", description=stats_lib.__doc__)
    ap.add_argument("--recipe", default="recipes/base.yaml", help="recipe whose data.* (buckets, sampler, budget) "
                    "and model patch apply")
    ap.add_argument("paths", nargs="+", help="SHARDS... (paths or patterns), then optional key=value overrides")
    args = ap.parse_intermixed_args(argv)
    shards = [p for p in args.paths if "=" not in p]
    if not shards:
        ap.error("give one or more shards (paths or patterns)")
    from stdit.config import load_config
    quoted = ",".join(f"'{s}'" for s in shards)  # quoted: brace ranges are not dicts to the config parser
    overrides = ["data.source=shards", f"data.shards=[{quoted}]"]
    cfg = load_config(args.recipe, overrides + [p for p in args.paths if "=" in p])
    try:
        result = stats_lib.bucket_stats(cfg)
    except ValueError as e:  # fewer clips than a batch, a clip larger than the token budget
        ap.error(str(e))
    print(stats_lib.report(result), end="")


def caption(argv: list[str]) -> None:
    from stdit.data import caption as caption_lib
    d = caption_lib.CaptionSettings()
    ap = argparse.ArgumentParser(prog="stdit data caption", description=caption_lib.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="SHARDS... (paths or patterns) OUT (folder for captions.jsonl and "
                    "caption.json)")
    ap.add_argument("--model", required=True, help="local transformers vision-language model folder")
    ap.add_argument("--prompt", default=d.prompt, help="what the model is asked; {caption} is the clip's own "
                    "caption (default: a request for a detailed paragraph)")
    ap.add_argument("--prompt-file", help="read the prompt from this file instead")
    ap.add_argument("--frames", type=int, default=d.frames, help=f"frames shown per clip, evenly spaced ({d.frames})")
    ap.add_argument("--frames-as", choices=("images", "video"), default=d.frames_as,
                    help="show the frames as several images (any multi-image model) or as one video")
    ap.add_argument("--batch", type=int, default=d.batch, help=f"clips per generate call ({d.batch})")
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--temperature", type=float, default=d.temperature, help="0: greedy (default)")
    ap.add_argument("--top-p", type=float, default=d.top_p)
    ap.add_argument("--seed", type=int, default=d.seed, help="seeds the sampling when --temperature > 0")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--workers", type=int, default=1, help="captioning processes, one per GPU when there are GPUs "
                    "(each loads the model; default 1)")
    args = ap.parse_intermixed_args(argv)
    if len(args.paths) < 2:
        ap.error("give one or more shards (paths or patterns) and the output folder")
    prompt = args.prompt
    if args.prompt_file:
        if not Path(args.prompt_file).is_file():
            ap.error(f"--prompt-file {args.prompt_file} does not exist")
        prompt = Path(args.prompt_file).read_text(encoding="utf-8").strip()
    settings = caption_lib.CaptionSettings(prompt, args.frames, args.frames_as, args.max_new_tokens,
                                           args.temperature, args.top_p, args.seed, args.batch)
    try:
        record = caption_lib.caption(args.paths[:-1], args.paths[-1], args.model, settings, args.device,
                                     workers=args.workers)
    except ValueError as e:
        ap.error(str(e))
    out = Path(args.paths[-1])
    print(f"captioned {record['captioned']} of {record['clips']} clips with {record['model']['path']} into "
          f"{out / 'captions.jsonl'}; {record['errors']} could not be decoded (they keep their own caption)")
    print(f"train on them with data.captions={out / 'captions.jsonl'}")
