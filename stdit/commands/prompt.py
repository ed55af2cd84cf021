"""`stdit prompt expand --model PATH --prompt TEXT [--run RUN | --recipe RECIPE [key=value ...]]`: rewrite short
prompts in the style of the training captions with a local instruct language model (stdit/prompt.py) and print
them; --out FILE.json keeps the records (prompt, expansion, model, settings, style examples)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(argv or [])
    if argv[:1] != ["expand"]:
        print("usage: stdit prompt expand --model PATH --prompt TEXT [--run RUN | --recipe RECIPE] (-h for more)")
        raise SystemExit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    ap = argparse.ArgumentParser(prog="stdit prompt expand", description=__doc__)
    ap.add_argument("--model", required=True, help="local transformers instruct model folder (causal LM)")
    ap.add_argument("--prompt", required=True, action="append", help="a short prompt (repeatable)")
    ap.add_argument("--run", help="run or checkpoint directory whose data.* the style examples come from")
    ap.add_argument("--recipe", help="or a recipe (with key=value overrides) whose data.* they come from")
    ap.add_argument("--examples", type=int, default=4, help="training captions shown as examples (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="draws the examples (and seeds sampling)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--out", help="write the records to this JSON file")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of --recipe")
    args = ap.parse_args(argv[1:])
    if bool(args.run) == bool(args.recipe):
        ap.error("give --run (a run's data) or --recipe (a recipe's data) for the style examples")
    if args.examples < 0:
        ap.error(f"--examples must be >= 0, got {args.examples}")
    from stdit.config import load_config
    if args.run:
        from stdit.generate import find_checkpoint
        cfg = load_config(find_checkpoint(Path(args.run)) / "config.yaml")
    else:
        cfg = load_config(args.recipe, args.overrides)
    from stdit.prompt import PromptExpander, style_examples
    try:
        expander = PromptExpander(args.model, style_examples(cfg.data, args.examples, args.seed), args.device,
                                  args.max_new_tokens, args.temperature, args.top_p, args.seed)
    except ValueError as e:
        ap.error(str(e))
    records = []
    for prompt in args.prompt:
        records.append(expander.record(prompt, expander.expand(prompt)))
        print(records[-1]["expanded"])
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))
    return records
