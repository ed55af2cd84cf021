"""`stdit ckpt info PATH [--fast]` (what a checkpoint, or a run's newest one, holds; checks every file's size and
sha256 against the manifest, --fast: sizes only),
`stdit ckpt export PATH OUT` (consolidated EMA + raw weights and config) and
`stdit ckpt convert PATH` (builds the layout-free copy full/ of a checkpoint written with checkpoint.full_copy=last
or never, offline from its engine shards); parallel/checkpoint.py and parallel/convert.py do the work."""
from __future__ import annotations

import sys

USAGE = "usage: stdit ckpt info PATH [--fast] | stdit ckpt export PATH OUT | stdit ckpt convert PATH"


def main(argv: list[str]) -> None:
    from parallel import checkpoint
    fast = "--fast" in argv[1:]
    argv = [a for a in argv if a != "--fast"] if argv[:1] == ["info"] else argv
    if len(argv) == 2 and argv[0] == "info":
        print(checkpoint.describe(argv[1], hashes=not fast))
    elif len(argv) == 3 and argv[0] == "export":
        out = checkpoint.export(argv[1], argv[2])
        print(f"wrote {out}/ema.safetensors, model.safetensors, config.yaml (stdit generate --run {out} ...)")
    elif len(argv) == 2 and argv[0] == "convert":
        from parallel.convert import convert
        path = convert(argv[1])
        print(f"wrote {path}/full/ (layout-free model, EMA, Adam state): it now resumes on any layout and exports")
    else:
        print(f"{USAGE}\n(stdit --help lists every command)", file=sys.stderr)
        raise SystemExit(2)
