"""`stdit eval --run RUN_DIR --out OUT`: generate held-out clips of the synthetic world in each mode and measure from
pixels whether they show what their captions say (stdit/evaluate.py does the work); prints the results table."""
from __future__ import annotations

import argparse

from stdit.eval_report import markdown
from stdit.evaluate import MODES, evaluate


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="stdit eval", description=__doc__)
    ap.add_argument("--run", required=True, help="run directory (uses its latest checkpoint) or checkpoint directory")
    ap.add_argument("--out", required=True, help="directory for results.json, results.md, contact sheets, "
                    "report.html and tb/")
    ap.add_argument("--n", type=int, default=16, help="clips per mode (default 16)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)} (default all)")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default: diffusion.sample_steps)")
    ap.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: diffusion.cfg_scale)")
    ap.add_argument("--seed", type=int, default=0, help="picks the held-out captions and the noise")
    ap.add_argument("--batch", type=int, default=8, help="clips per sampling call")
    ap.add_argument("--weights", choices=["ema", "model"], default="ema")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        ap.error(f"--modes: unknown mode(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODES)}")
    if args.n < 1 or args.batch < 1:
        ap.error("--n and --batch must be >= 1")
    try:
        results = evaluate(args.run, args.out, n=args.n, modes=modes, seed=args.seed, steps=args.steps,
                           cfg_scale=args.cfg_scale, device=args.device, weights=args.weights, batch=args.batch,
                           progress=True)
    except ValueError as e:
        ap.error(str(e))
    print(markdown(results), end="")
    print(f"wrote {args.out}/results.json, results.md, contact_*.png, report.html, tb/")
    return results
