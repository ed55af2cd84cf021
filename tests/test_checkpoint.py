"""Sharded checkpoints: resume is bit-exact on the same layout and continues the same curve on another one; a
kill while writing leaves the previous checkpoint; bad or incomplete checkpoints fail naming what is wrong;
`stdit ckpt convert` rebuilds the layout-free copy bit for bit.

Parallel runs use gloo on CPU, their ranks forked from the warm launcher of tests/zygote.py (no interpreter and
imports to start per rank; torchrun itself: tests/test_faults.py, srun-style tasks: the SIGTERM test below). Each saving layout trains one 3-step run (module fixture) with a
checkpoint at step 2 and checkpoint.full_copy=last: step 2 holds engine shards only, step 3 (the run's last) also
full/. Tests copy its step-2 checkpoint and resume from it to step 3."""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from conftest import start_srun_style

from parallel import checkpoint
from stdit.cli import main as cli
from stdit.config import DataConfig, load_config
from stdit.data.loader import StepSampler
from stdit.train import Trainer

FAST = ["model.hidden_size=32", "model.depth=2", "model.num_heads=4", "data.resolutions=[[8,8],[8,16],[16,8]]",
        "data.frame_counts=[1,2,4]", "data.batch_size=6", "data.micro_batches=0", "data.token_budget=128",
        "data.num_samples=64",
        "text.hidden_size=16", "text.num_layers=1", "text.ff_size=32", "run.samples_at_end=0", "run.log_every=1",
        "optim.warmup_steps=2"]
SAME_LAYOUT = {  # name: (processes, overrides)
    "tp2.dp2.zero2": (4, ["parallel.tp=2", "parallel.zero=2"]),
    "pp2.dp2.zero1": (4, ["parallel.pp=2", "parallel.zero=1"]),
    "cp2.zero3": (2, ["parallel.cp=2", "parallel.zero=3"]),  # ZeRO-3 partitions over the dp x cp = 2 ranks
}
OTHER_LAYOUT = {"dp2.zero3": (2, ["parallel.zero=3"]), "pp2.tp2": (4, ["parallel.pp=2", "parallel.tp=2"]),
                "single": (1, [])}
KINDS = ("model", "ema", "exp_avg", "exp_avg_sq")
STEPS = 3


def _train(zygote, run_dir, nproc: int, layout: list[str], steps: int, *extra: str):
    args = ["recipes/tiny.yaml", *FAST, f"run.dir={run_dir}", f"run.steps={steps}", *layout, *extra]
    if nproc == 1:  # in this process: no interpreter and imports to start
        with contextlib.redirect_stderr(io.StringIO()) as err:
            Trainer(load_config(args[0], args[1:])).train()
        return subprocess.CompletedProcess(args, 0, "", err.getvalue())
    rc, out, err = zygote.train(nproc, args)
    assert rc == 0, err[-3000:]
    return subprocess.CompletedProcess(args, rc, out, err)


def _losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _full(ckpt) -> dict[str, dict[str, torch.Tensor]]:
    full = checkpoint.FullTensors(ckpt)
    return {kind: full.state_dict(kind) for kind in KINDS}


def _assert_same_full(a_ckpt, b_ckpt) -> None:
    a, b = _full(a_ckpt), _full(b_ckpt)
    for kind in KINDS:
        assert a[kind].keys() == b[kind].keys()
        for k in a[kind]:
            assert torch.equal(a[kind][k], b[kind][k]), f"{kind}/{k}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, zygote):
    """Per saving layout, one 3-step run: step_2 (periodic: no full/) and step_3 (the last: with full/)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            nproc, layout = SAME_LAYOUT[name]
            run = tmp_path_factory.mktemp(name)
            _train(zygote, run, nproc, layout, STEPS, "checkpoint.every=2", "checkpoint.full_copy=last")
            cache[name] = run
        return cache[name]
    return get


def _copy_half(runs, name, dest):
    """The run's step-2 checkpoint alone, as a run stopped there would have left it."""
    shutil.copytree(runs(name) / "checkpoints/step_00000002", dest / "checkpoints/step_00000002")
    (dest / "checkpoints/latest").write_text("step_00000002\n")
    return dest


def _without_full(ckpt, dest):
    """A copy of a checkpoint as checkpoint.full_copy=never writes it: no full/, and none in the manifest."""
    shutil.copytree(ckpt, dest)
    shutil.rmtree(dest / "full")
    raw = json.loads((dest / "manifest.json").read_text())
    raw["files"] = {k: v for k, v in raw["files"].items() if not k.startswith("full/")}
    (dest / "manifest.json").write_text(json.dumps(raw))
    return dest


@pytest.mark.parametrize("name", list(SAME_LAYOUT))
def test_resume_on_the_same_layout_is_bit_exact(runs, name, tmp_path, zygote):
    """From the step-2 checkpoint, which holds no layout-free copy: the engine and EMA shards alone restore the
    run; every loss and the last checkpoint's tensors are bit-identical to the run that went straight through."""
    nproc, layout = SAME_LAYOUT[name]
    straight, resumed = runs(name), _copy_half(runs, name, tmp_path)
    assert not checkpoint.has_full(resumed / "checkpoints/step_00000002")
    assert checkpoint.has_full(straight / "checkpoints/step_00000003")
    out = _train(zygote, resumed, nproc, layout, STEPS, "checkpoint.full_copy=last")
    assert "resumed from" in out.stderr and "(same layout)" in out.stderr
    assert _losses(resumed) == {s: v for s, v in _losses(straight).items() if s > 2}
    _assert_same_full(straight / "checkpoints/step_00000003", resumed / "checkpoints/step_00000003")


@pytest.mark.parametrize("name", list(SAME_LAYOUT))
def test_convert_rebuilds_the_layout_free_copy_bit_exactly(runs, name, tmp_path, capsys):
    """The last checkpoint as full_copy=never writes it: `stdit ckpt info` says what is missing, export and a
    resume on another layout name the command that builds it, and `stdit ckpt convert` (offline, this process)
    rebuilds every tensor of full/ bit for bit from the TP shards, pipeline stages and ZeRO-1/2/3 partitions."""
    ckpt = runs(name) / "checkpoints/step_00000003"
    never = _without_full(ckpt, tmp_path / "run/checkpoints/step_00000003")
    (tmp_path / "run/checkpoints/latest").write_text("step_00000003\n")
    cli(["ckpt", "info", str(never)])
    assert f"full/        none (checkpoint.full_copy=last or never): resume on its layout only; `stdit ckpt " \
           f"convert {never}` builds it" in capsys.readouterr().out
    for argv in (["ckpt", "export", str(never), str(tmp_path / "exp")],
                 ["train", "recipes/tiny.yaml", *FAST, f"run.dir={tmp_path / 'run'}", "run.steps=4"]):
        with pytest.raises(SystemExit):
            cli(argv)
        err = capsys.readouterr().err
        assert f"run `stdit ckpt convert {never}`" in err or f"build it with `stdit ckpt convert {never}`" in err, err
        assert "Traceback" not in err and len([x for x in err.splitlines() if ": error: " in x]) == 1
    cli(["ckpt", "convert", str(never)])
    assert f"wrote {never}/full/" in capsys.readouterr().out
    checkpoint.verify(never)  # the manifest lists full/ with its checksums
    _assert_same_full(ckpt, never)
    with pytest.raises(SystemExit):
        cli(["ckpt", "convert", str(never)])
    assert "already holds the layout-free copy full/" in capsys.readouterr().err


@pytest.mark.parametrize("saved,target", [("tp2.dp2.zero2", "dp2.zero3"), ("tp2.dp2.zero2", "pp2.tp2"),
                                          ("pp2.dp2.zero1", "single")])
def test_resume_on_another_layout_continues_the_curve(runs, saved, target, tmp_path, zygote):
    """From the step-2 checkpoint once `stdit ckpt convert` has built its full/; the new layout's own last
    checkpoint converts bit-exactly too (no ZeRO with TP and a pipeline: module files per layer)."""
    nproc, layout = OTHER_LAYOUT[target]
    straight, resumed = runs(saved), _copy_half(runs, saved, tmp_path)
    half = resumed / "checkpoints/step_00000002"
    cli(["ckpt", "convert", str(half)])
    out = _train(zygote, resumed, nproc, layout, STEPS)
    assert f"re-laid out from {checkpoint.read_meta(half)['layout']}" in out.stderr
    ref, got = _losses(straight), _losses(resumed)
    assert sorted(got) == [3]
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-4 * abs(ref[step]), (got, ref)
    a, b = _full(straight / "checkpoints/step_00000003"), _full(resumed / "checkpoints/step_00000003")
    for kind in KINDS:
        for k in a[kind]:
            torch.testing.assert_close(b[kind][k], a[kind][k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{kind}/{k}: {m}")
    # the new layout's own checkpoint resumes bit-exactly on it (its RNG, engine and EMA shards are its own)
    last = resumed / "checkpoints/step_00000003"
    assert checkpoint.read_meta(last)["layout"] != checkpoint.read_meta(half)["layout"]
    if nproc > 1:
        never = _without_full(last, tmp_path / "never")
        cli(["ckpt", "convert", str(never)])
        _assert_same_full(last, never)


def test_checkpoint_size_estimate_matches_the_files(runs):
    """The disk-space check's estimate (before writing: the tensors' bytes) against the files a 4-process TP + ZeRO-2
    run wrote, with and without full/ (the rest: file headers, RNG and JSON files)."""
    for step, full in ((2, False), (3, True)):
        ckpt = runs("tp2.dp2.zero2") / f"checkpoints/step_{step:08d}"
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        params = sum(torch.Size(s).numel() for s in checkpoint.read_meta(ckpt)["params"].values())
        stored = sum(t.numel() for f in (ckpt / "ema").iterdir() for t in checkpoint.read_tensors(f).values())
        assert stored > params  # TP-replicated tensors (norms, biases) are held by both tensor ranks
        estimate = sum(checkpoint.checkpoint_bytes(params, True, full, 4, 2, stored).values())
        assert 0.85 * size <= estimate <= size, (step, size, estimate)


def _cfg(run_dir, *extra):
    return load_config("recipes/tiny.yaml", FAST + ["model.depth=1", f"run.dir={run_dir}", *extra])


def _train_dying_at_step_4(rank: int, argv: list[str]) -> None:
    """`stdit ARGV` in a process that SIGKILLs itself halfway through writing the step-4 checkpoint (after some
    files are on disk)."""
    write_full = checkpoint.write_full

    def dying(tmp, *a, **k):
        if tmp.name.endswith("04"):
            (tmp / "full").mkdir(exist_ok=True)
            (tmp / "full" / "rank_00000.safetensors").write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        return write_full(tmp, *a, **k)
    checkpoint.write_full = dying
    cli(argv)


@pytest.fixture
def one_thread():
    """One CPU thread, as in the forked runs: matmuls may sum in another order on another thread count (caption_time's
    linear map did, by 1e-7), and the tests using this compare losses exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_checkpoints_every_n_keep_the_newest_and_a_kill_while_writing_leaves_the_previous(tmp_path, zygote,
                                                                                         one_thread):
    straight = Trainer(_cfg(tmp_path / "a", "run.steps=6")).train()
    run = tmp_path / "b"
    args = ["train", "recipes/tiny.yaml", *FAST, "model.depth=1", f"run.dir={run}", "run.steps=6",
            "checkpoint.every=2", "checkpoint.keep=2"]
    rc, _, err = zygote.call(1, "test_checkpoint:_train_dying_at_step_4", (args,), timeout=300)  # a process
    assert rc == -signal.SIGKILL, err[-3000:]
    root = run / "checkpoints"
    assert (root / ".tmp-step_00000004").is_dir() and not (root / "step_00000004").exists()
    assert checkpoint.latest(run) == root / "step_00000002"
    resumed = Trainer(_cfg(run, "run.steps=6", "checkpoint.every=2", "checkpoint.keep=2")).train()
    assert [m["step"] for m in resumed] == [3, 4, 5, 6]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight[2:]]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000006"]


def test_mismatched_model_and_damaged_checkpoints_fail_naming_the_problem(tmp_path, zygote):
    """Each `stdit train` runs as a process of its own (forked from tests/zygote.py's warm launcher)."""
    Trainer(_cfg(tmp_path, "run.steps=1")).train()
    ckpt = tmp_path / "checkpoints/step_00000001"
    train = ["recipes/tiny.yaml", *FAST, "model.depth=1", f"run.dir={tmp_path}", "run.steps=2"]

    def run(argv):
        return subprocess.CompletedProcess(argv, *zygote.train(1, argv))
    config = (tmp_path / "config.yaml").read_text()
    out = run(train + ["model.hidden_size=48", "model.depth=2"])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "does not match the configured model" in out.stderr
    assert "blocks.1.mlp.fc1.weight" in out.stderr and "x_embedder.weight (32, 12) in the checkpoint vs (48, 12)" in out.stderr
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    full = ckpt / "full/rank_00000.safetensors"
    data = full.read_bytes()
    full.write_bytes(data[:len(data) // 2])
    out = run(train)
    assert out.returncode == 2 and "full/rank_00000.safetensors is truncated" in out.stderr
    full.unlink()
    out = run(train)
    assert out.returncode == 2 and "is missing full/rank_00000.safetensors" in out.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # nothing written was lost
    assert (tmp_path / "config.yaml").read_text() == config


def test_ckpt_info_and_export_load_on_one_device(tmp_path, zygote):
    """`stdit ckpt` as processes of their own (forked from tests/zygote.py's warm launcher)."""
    run = tmp_path / "run"
    Trainer(_cfg(run, "run.steps=2")).train()

    def ckpt(*argv):
        return subprocess.CompletedProcess(argv, *zygote.cli(["ckpt", *argv]))
    info = ckpt("info", str(run))
    assert info.returncode == 0 and "step         2" in info.stdout and "complete     yes" in info.stdout
    out = ckpt("export", str(run / "checkpoints/step_00000002"), str(tmp_path / "exp"))
    assert out.returncode == 0, out.stderr[-2000:]
    from stdit.generate import load_for_generation
    model, _, cfg = load_for_generation(tmp_path / "exp", "cpu", "ema")
    full = checkpoint.FullTensors(run / "checkpoints/step_00000002").state_dict("ema")
    assert all(torch.equal(v, full[k]) for k, v in model.state_dict().items())
    again = ckpt("export", str(run), str(tmp_path / "exp"))
    assert again.returncode == 2 and "already holds exported weights" in again.stderr


def test_data_position_carries_over_in_samples():
    class Ids:
        def __len__(self):
            return 10

        def shape_of(self, i):
            return (1, 2, 2)

        def __getitem__(self, i):
            return i

    def sampler(batch_size):
        return StepSampler(Ids(), DataConfig(batch_size=batch_size), seed=1, token_grid=lambda shape: (1, 1, 1))
    straight = sampler(4)
    stream = [i for s in range(8) for i in straight.ids(s)]
    resumed = sampler(6)  # batch size changed at the resume
    resumed.resume(2, straight.state(2))
    assert [i for s in range(2, 5) for i in resumed.ids(s)] == stream[8:26]
    resumed.resume(2, 8)  # a checkpoint of the fixed-count mode that stored only the samples seen
    assert [i for s in range(2, 5) for i in resumed.ids(s)] == stream[8:26]


def test_sigterm_on_one_rank_checkpoints_every_rank_and_exits_zero(tmp_path):
    """Two srun-style tasks (tp=2); SIGTERM reaches one: both finish the step, save it together and exit 0. With
    checkpoint.full_copy=last that checkpoint (a preemption's: the run may come back on another layout) has full/."""
    args = ["recipes/tiny.yaml", *FAST, f"run.dir={tmp_path}", "run.steps=100000", "parallel.tp=2",
            "checkpoint.full_copy=last"]
    procs = start_srun_style(args, stdout=subprocess.DEVNULL)
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    ckpt = checkpoint.latest(tmp_path)
    assert ckpt.name == f"step_{last:08d}" and checkpoint.read_meta(ckpt)["layout"] == "tp2.pp1.cp1.dp1.zero0"
    assert checkpoint.has_full(ckpt)
    assert "stopped by" in errs[0]
