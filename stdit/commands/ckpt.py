"""`stdit ckpt info PATH` (what a checkpoint, or a run's newest one, holds; checks it is complete) and
`stdit ckpt export PATH OUT` (consolidated EMA + raw weights and config); parallel/checkpoint.py does the work."""
from __future__ import annotations

import sys

USAGE = "usage: stdit ckpt info PATH | stdit ckpt export PATH OUT"


def main(argv: list[str]) -> None:
    from parallel import checkpoint
    if len(argv) == 2 and argv[0] == "info":
        print(checkpoint.describe(argv[1]))
    elif len(argv) == 3 and argv[0] == "export":
        out = checkpoint.export(argv[1], argv[2])
        print(f"wrote {out}/ema.safetensors, model.safetensors, config.yaml (stdit generate --run {out} ...)")
    else:
        print(f"{USAGE}\n(stdit --help lists every command)", file=sys.stderr)
        raise SystemExit(2)
