"""The trainer end to end on tiny shapes: metrics, resume, generation, the command line."""
import json
import subprocess
import sys

import numpy as np
import torch

from parallel import checkpoint
from stdit.config import load_config
from stdit.data.video import read_video
from stdit.train import Trainer

FAST = ["model.hidden_size=32", "model.depth=1", "data.resolutions=[[8,8],[8,16],[16,8]]", "data.frame_counts=[1,2,4]",
        "data.batch_size=4", "data.micro_batches=0", "data.token_budget=128", "data.num_samples=64",
        "text.hidden_size=16",
        "text.num_layers=1", "text.ff_size=32", "run.samples_at_end=0", "run.log_every=1", "optim.warmup_steps=2"]
REQUIRED = {"step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "step_time_s", "padding_fraction"}


def _train(run_dir, *extra):
    cfg = load_config("recipes/tiny.yaml", FAST + [f"run.dir={run_dir}", *extra])
    return Trainer(cfg).train()


def test_train_writes_metrics_config_and_checkpoints(tmp_path):
    history = _train(tmp_path, "run.steps=3")
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3] and all(REQUIRED <= set(m) for m in lines)
    assert all(m["loss"] > 0 and 0 <= m["padding_fraction"] < 1 for m in lines)
    assert load_config(tmp_path / "config.yaml").model.hidden_size == 32
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(history) == 3


def test_resume_is_bit_exact(tmp_path):
    straight = _train(tmp_path / "a", "run.steps=4")
    _train(tmp_path / "b", "run.steps=2")
    resumed = _train(tmp_path / "b", "run.steps=4")  # resumes from latest at step 2
    assert [m["step"] for m in resumed] == [3, 4]
    assert [m["loss"] for m in straight[2:]] == [m["loss"] for m in resumed]
    for kind in ["model", "ema", "exp_avg", "exp_avg_sq"]:
        a = checkpoint.FullTensors(tmp_path / "a/checkpoints/step_00000004").state_dict(kind)
        b = checkpoint.FullTensors(tmp_path / "b/checkpoints/step_00000004").state_dict(kind)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind


def test_loss_falls_on_the_demo_data(tmp_path):
    history = _train(tmp_path, "run.steps=40", "optim.lr=3e-3", "optim.warmup_steps=5")
    first = sum(m["loss"] for m in history[:5]) / 5
    last = sum(m["loss"] for m in history[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_cli_train_and_generate_write_a_playable_video(tmp_path):
    run = tmp_path / "run"
    args = ["recipes/tiny.yaml", *FAST, "run.steps=2", f"run.dir={run}"]
    out = subprocess.run([sys.executable, "-m", "stdit.cli", "train", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "done: step 2" in out.stdout
    video = tmp_path / "clip.mp4"
    gen = subprocess.run([sys.executable, "-m", "stdit.cli", "generate", "--run", str(run), "--prompt",
                          "a red square moving left on a blue background", "--frames", "4", "--height", "8",
                          "--width", "16", "--steps", "3", "--out", str(video)], capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr[-2000:]
    frames, fps = read_video(video)
    assert frames.shape == (4, 8 * 4, 16 * 4, 3) and fps == 8.0
    # image-to-video: a still image gives the first frame
    from PIL import Image
    image = np.zeros((8, 16, 3), np.uint8)
    image[:, :8] = (255, 0, 0)
    Image.fromarray(image).save(tmp_path / "first.png")
    gen = subprocess.run([sys.executable, "-m", "stdit.cli", "generate", "--run", str(run), "--prompt", "a square",
                          "--frames", "4", "--height", "8", "--width", "16", "--steps", "3", "--upscale", "1",
                          "--condition", str(tmp_path / "first.png"), "--out", str(tmp_path / "i2v.mp4")],
                         capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr[-2000:]
    frames, _ = read_video(tmp_path / "i2v.mp4")
    err = (frames[0].double() - torch.from_numpy(image).double()).abs().mean()
    assert err < 20, err  # H.264 keeps it close; the other frames are generated
    bad = subprocess.run([sys.executable, "-m", "stdit.cli", "generate", "--run", str(run), "--prompt", "x",
                          "--frames", "4", "--height", "8", "--width", "16", "--condition", str(tmp_path / "first.png"),
                          "--cond-frames", "4", "--out", str(tmp_path / "bad.mp4")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--cond-frames=4 must be in [1, --frames - 1 = 3]" in bad.stderr


def test_python_m_stdit_train_matches_stdit_train(tmp_path):
    losses = []
    for cmd, d in [([sys.executable, "-m", "stdit.train"], "a"), ([sys.executable, "-m", "stdit.cli", "train"], "b")]:
        out = subprocess.run(cmd + ["recipes/tiny.yaml", *FAST, "run.steps=2", f"run.dir={tmp_path / d}"],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        losses.append([json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()])
    assert losses[0] == losses[1]


def test_bad_config_fails_before_training_with_the_key(tmp_path):
    out = subprocess.run([sys.executable, "-m", "stdit.train", "recipes/tiny.yaml", "model.num_heads=3",
                          f"run.dir={tmp_path / 'x'}"], capture_output=True, text=True)
    assert out.returncode == 2 and "model.num_heads" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "x").exists()


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path):
    import signal
    import time
    args = ["recipes/tiny.yaml", *FAST, "run.steps=100000", f"run.dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-m", "stdit.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{last:08d}"
    assert "stopped by SIGTERM" in err
    resumed = _train(tmp_path, f"run.steps={last + 1}")
    assert [m["step"] for m in resumed] == [last + 1]


def test_bf16_autocast_on_cpu_trains_like_fp32(tmp_path):
    """run.precision=bf16, the CI tier of the GPU's dtypes: the matmuls run in bf16 under CPU autocast (weights and
    optimizer stay fp32), the losses stay within a few percent of fp32, and dp=2 with ZeRO-2 (DeepSpeed's engine
    under the same autocast) follows one process."""
    import os

    from conftest import free_port, logged_losses
    fp32 = [m["loss"] for m in _train(tmp_path / "fp32", "run.steps=3")]
    cfg = load_config("recipes/tiny.yaml", FAST + [f"run.dir={tmp_path / 'bf16'}", "run.steps=3", "run.precision=bf16"])
    trainer = Trainer(cfg)
    seen = []
    fc1 = trainer.engine.module.blocks[0].mlp.fc1
    fc1.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    bf16 = [m["loss"] for m in trainer.train()]
    assert seen and set(seen) == {torch.bfloat16} and fc1.weight.dtype == torch.float32
    assert all(np.isfinite(bf16)) and np.allclose(bf16, fp32, rtol=0.05), (bf16, fp32)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "stdit.train", "recipes/tiny.yaml", *FAST, f"run.dir={tmp_path / 'dp2'}", "run.steps=3",
           "run.precision=bf16", "parallel.zero=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert np.allclose(logged_losses(tmp_path / "dp2"), bf16, rtol=0.02), (logged_losses(tmp_path / "dp2"), bf16)
