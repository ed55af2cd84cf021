"""`stdit data stats SHARDS...`: where a recipe's buckets put the clips of some shards, and the padding the
packing sampler (stdit/data/loader.py StepSampler) will leave, planned from shapes alone as training plans them."""
from __future__ import annotations

import math
from collections import Counter


def bucket_stats(cfg, max_steps: int = 100_000) -> dict:
    """{samples, buckets: [{shape, tokens, count}], unplaced: {why: count}, steps, padding, ...} of cfg.data over
    one epoch of the sampler (at most max_steps steps)."""
    from stdit.config import sample_grid_factors
    from stdit.data.loader import StepSampler, build_dataset
    from stdit.grid import token_grid
    d = cfg.data
    dataset = build_dataset(d, cfg.run.seed)
    factors = (1, 1) if d.cached else sample_grid_factors(cfg)

    def grid(shape):
        return token_grid(shape, cfg.model.patch_size, factors, d.window)

    counts = Counter(dataset.shape_of(i) for i in range(len(dataset)))
    buckets = [{"shape": list(s), "tokens": math.prod(grid(s)), "count": n}
               for s, n in sorted(counts.items(), key=lambda kv: (-math.prod(kv[0]), kv[0]))]
    unplaced = Counter(why for _, _, why in getattr(dataset, "unplaced", []))
    sampler = StepSampler(dataset, d, cfg.run.seed, grid)
    steps, tokens, slots, samples = 0, 0, 0, 0
    while sampler.samples_consumed(steps) < len(dataset) and steps < max_steps:
        plan = sampler.plan(steps)
        tokens += sum(plan.tokens)
        slots += len(plan.bins) * d.token_budget
        samples += len(plan.ids)
        steps += 1
    return {"samples": len(dataset), "buckets": buckets, "unplaced": dict(unplaced), "steps": steps,
            "micro_batches": slots // d.token_budget, "tokens": tokens, "padding": 1 - tokens / max(slots, 1),
            "mode": (f"look-ahead packing: data.micro_batches={d.micro_batches} x data.token_budget={d.token_budget}"
                     f", data.lookahead={d.lookahead}") if d.micro_batches else
                    f"data.batch_size={d.batch_size} samples per step packed into data.token_budget={d.token_budget}"}


def report(stats: dict) -> str:
    """The stats as the command prints them."""
    n = max(stats["samples"], 1)
    lines = [f"{stats['samples']} clips in {len(stats['buckets'])} buckets", "",
             f"{'bucket (HxWxT)':>16} {'tokens':>8} {'clips':>8} {'share':>7}"]
    for b in stats["buckets"]:
        t, h, w = b["shape"]
        lines.append(f"{f'{h}x{w}x{t}':>16} {b['tokens']:>8} {b['count']:>8} {b['count'] / n:>7.1%}")
    left = sum(stats["unplaced"].values())
    if left:
        lines += ["", f"{left} clips fit no bucket and are left out:"]
        lines += [f"  {c} x {why}" for why, c in sorted(stats["unplaced"].items(), key=lambda kv: -kv[1])]
    lines += ["", f"sampler: {stats['mode']}",
              f"one epoch: {stats['steps']} steps, {stats['micro_batches']} micro-batches, expected padding "
              f"{stats['padding']:.1%} of the tokens"]
    return "\n".join(lines) + "\n"
