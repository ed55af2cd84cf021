"""The packing sampler: padding, no sample lost or repeated, exact resume (any dp size), workers, masks."""
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import free_port

from stdit.config import ConfigError, load_config
from stdit.data.loader import StepPlan, StepSampler, build_dataset
from stdit.data.steps import StepBuilder
from stdit.diffusion.masks import STRATEGIES, draw_mask
from stdit.grid import token_grid
from stdit.models.text import TextEncoder


def _sampler(*overrides, workers=0, share=(0, 1)):
    cfg = load_config("recipes/tiny.yaml", ["data.micro_batches=2", *overrides])
    grid = lambda shape: token_grid(shape, cfg.model.patch_size, (1, 1), cfg.data.window)  # noqa: E731
    return StepSampler(build_dataset(cfg.data, 0), cfg.data, 0, grid, workers, share), cfg


def test_padding_under_two_percent_at_the_demo_budget():
    """Mixed resolutions and lengths (64 .. 1152 tokens) into micro-batches of 2048: padding < 2 %, and far below
    packing each fixed-count batch on its own."""
    packed, cfg = _sampler()
    fixed, _ = _sampler("data.micro_batches=0")
    pad = lambda plans: 1 - sum(sum(p.tokens) for p in plans) / sum(  # noqa: E731
        len(p.bins) * cfg.data.token_budget for p in plans)
    shapes = {packed.dataset.shape_of(i) for i in packed.ids(0) + packed.ids(1) + packed.ids(2)}
    assert len(shapes) >= 4  # really mixed
    lookahead = pad([packed.plan(s) for s in range(200)])
    plain = pad([fixed.plan(s) for s in range(200)])
    print(f"padding: look-ahead packing {lookahead:.4f}, fixed-count batches {plain:.4f}")
    assert lookahead < 0.02 < plain
    assert all(len(packed.plan(s).bins) == 2 for s in range(200))
    assert all(sum(packed.plan(s).tokens[i] for i in b) <= cfg.data.token_budget
               for s in range(200) for b in packed.plan(s).bins)


def test_every_sample_once_in_stream_order_give_or_take_the_buffer():
    """The samples handed out plus those waiting are exactly the stream read so far (nothing lost or repeated);
    none waits long."""
    s, cfg = _sampler("data.num_samples=300", "data.lookahead=32")  # 150 steps wrap the epoch several times
    positions, taken_at = [], {}
    for step in range(150):
        st, nxt = s.state(step), s.state(step + 1)
        candidates = set(st["buffer"]) | set(range(st["next"], nxt["next"]))
        taken = sorted(candidates - set(nxt["buffer"]))
        assert sorted(s.id_at(p) for p in taken) == sorted(s.ids(step))  # the step holds what left the stream
        positions += taken
        taken_at.update({p: step for p in taken})
    state = s.state(150)
    assert len(positions) == len(set(positions))
    assert sorted(positions) == sorted(set(range(state["next"])) - set(state["buffer"]))
    # a sample enters the buffer when `next` passes it and leaves within a few steps
    entered = {}
    for step in range(150):
        for p in range(s.state(step)["next"], s.state(step + 1)["next"]):
            entered[p] = step
    assert max(taken_at[p] - entered[p] for p in taken_at) <= 10


def test_resume_from_a_state_continues_the_same_sequence():
    straight, _ = _sampler()
    ids = [straight.ids(s) for s in range(12)]
    resumed, _ = _sampler()
    resumed.resume(5, json.loads(json.dumps(straight.state(5))))  # through JSON, as meta.json stores it
    assert [resumed.ids(s) for s in range(5, 12)] == ids[5:]
    with pytest.raises(ValueError, match="before the data stream's origin"):
        resumed.plan(3)


def test_worker_processes_deliver_the_same_samples_in_order():
    inline, _ = _sampler("data.micro_batches=0")
    workers, _ = _sampler("data.micro_batches=0", workers=2)
    try:
        for step in [0, 1, 2, 3, 7, 8]:  # a jump restarts the workers at the new step
            a, b = inline.samples(step), workers.samples(step)
            assert [x.sample_id for x in a] == [x.sample_id for x in b] == inline.mine(step)
            assert sorted(inline.mine(step)) == sorted(inline.ids(step))
            assert all(torch.equal(x.video, y.video) for x, y in zip(a, b))
    finally:
        workers.close()


def test_each_data_parallel_rank_loads_only_its_micro_batches():
    whole, cfg = _sampler("data.micro_batches=4")
    ranks = [_sampler("data.micro_batches=4", share=(r, 2))[0] for r in range(2)]
    for step in range(20):
        plan, mine = whole.plan(step), [r.mine(step) for r in ranks]
        assert sorted(mine[0] + mine[1]) == sorted(plan.ids) and not set(mine[0]) & set(mine[1])
        loads = [sum(plan.tokens[plan.ids.index(i)] for i in m) for m in mine]
        assert [len(plan.share(r, 2)) for r in range(2)] == [2, 2]
        assert abs(loads[0] - loads[1]) <= 0.05 * cfg.data.token_budget  # full micro-batches: balanced tokens
    assert [s.sample_id for s in ranks[1].samples(3)] == ranks[1].mine(3)


def test_masks_follow_their_strategy_and_are_reproducible():
    mix = {k: 1.0 for k in STRATEGIES}
    got = {}
    for i in range(400):
        name, cond = draw_mask(mix, 0, 3, i, 6)
        assert torch.equal(cond, draw_mask(mix, 0, 3, i, 6)[1])
        assert not cond.all(), "at least one frame must stay in the loss"
        got.setdefault(name, cond)
        if name == "none":
            assert not cond.any()
        elif name == "first_frame":
            assert cond.tolist() == [True] + [False] * 5
        elif name == "first_frames":
            assert cond[0] and not cond[-1] and cond.sum() <= 3 and cond.int().diff().le(0).all()
        elif name == "last_frames":
            assert cond[-1] and not cond[0] and cond.sum() <= 3 and cond.int().diff().ge(0).all()
        elif name == "first_last":
            assert cond.tolist() == [True, False, False, False, False, True]
        elif name == "ends":  # a head and a tail, something between
            assert cond[0] and cond[-1] and 2 <= cond.sum() <= 4 and cond.int().diff().abs().sum() == 2
        else:
            assert 1 <= cond.sum() <= 3
    assert set(got) == set(STRATEGIES)
    assert draw_mask(mix, 0, 3, 1, 1)[1].tolist() == [False]  # an image is never conditioned
    with pytest.raises(ConfigError, match="data.masks"):
        load_config("recipes/tiny.yaml", ["data.masks={first_franes: 1.0}"])


def _plan_of(samples, cfg):
    return StepPlan.of([s.sample_id for s in samples],
                       [token_grid(s.video.shape[1:], cfg.model.patch_size) for s in samples], cfg.data.token_budget)


def test_conditioning_frames_are_clean_and_out_of_the_loss():
    cfg = load_config("recipes/tiny.yaml", ["data.masks={none: 0.0, first_frame: 1.0}", "data.frame_counts=[4]"])
    samples = [build_dataset(cfg.data, 0)[i] for i in range(3)]
    plan = _plan_of(samples, cfg)
    mine, total, _ = StepBuilder(cfg, TextEncoder.from_config(cfg.text)).build(
        0, plan, [samples[i] for i in plan.members()])
    batch = mine[0][0]
    assert batch.frame_cond[:12].tolist() == [True, False, False, False] * 3
    first = batch.token_frame == 0
    assert not batch.loss_mask[first].any() and batch.loss_mask[(batch.token_sample < 3) & ~first & ~torch.isin(
        batch.token_frame, torch.tensor([4, 8]))].all()
    assert total == sum(math.prod(token_grid(s.video.shape[1:], cfg.model.patch_size)) * 3 // 4 for s in samples)


def test_fillers_even_out_unequal_data_parallel_shares_without_adding_loss():
    """3 micro-batches over 2 dp ranks: the rank with one gets one filler, with nothing in the loss; over 1 or 3
    ranks the shares are equal and there is none. Every rank counts the step's loss tokens, all of them real."""
    cfg = load_config("recipes/tiny.yaml", ["data.frame_counts=[4]", "data.resolutions=[[16,16]]",
                                             "data.token_budget=512", "data.masks={none: 1.0, first_frame: 1.0}"])
    samples = [build_dataset(cfg.data, 0)[i] for i in range(6)]  # 256 tokens each: two per micro-batch
    plan = _plan_of(samples, cfg)
    assert len(plan.bins) == 3
    builder = StepBuilder(cfg, TextEncoder.from_config(cfg.text))
    for dp in (1, 2, 3):
        built = [builder.build(0, plan, [samples[i] for i in plan.members(r, dp)], r, dp) for r in range(dp)]
        fillers = [[b.sample_ids == [-1] for b, _ in mine] for mine, _, _ in built]
        assert [len(f) for f in fillers] == [3 // dp + (dp == 2)] * dp
        assert sum(map(sum, fillers)) == (1 if dp == 2 else 0)
        assert all(not b.loss_mask.any() for (mine, _, _), f in zip(built, fillers)
                   for (b, _), filler in zip(mine, f) if filler)
        in_loss = sum(int(b.loss_mask.sum()) for mine, _, _ in built for b, _ in mine)
        assert [total for _, total, _ in built] == [in_loss] * dp and 0 < in_loss < sum(plan.tokens)


FAST = ["model.hidden_size=32", "model.depth=1", "model.num_heads=4", "data.resolutions=[[8,8],[8,16],[16,8]]",
        "data.frame_counts=[1,2,4]", "data.token_budget=256", "data.micro_batches=2", "data.lookahead=16",
        "data.num_samples=64", "text.hidden_size=16", "text.num_layers=1", "text.ff_size=32",
        "run.samples_at_end=0", "run.log_every=1", "run.log_sample_ids=true", "optim.warmup_steps=2",
        "data.masks={first_frame: 0.5}"]


def _run(run_dir, steps, nproc=1, *extra):
    args = ["recipes/tiny.yaml", *FAST, f"run.dir={run_dir}", f"run.steps={steps}", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "stdit.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", "stdit.train", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_stop_and_resume_on_another_dp_size_sees_the_same_samples(tmp_path):
    """Uninterrupted one process, 5 steps, vs dp=2 (ZeRO-1, two worker processes each) stopped after 2 steps
    and resumed in one process: identical sample ids every step, same losses."""
    straight = _run(tmp_path / "straight", 5)
    _run(tmp_path / "split", 2, 2, "parallel.zero=1", "data.num_workers=2")
    meta = json.loads((tmp_path / "split/checkpoints/step_00000002/meta.json").read_text())
    assert meta["data_state"]["buffer"], "the look-ahead buffer is part of the checkpoint"
    resumed = _run(tmp_path / "split", 5)
    assert [m["sample_ids"] for m in resumed] == [m["sample_ids"] for m in straight]
    assert max(m["padding_fraction"] for m in straight) < 0.1 and min(m["samples"] for m in straight) >= 4
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in straight], rel=1e-4)


def test_micro_batches_must_divide_over_data_parallel_ranks():
    from stdit.config import validate_layout
    cfg = load_config("recipes/tiny.yaml", ["data.micro_batches=3"])
    with pytest.raises(ConfigError, match="use a multiple of 2"):
        validate_layout(cfg, 2)
    validate_layout(cfg, 3)


def test_long_clips_train_on_frame_subsets_with_their_time_indices():
    """data.window: a clip longer than the window trains on window frames from a span of at most max_span, drawn
    per (seed, step, sample): sorted, distinct, first and last of the span included; the planner counts the
    window's tokens."""
    from stdit.diffusion.masks import draw_frames
    spans = set()
    for step in range(50):
        t = draw_frames(0, step, 7, 32, 8, 20)
        assert torch.equal(t, draw_frames(0, step, 7, 32, 8, 20)) and len(t) == 8
        assert (t.diff() > 0).all() and t[0] >= 0 and t[-1] < 32 and t[-1] - t[0] + 1 <= 20
        spans.add(int(t[-1] - t[0] + 1))
    assert min(spans) < 12 and max(spans) > 16  # contiguous-ish and widely spread windows both occur
    assert draw_frames(0, 0, 7, 6, 8).tolist() == list(range(6))
    cfg = load_config("recipes/tiny.yaml", ["data.frame_counts=[16]", "data.window=4", "data.max_span=16",
                                            "data.resolutions=[[8,8]]"])
    samples = [build_dataset(cfg.data, 0)[i] for i in range(3)]
    grids = [token_grid(s.video.shape[1:], cfg.model.patch_size, window=cfg.data.window) for s in samples]
    assert grids[0] == (4, 4, 4)
    plan = StepPlan.of([s.sample_id for s in samples], grids, cfg.data.token_budget)
    (batch, _), = StepBuilder(cfg, TextEncoder.from_config(cfg.text)).build(3, plan, samples)[0]
    for k, s in enumerate(samples):
        times = draw_frames(cfg.run.seed, 3, s.sample_id, 16, 4, 16)
        mine = batch.token_sample == k
        assert batch.coords[mine][::16, 0].tolist() == times.tolist()  # RoPE sees the real time indices
        torch.testing.assert_close(batch.tokens[mine][::16], s.video[:, times, 0:2, 0:2].permute(1, 0, 2, 3)
                                   .reshape(4, -1))
