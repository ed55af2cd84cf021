"""checkpoint.init_from: a new run starts at step 0 with a fresh optimizer from another run's weights (EMA or raw),
on any layout; new parameters keep their init and are listed; a shape that differs is named; resume wins."""
import json
import shutil

import pytest
import torch
from conftest import start_srun_style

from parallel import checkpoint
from stdit.config import ConfigError, load_config
from stdit.models.stdit import build_model
from stdit.train import Trainer

FAST = ["model.hidden_size=32", "model.depth=2", "model.num_heads=4", "data.resolutions=[[8,8],[8,16],[16,8]]",
        "data.frame_counts=[1,2,4]", "data.batch_size=6", "data.micro_batches=0", "data.token_budget=128",
        "data.num_samples=64",
        "text.hidden_size=16", "text.num_layers=1", "text.ff_size=32", "run.samples_at_end=0", "run.log_every=1",
        "optim.warmup_steps=2", "model.attention_backend=reference"]


def _cfg(run_dir, *extra):
    return load_config("recipes/tiny.yaml", [*FAST, f"run.dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 3-step run (one process) whose EMA and raw weights differ, and an export of it."""
    run = tmp_path_factory.mktemp("source")
    Trainer(_cfg(run, "run.steps=3", "optim.ema_decay=0.5")).train()
    ckpt = checkpoint.latest(run)
    checkpoint.export(ckpt, run / "export")
    full = checkpoint.FullTensors(ckpt)
    return run, {kind: full.state_dict(kind) for kind in ("ema", "model")}


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}


@pytest.mark.parametrize("kind, where", [("ema", "run"), ("model", "export")])
def test_weights_are_the_sources_and_the_rest_is_fresh(source, kind, where, tmp_path, capsys):
    run, full = source
    assert not all(torch.equal(full["ema"][k], full["model"][k]) for k in full["ema"])  # the choice matters
    path = run if where == "run" else run / "export"
    cfg = _cfg(tmp_path, "run.steps=1", f"checkpoint.init_from={path}", f"checkpoint.init_weights={kind}")
    trainer = Trainer(cfg)
    got = _weights(trainer)
    assert got.keys() == full[kind].keys()
    for k, v in got.items():
        assert torch.equal(v, full[kind][k]), k
    assert all(torch.equal(e, full[kind][k]) for k, e in zip(got, trainer.engine.ema.shadow))  # EMA starts there
    assert trainer.step == 0 and not trainer.engine.optimizer.state  # fresh Adam, no step taken
    assert trainer.engine.scheduler.last_epoch == 0
    err = capsys.readouterr().err
    assert f"{kind} weights, {len(got)} of {len(got)} tensors; new (initialised as usual): none" in err
    history = trainer.train()
    assert [m["step"] for m in history] == [1]
    assert history[0]["lr"] == pytest.approx(cfg.optim.lr / cfg.optim.warmup_steps)  # the schedule starts over


def test_new_and_dropped_parameters_are_listed(source, tmp_path, capsys):
    """A model with parameters the source lacks (fps conditioning switched on, the source without it) keeps their
    usual init; the source's parameters the model lacks are listed and left out."""
    run, full = source
    no_fps = tmp_path / "no_fps"
    Trainer(_cfg(no_fps, "run.steps=1", "model.fps_conditioning=false")).train()
    capsys.readouterr()
    trainer = Trainer(_cfg(tmp_path / "with_fps", "run.steps=1", f"checkpoint.init_from={no_fps}"))
    torch.manual_seed(0)
    fresh = build_model(trainer.cfg.model, trainer.text_encoder.dim).state_dict()
    got = _weights(trainer)
    source_ema = checkpoint.FullTensors(checkpoint.latest(no_fps)).state_dict("ema")
    new = sorted(set(got) - set(source_ema))
    assert new and all(k.startswith("fps_embedder.") for k in new)
    assert all(torch.equal(got[k], fresh[k]) for k in new)  # initialised as usual (the run's seed)
    assert all(torch.equal(got[k], source_ema[k]) for k in source_ema)
    assert f"new (initialised as usual): {new}" in capsys.readouterr().err
    # the other way round: the source's fps embedder is not used, and said so
    Trainer(_cfg(tmp_path / "without", "run.steps=1", "model.fps_conditioning=false", f"checkpoint.init_from={run}"))
    assert f"in the source only (not used): {new}" in capsys.readouterr().err


def test_shape_mismatch_and_bad_sources_are_one_line_errors(source, tmp_path):
    run, _ = source
    with pytest.raises(ConfigError, match=r"shapes differ: x_embedder.weight \(32, 12\) in the source vs \(48, 12\)"):
        Trainer(_cfg(tmp_path / "wide", "model.hidden_size=48", f"checkpoint.init_from={run}"))
    with pytest.raises(ConfigError, match="does not exist"):
        Trainer(_cfg(tmp_path / "x", f"checkpoint.init_from={tmp_path / 'nowhere'}"))
    with pytest.raises(ConfigError, match="checkpoint.init_weights"):
        _cfg(tmp_path / "x", "checkpoint.init_weights=last")
    # a checkpoint without the layout-free copy: the error says how to make one
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint.latest(run), bare)
    shutil.rmtree(bare / "full")
    manifest = json.loads((bare / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("full/")}
    (bare / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=f"no layout-free copy .*`stdit ckpt convert {bare}`"):
        Trainer(_cfg(tmp_path / "y", f"checkpoint.init_from={bare}"))
    assert not (tmp_path / "wide").exists() and not (tmp_path / "y").exists()  # refused before writing anything


def test_resume_wins_over_init_from(source, tmp_path, capsys):
    """A preempted fine-tune resumes from its own checkpoint; the source is not read again."""
    run, full = source
    tune = tmp_path / "tune"
    first = Trainer(_cfg(tune, "run.steps=1", f"checkpoint.init_from={run}")).train()
    own = checkpoint.FullTensors(checkpoint.latest(tune)).state_dict("model")
    capsys.readouterr()
    trainer = Trainer(_cfg(tune, "run.steps=2", f"checkpoint.init_from={run}"))
    assert "ignored: resuming from" in capsys.readouterr().err
    trainer.restore()
    assert trainer.step == 1 and trainer.engine.optimizer.state  # its own Adam state
    got = _weights(trainer)
    assert all(torch.equal(got[k], own[k]) for k in own)
    assert not all(torch.equal(got[k], full["ema"][k]) for k in own)
    assert [m["step"] for m in first] == [1]


def test_init_on_two_processes_matches_one(source, tmp_path):
    """Source trained on one process, the new run on two (tp=2): its first step's loss and the weights after it
    are the one-process init_from run's."""
    run, _ = source
    one = Trainer(_cfg(tmp_path / "one", "run.steps=1", f"checkpoint.init_from={run}")).train()
    two = tmp_path / "two"  # two processes started as srun starts them (no torchrun agent: one import less)
    procs = start_srun_style(["recipes/tiny.yaml", *FAST, f"run.dir={two}", "run.steps=1", "parallel.tp=2",
                              f"checkpoint.init_from={run}"])
    try:
        errs = [proc.communicate(timeout=600)[1] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert all(proc.returncode == 0 for proc in procs), errs[0][-3000:] + errs[1][-3000:]
    assert errs[0].count("init_from ") == 1 and "init_from " not in errs[1]  # said once, by rank 0
    loss = json.loads((two / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert loss == pytest.approx(one[0]["loss"], rel=1e-4)
    a = checkpoint.FullTensors(checkpoint.latest(tmp_path / "one")).state_dict("model")
    b = checkpoint.FullTensors(checkpoint.latest(two)).state_dict("model")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
