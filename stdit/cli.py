"""`stdit train | generate`: the console entry point."""
from __future__ import annotations

import sys

USAGE = """usage: stdit COMMAND ...

commands:
  train RECIPE [key=value ...]   train (same as python -m stdit.train)
  generate --run RUN_DIR --prompt TEXT [--frames N --height H --width W] --out FILE
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    from stdit.config import ConfigError
    try:
        if command == "train":
            from stdit import train
            train.main(rest)
        elif command == "generate":
            from stdit import generate
            generate.main(rest)
        else:
            print(f"stdit: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            raise SystemExit(2)
    except (ConfigError, FileNotFoundError) as e:
        print(f"stdit {command}: error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
