"""`stdit ckpt info PATH [--fast]` (what a checkpoint, or a run's newest one, holds; checks every file's size and
sha256 against the manifest, --fast: sizes only) and
`stdit ckpt export PATH OUT` (consolidated EMA + raw weights and config); parallel/checkpoint.py does the work."""
from __future__ import annotations

import sys

USAGE = "usage: stdit ckpt info PATH [--fast] | stdit ckpt export PATH OUT"


def main(argv: list[str]) -> None:
    from parallel import checkpoint
    fast = "--fast" in argv[1:]
    argv = [a for a in argv if a != "--fast"] if argv[:1] == ["info"] else argv
    if len(argv) == 2 and argv[0] == "info":
        print(checkpoint.describe(argv[1], hashes=not fast))
    elif len(argv) == 3 and argv[0] == "export":
        out = checkpoint.export(argv[1], argv[2])
        print(f"wrote {out}/ema.safetensors, model.safetensors, config.yaml (stdit generate --run {out} ...)")
    else:
        print(f"{USAGE}\n(stdit --help lists every command)", file=sys.stderr)
        raise SystemExit(2)
