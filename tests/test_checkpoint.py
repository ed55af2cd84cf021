"""Sharded checkpoints: resume is bit-exact on the same layout and continues the same curve on another one; a
kill while writing leaves the previous checkpoint; bad or incomplete checkpoints fail naming what is wrong.

Parallel runs use torchrun with gloo on CPU. Each layout trains 4 steps straight, and 2 steps then resumes to 4."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import free_port, start_srun_style

from parallel import checkpoint
from stdit.config import DataConfig, load_config
from stdit.data.loader import StepSampler
from stdit.train import Trainer

FAST = ["model.hidden_size=32", "model.depth=2", "model.num_heads=4", "data.resolutions=[[8,8],[8,16],[16,8]]",
        "data.frame_counts=[1,2,4]", "data.batch_size=6", "data.token_budget=128", "data.num_samples=64",
        "text.hidden_size=16", "text.num_layers=1", "text.ff_size=32", "run.samples_at_end=0", "run.log_every=1",
        "optim.warmup_steps=2"]
SAME_LAYOUT = {  # name: (processes, overrides)
    "tp2.dp2.zero2": (4, ["parallel.tp=2", "parallel.zero=2"]),
    "pp2.dp2.zero1": (4, ["parallel.pp=2", "parallel.zero=1"]),
    "cp2.dp2.zero3": (4, ["parallel.cp=2", "parallel.zero=3"]),
}
OTHER_LAYOUT = {"dp4.zero3": (4, ["parallel.zero=3"]), "pp2.tp2": (4, ["parallel.pp=2", "parallel.tp=2"]),
                "single": (1, [])}
KINDS = ("model", "ema", "exp_avg", "exp_avg_sq")


def _train(run_dir, nproc: int, layout: list[str], steps: int, *extra: str):
    args = ["recipes/tiny.yaml", *FAST, f"run.dir={run_dir}", f"run.steps={steps}", *layout, *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "stdit.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", "stdit.train", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _full(ckpt) -> dict[str, dict[str, torch.Tensor]]:
    full = checkpoint.FullTensors(ckpt)
    return {kind: full.state_dict(kind) for kind in KINDS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per saving layout: a straight 4-step run and a 2-step run (its step-2 checkpoint is copied by tests)."""
    cache = {}

    def get(name: str, steps: int):
        if (name, steps) not in cache:
            nproc, layout = SAME_LAYOUT[name]
            run = tmp_path_factory.mktemp(f"{name}-{steps}")
            _train(run, nproc, layout, steps, "checkpoint.every=0")
            cache[name, steps] = run
        return cache[name, steps]
    return get


def _copy_half(runs, name, dest):
    shutil.copytree(runs(name, 2) / "checkpoints", dest / "checkpoints")
    return dest


@pytest.mark.parametrize("name", list(SAME_LAYOUT))
def test_resume_on_the_same_layout_is_bit_exact(runs, name, tmp_path):
    nproc, layout = SAME_LAYOUT[name]
    straight, resumed = runs(name, 4), _copy_half(runs, name, tmp_path)
    out = _train(resumed, nproc, layout, 4)
    assert "resumed from" in out.stderr and "(same layout)" in out.stderr
    assert _losses(resumed) == {s: v for s, v in _losses(straight).items() if s > 2}
    a, b = _full(straight / "checkpoints/step_00000004"), _full(resumed / "checkpoints/step_00000004")
    for kind in KINDS:
        assert a[kind].keys() == b[kind].keys()
        for k in a[kind]:
            assert torch.equal(a[kind][k], b[kind][k]), f"{kind}/{k}"


@pytest.mark.parametrize("saved,target", [("tp2.dp2.zero2", "dp4.zero3"), ("tp2.dp2.zero2", "pp2.tp2"),
                                          ("pp2.dp2.zero1", "single")])
def test_resume_on_another_layout_continues_the_curve(runs, saved, target, tmp_path):
    nproc, layout = OTHER_LAYOUT[target]
    straight, resumed = runs(saved, 4), _copy_half(runs, saved, tmp_path)
    out = _train(resumed, nproc, layout, 4)
    assert f"re-laid out from {checkpoint.read_meta(resumed / 'checkpoints/step_00000002')['layout']}" in out.stderr
    ref, got = _losses(straight), _losses(resumed)
    assert sorted(got) == [3, 4]
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-4 * abs(ref[step]), (got, ref)
    a, b = _full(straight / "checkpoints/step_00000004"), _full(resumed / "checkpoints/step_00000004")
    for kind in KINDS:
        for k in a[kind]:
            torch.testing.assert_close(b[kind][k], a[kind][k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{kind}/{k}: {m}")
    # the new layout's own checkpoint resumes bit-exactly on it (its RNG, engine and EMA shards are its own)
    assert (checkpoint.read_meta(resumed / "checkpoints/step_00000004")["layout"]
            != checkpoint.read_meta(resumed / "checkpoints/step_00000002")["layout"])


def _cfg(run_dir, *extra):
    return load_config("recipes/tiny.yaml", FAST + ["model.depth=1", f"run.dir={run_dir}", *extra])


def test_checkpoints_every_n_keep_the_newest_and_a_kill_while_writing_leaves_the_previous(tmp_path):
    straight = Trainer(_cfg(tmp_path / "a", "run.steps=6")).train()
    # a process that SIGKILLs itself halfway through writing the step-4 checkpoint (after some files are on disk)
    script = (
        "import os, signal, sys\n"
        "from parallel import checkpoint\n"
        "write_full = checkpoint.write_full\n"
        "def dying(tmp, *a, **k):\n"
        "    if tmp.name.endswith('04'):\n"
        "        (tmp / 'full').mkdir(exist_ok=True); (tmp / 'full' / 'rank_00000.safetensors').write_bytes(b'partial')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return write_full(tmp, *a, **k)\n"
        "checkpoint.write_full = dying\n"
        "from stdit.cli import main\n"
        "main(sys.argv[1:])\n")
    run = tmp_path / "b"
    args = ["train", "recipes/tiny.yaml", *FAST, "model.depth=1", f"run.dir={run}", "run.steps=6",
            "checkpoint.every=2", "checkpoint.keep=2"]
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL
    root = run / "checkpoints"
    assert (root / ".tmp-step_00000004").is_dir() and not (root / "step_00000004").exists()
    assert checkpoint.latest(run) == root / "step_00000002"
    resumed = Trainer(_cfg(run, "run.steps=6", "checkpoint.every=2", "checkpoint.keep=2")).train()
    assert [m["step"] for m in resumed] == [3, 4, 5, 6]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight[2:]]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000006"]


def test_mismatched_model_and_damaged_checkpoints_fail_naming_the_problem(tmp_path):
    Trainer(_cfg(tmp_path, "run.steps=1")).train()
    ckpt = tmp_path / "checkpoints/step_00000001"
    train = [sys.executable, "-m", "stdit.train", "recipes/tiny.yaml", *FAST, "model.depth=1", f"run.dir={tmp_path}",
             "run.steps=2"]
    config = (tmp_path / "config.yaml").read_text()
    out = subprocess.run(train + ["model.hidden_size=48", "model.depth=2"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "does not match the configured model" in out.stderr
    assert "blocks.1.mlp.fc1.weight" in out.stderr and "x_embedder.weight (32, 12) in the checkpoint vs (48, 12)" in out.stderr
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    full = ckpt / "full/rank_00000.safetensors"
    data = full.read_bytes()
    full.write_bytes(data[:len(data) // 2])
    out = subprocess.run(train, capture_output=True, text=True)
    assert out.returncode == 2 and "full/rank_00000.safetensors is truncated" in out.stderr
    full.unlink()
    out = subprocess.run(train, capture_output=True, text=True)
    assert out.returncode == 2 and "is missing full/rank_00000.safetensors" in out.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # nothing written was lost
    assert (tmp_path / "config.yaml").read_text() == config


def test_ckpt_info_and_export_load_on_one_device(tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(run, "run.steps=2")).train()
    cli = [sys.executable, "-m", "stdit.cli", "ckpt"]
    info = subprocess.run(cli + ["info", str(run)], capture_output=True, text=True)
    assert info.returncode == 0 and "step         2" in info.stdout and "complete     yes" in info.stdout
    out = subprocess.run(cli + ["export", str(run / "checkpoints/step_00000002"), str(tmp_path / "exp")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    from stdit.generate import load_for_generation
    model, _, cfg = load_for_generation(tmp_path / "exp", "cpu", "ema")
    full = checkpoint.FullTensors(run / "checkpoints/step_00000002").state_dict("ema")
    assert all(torch.equal(v, full[k]) for k, v in model.state_dict().items())
    again = subprocess.run(cli + ["export", str(run), str(tmp_path / "exp")], capture_output=True, text=True)
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
    """Two srun-style tasks (tp=2); SIGTERM reaches one: both finish the step, save it together and exit 0."""
    args = ["recipes/tiny.yaml", *FAST, f"run.dir={tmp_path}", "run.steps=100000", "parallel.tp=2"]
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
    assert "stopped by" in errs[0]
