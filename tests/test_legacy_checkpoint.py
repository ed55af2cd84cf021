"""A checkpoint written by main before the trainer was redrawn (commit 20b0b2c: a 2-step dp=2 ZeRO-2 run of the
tiny recipe, tests/fixtures/main_20b0b2c) still resumes, to the losses that main resumed it to: on one process
through the layout-free copy, and on its own layout through DeepSpeed's shards."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import free_port

from stdit.config import load_config
from stdit.train import Trainer

FIXTURE = Path(__file__).parent / "fixtures" / "main_20b0b2c"
CKPT = FIXTURE / "checkpoints" / "step_00000002"


def _expected() -> dict[int, float]:
    return {int(k): v for k, v in json.loads((FIXTURE / "expected.json").read_text())["losses_after_resume"].items()}


def _run_dir(tmp_path) -> Path:
    shutil.copytree(FIXTURE / "checkpoints", tmp_path / "checkpoints")
    return tmp_path


def _losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_old_checkpoint_resumes_on_one_process(tmp_path):
    run = _run_dir(tmp_path)
    cfg = load_config(CKPT / "config.yaml", [f"run.dir={run}", "run.steps=4"])
    Trainer(cfg).train()
    assert _losses(run) == _expected()


def test_old_checkpoint_resumes_on_its_own_layout(tmp_path):
    run = _run_dir(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "stdit.train", str(CKPT / "config.yaml"), f"run.dir={run}", "run.steps=4"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(same layout)" in out.stderr
    assert _losses(run) == _expected()
