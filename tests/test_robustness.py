"""Nothing read from disk is trusted (issue 14): no pickle runs code, checksums catch altered files and resume falls
back to the newest intact checkpoint, non-finite steps are skipped and stop the run without a checkpoint, every bad
argument or file is a one-line error naming it, and unreadable samples are replaced deterministically.

In-process tiny runs (the FAST overrides of tests/test_checkpoint.py, one block); torchrun only for DeepSpeed's
engine files."""
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file
from test_checkpoint import FAST

from parallel import checkpoint, safe_io
from stdit.cli import main as cli
from stdit.config import ConfigError, TrainingError, load_config
from stdit.train import Trainer

FIXTURE = Path(__file__).parent / "fixtures" / "main_20b0b2c"


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _cfg(run_dir, *extra):
    return load_config("recipes/tiny.yaml", FAST + ["model.depth=1", f"run.dir={run_dir}", *extra])


def _args(run_dir, *extra):
    return ["train", "recipes/tiny.yaml", *FAST, "model.depth=1", f"run.dir={run_dir}", *extra]


def _losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


def _metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _error(capsys, argv) -> str:
    """`stdit ARGV` must fail with exit status 2 and one `stdit CMD: error:` line (no traceback); that line."""
    with pytest.raises(SystemExit) as e:
        cli(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-2000:]
    lines = [x for x in err.splitlines() if ": error: " in x]
    assert len(lines) == 1 and lines[0].startswith(f"stdit {argv[0]}: error: ") and "Traceback" not in err, err
    return lines[0]


def _resign(ckpt: Path) -> None:
    """Rewrite a manifest for the files as they are now (what an attacker who alters a checkpoint would do)."""
    raw = json.loads((ckpt / "manifest.json").read_text())
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json")
    if raw.get("format") == 2:
        raw["files"] = {rel: {"size": (ckpt / rel).stat().st_size, "sha256": safe_io.file_hash(ckpt / rel)}
                        for rel in files}
    else:
        raw = {rel: (ckpt / rel).stat().st_size for rel in files}
    (ckpt / "manifest.json").write_text(json.dumps(raw))


def _flip_byte(path: Path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (keep 3); tests copy it."""
    run = tmp_path_factory.mktemp("run4")
    Trainer(_cfg(run, "run.steps=4", "checkpoint.every=2", "checkpoint.keep=3")).train()
    return run


def _copy(run, dest) -> Path:
    shutil.copytree(run, dest, dirs_exist_ok=True)
    return dest


# --------------------------------------------------------------------------------------------------------------
# 1. Safe loading
# --------------------------------------------------------------------------------------------------------------

def test_new_checkpoints_hold_no_pickle(run4):
    ckpt = run4 / "checkpoints/step_00000004"
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    assert "trainer.json" in files and "rng/rank_00000.json" in files
    assert not [f for f in files if f.endswith((".pt", ".pkl", ".pickle", ".bin"))], files
    assert json.loads((ckpt / "trainer.json").read_text())["scheduler"]["last_epoch"] == 4


def test_payloads_in_every_pickle_bearing_file_never_run(run4, tmp_path, capsys):
    """trainer.pt / rng .pt (older checkpoints), DeepSpeed engine files, a config.yaml, an export and a cache shard
    member, each holding a payload: every reader refuses it naming the file, and the payload never runs."""
    marker = tmp_path / "PWNED"
    ckpt = _copy(run4, tmp_path / "run") / "checkpoints/step_00000004"
    evil = {"scheduler": {"payload": Payload(marker)}}
    (ckpt / "trainer.json").unlink()
    torch.save(evil, ckpt / "trainer.pt")
    (ckpt / "rng/rank_00000.json").unlink()
    torch.save({"torch": torch.get_rng_state(), "x": Payload(marker)}, ckpt / "rng/rank_00000.pt")
    (ckpt / "engine/state").mkdir(parents=True)
    torch.save({"module": {}, "x": Payload(marker)}, ckpt / "engine/state/mp_rank_00_model_states.pt")
    _resign(ckpt)  # the checksums match: only the loaders stand between the payload and execution
    for read in (lambda: safe_io.read_trainer_state(ckpt), lambda: safe_io.read_rng(ckpt, 0),
                 lambda: safe_io.safe_checkpoint_engine().load(str(ckpt / "engine/state/mp_rank_00_model_states.pt"))):
        with pytest.raises(checkpoint.CheckpointError, match=r"refused: unpickling it could run code") as e:
            read()
        assert "posix.system" in str(e.value) or "os.system" in str(e.value)
    assert not marker.exists()

    # `stdit train` resuming from it: a one-line error naming trainer.pt, nothing runs, nothing is deleted
    before = sorted(p.name for p in (ckpt.parent).iterdir())
    line = _error(capsys, _args(ckpt.parent.parent, "run.steps=6"))
    assert "trainer.pt holds an object that is not plain data" in line and not marker.exists()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == before

    # a YAML payload in a checkpoint's config.yaml is not constructed either
    (ckpt / "config.yaml").write_text(f'run: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match=r"config.yaml, line 1.*not valid YAML"):
        load_config(ckpt / "config.yaml")

    # an export, and generation from it, read safetensors only: pickle files beside them are never opened
    out = tmp_path / "export"
    checkpoint.export(run4 / "checkpoints/step_00000004", out)
    for name in ("model.pt", "ema.pt", "pytorch_model.bin"):
        torch.save({"x": Payload(marker)}, out / name)
    from stdit.generate import load_for_generation
    load_for_generation(out, "cpu", "ema")
    assert not marker.exists()

    # a cache shard whose latents member is a pickle
    import pickle
    shard = tmp_path / "cache-000000.tar"
    meta = {"shape": [1, 4, 4], "channels": 3, "fps": 8.0, "text_tokens": 1, "text_dim": 16, "source": "x"}
    _tar(shard, [("000.safetensors", pickle.dumps(Payload(marker))), ("000.txt", b"a caption"),
                 ("000.json", json.dumps(meta).encode())])
    from stdit.data.cache import CachedDataset
    with pytest.raises(Exception):
        CachedDataset([str(shard)])[0]
    assert not marker.exists()


def test_deepspeed_engine_files_are_loaded_without_code_execution(tmp_path):
    """The main 20b0b2c fixture (dp=2, ZeRO-2) with a payload added to one rank's ZeRO optimizer file: the
    same-layout resume goes through DeepSpeed's load_checkpoint, which refuses it; nothing runs."""
    marker = tmp_path / "PWNED"
    shutil.copytree(FIXTURE / "checkpoints", tmp_path / "checkpoints")
    ckpt = tmp_path / "checkpoints/step_00000002"
    f = ckpt / "engine/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = safe_io.safe_torch_load(f, safe_io.deepspeed_globals())
    state["payload"] = Payload(marker)
    torch.save(state, f)
    _resign(ckpt)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "stdit.train", str(ckpt / "config.yaml"), f"run.dir={tmp_path}", "run.steps=4"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=600)
    assert out.returncode != 0
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt holds an object that is not plain data" in out.stderr
    assert "refused" in out.stderr and not marker.exists()


def test_perceptual_net_needs_an_explicit_opt_in(tmp_path):
    args = ["run.stage=vae", "data.frame_counts=[1,5]", "data.resolutions=[[16,16]]", "vae.perceptual_weight=0.1",
            f"vae.perceptual_net={tmp_path / 'net.pt'}"]
    with pytest.raises(ConfigError, match=r"vae.perceptual_net: .*runs the code it holds.*trust_perceptual_net=true"):
        load_config("recipes/vae/tiny.yaml", args)
    assert load_config("recipes/vae/tiny.yaml", args + ["vae.trust_perceptual_net=true"]).vae.trust_perceptual_net


# --------------------------------------------------------------------------------------------------------------
# 2. Checksums and fallback
# --------------------------------------------------------------------------------------------------------------

def test_manifest_holds_the_sha256_of_every_file(run4):
    ckpt = run4 / "checkpoints/step_00000004"
    raw = json.loads((ckpt / "manifest.json").read_text())
    assert raw["format"] == 2 and raw["hash"] == "sha256"
    on_disk = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(raw["files"]) == on_disk
    for rel, e in raw["files"].items():
        assert e["size"] == (ckpt / rel).stat().st_size and e["sha256"] == safe_io.file_hash(ckpt / rel), rel


def test_a_flipped_bit_is_named_and_resume_falls_back_to_the_newest_intact_checkpoint(run4, tmp_path, capsys):
    run = _copy(run4, tmp_path / "run")
    root = run / "checkpoints"
    straight = _losses(run4)
    _flip_byte(root / "step_00000004/full/rank_00000.safetensors")  # same size: only the checksum sees it

    line = _error(capsys, ["ckpt", "info", str(run)])
    assert "step_00000004: full/rank_00000.safetensors does not match its sha256 checksum" in line
    assert f"the newest checkpoint that verifies is {root / 'step_00000002'}" in line
    cli(["ckpt", "info", str(run), "--fast"])  # sizes only
    assert "checksums    not checked (--fast)" in capsys.readouterr().out
    cli(["ckpt", "info", str(root / "step_00000002")])
    assert "checksums    verified: sha256 of" in capsys.readouterr().out

    # naming the damaged checkpoint explicitly: refused, with the intact one offered
    line = _error(capsys, _args(run, "run.steps=6", f"checkpoint.resume={root / 'step_00000004'}"))
    assert "full/rank_00000.safetensors does not match its sha256" in line and "step_00000002" in line

    # auto: the newest intact one, said loudly; the same losses as the run that was never damaged
    (run / "metrics.jsonl").write_text("")
    history = Trainer(_cfg(run, "run.steps=4", "checkpoint.every=2", "checkpoint.keep=3")).train()
    err = capsys.readouterr().err
    assert "WARNING: the newest checkpoint(s) do not verify" in err
    assert f"resuming from the newest intact checkpoint {root / 'step_00000002'}" in err
    assert {m["step"]: m["loss"] for m in history} == {s: v for s, v in straight.items() if s > 2}
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    checkpoint.verify(root / "step_00000004")  # rewritten, intact


def test_damaged_files_fall_back_or_fail_naming_the_file(run4, tmp_path, capsys):
    run = _copy(run4, tmp_path / "run")
    root = run / "checkpoints"
    new, old = root / "step_00000004", root / "step_00000002"
    for rel, what in [("meta.json", "meta.json is not valid JSON"),
                      ("manifest.json", "manifest.json is not valid JSON"),
                      ("rng/rank_00000.json", "rng/rank_00000.json is not valid JSON")]:
        shutil.rmtree(new)
        shutil.copytree(run4 / "checkpoints/step_00000004", new)
        (new / rel).write_bytes(b"\xff\xfe garbage {")
        if rel != "manifest.json":
            _resign(new)
        line = _error(capsys, ["ckpt", "info", str(new)] if rel != "rng/rank_00000.json" else
                      _args(run, "run.steps=5", f"checkpoint.resume={new}"))
        assert what in line, line
    # a garbage meta.json in the newest checkpoint: auto resume takes the older one, loudly
    (new / "meta.json").write_bytes(b"\x00garbage")
    _resign(new)
    t = Trainer(_cfg(run, "run.steps=5"))
    assert t.checkpointer.path == old and "meta.json is not valid JSON" in capsys.readouterr().err
    t.restore()
    assert t.step == 2

    # a manifest of the old format (sizes only) still loads
    old_manifest = {rel: e["size"] for rel, e in checkpoint.read_manifest(old).items()}
    (old / "manifest.json").write_text(json.dumps(old_manifest))
    assert "none recorded (written before checksums)" in checkpoint.describe(old)


# --------------------------------------------------------------------------------------------------------------
# 3. Non-finite guard
# --------------------------------------------------------------------------------------------------------------

def test_a_nan_weight_skips_steps_and_stops_without_writing_a_checkpoint(run4, tmp_path, capsys):
    run = _copy(run4, tmp_path / "run")
    root = run / "checkpoints"
    f = root / "step_00000004/full/rank_00000.safetensors"
    tensors = load_file(str(f))
    tensors["model/x_embedder.weight"][0, 0] = float("nan")
    f.unlink()
    checkpoint.write_tensors(f, tensors)
    _resign(root / "step_00000004")
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    line = _error(capsys, _args(run, "run.steps=20", "checkpoint.every=1", "checkpoint.keep=1",
                                "optim.max_bad_steps=3"))
    assert "3 step(s) in a row up to step 7 had a non-finite loss or gradient norm" in line
    assert "stopped without writing a checkpoint" in line and "step_00000004" in line
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # nothing written, nothing rotated out
    bad = [m for m in _metrics(run) if m["step"] > 4]
    assert [m["step"] for m in bad] == [5, 6, 7] and [m["skipped_steps"] for m in bad] == [1, 2, 3]
    assert all(math.isnan(m["loss"]) for m in bad)


def test_one_non_finite_step_is_skipped_and_training_goes_on(tmp_path, monkeypatch):
    loss = Trainer.loss

    def poisoned(self, pred, labels):
        out = loss(self, pred, labels)
        return out * float("nan") if self.step == 1 else out  # the second step
    monkeypatch.setattr(Trainer, "loss", poisoned)
    t = Trainer(_cfg(tmp_path, "run.steps=3"))
    history = t.train()
    assert [m["skipped_steps"] for m in history] == [0, 1, 1]
    assert math.isnan(history[1]["loss"]) and math.isfinite(history[2]["loss"])
    assert checkpoint.optimizer_step(t.engine.optimizer) == 2  # Adam stepped twice in three steps
    assert t.engine.scheduler.last_epoch == 2  # and the LR schedule with it
    meta = checkpoint.read_meta(tmp_path / "checkpoints/step_00000003")
    assert meta["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in t.engine.module.parameters())


# --------------------------------------------------------------------------------------------------------------
# 4. Clear errors
# --------------------------------------------------------------------------------------------------------------

def test_lost_checkpoints_resume_dirs_and_changed_model_keys(run4, tmp_path, capsys):
    run = _copy(run4, tmp_path / "run")
    # a changed architecture key is named (compared with the checkpoint's config, not only by shapes)
    line = _error(capsys, _args(run, "run.steps=5", "model.temporal_causal=true"))
    assert "does not match the configured model" in line
    assert "model.temporal_causal: False in the checkpoint, True configured" in line

    # checkpoint.resume=RUN_DIR: that run's newest checkpoint
    other = tmp_path / "other"
    t = Trainer(_cfg(other, "run.steps=5", f"checkpoint.resume={run}"))
    assert t.checkpointer.path == run / "checkpoints/step_00000004"
    capsys.readouterr()

    # every step_* gone, metrics left: refused unless checkpoint.resume=never
    for p in (run / "checkpoints").glob("step_*"):
        shutil.rmtree(p)
    line = _error(capsys, _args(run, "run.steps=5"))
    assert "has logged steps (metrics.jsonl)" in line and "which is gone" in line
    assert "checkpoint.resume=never" in line
    assert Trainer(_cfg(run, "run.steps=5", "checkpoint.resume=never")).checkpointer.path is None


def test_bad_arguments_and_recipes_are_one_line_errors(tmp_path, capsys):
    line = _error(capsys, _args(tmp_path, "model.num_heads=0"))
    assert "model.num_heads: must be >= 1, got 0" in line
    if not torch.cuda.is_available():
        line = _error(capsys, _args(tmp_path / "gpu", "run.device=cuda"))
        assert "run.device=cuda" in line and "no CUDA device" in line
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  steps: 3\n  dir: [oops\nmodel:\n  depth: 1\n")
    line = _error(capsys, ["train", str(bad)])
    assert f"recipe {bad}, line " in line and "not valid YAML" in line
    string = tmp_path / "string.yaml"
    string.write_text("defaults: base\n")
    line = _error(capsys, ["train", str(string)])
    assert "`defaults` must be a list of recipe paths, e.g. `defaults: [base]`, got 'base'" in line


# --------------------------------------------------------------------------------------------------------------
# 5. Bad data
# --------------------------------------------------------------------------------------------------------------

def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(seed: int) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _sample(key: str, media: bytes, caption: bytes = b"a red circle moves left") -> list[tuple[str, bytes]]:
    probe = {"frames": 1, "fps": 0.0, "height": 16, "width": 16, "duration": 0.0, "codec": "image"}
    return [(f"{key}.png", media), (f"{key}.txt", caption), (f"{key}.json", json.dumps(probe).encode())]


@pytest.fixture
def bad_shards(tmp_path):
    """Shard 0: 10 images, sample 003 a 0-byte member, 006 corrupt bytes, 008 a caption that is not UTF-8.
    Shard 1: 100-102 good, 104 a garbage probe, then 103 (probe first) cut off in the middle of its image."""
    d = tmp_path / "shards"
    d.mkdir()
    members = []
    for i in range(10):
        media = b"" if i == 3 else b"\x89PNG garbage" * 10 if i == 6 else _png(i)
        members += _sample(f"{i:03d}", media, b"\xff\xfe" if i == 8 else b"a red circle moves left")
    _tar(d / "shard-000000.tar", members)
    garbage = [(n, b"{not json" if n.endswith(".json") else data) for n, data in _sample("104", _png(104))]
    _tar(d / "shard-000001.tar", [m for i in range(3) for m in _sample(f"1{i:02d}", _png(100 + i))] + garbage
         + _sample("103", _png(103))[::-1])
    data = (d / "shard-000001.tar").read_bytes()
    with tarfile.open(d / "shard-000001.tar") as tar:
        last = [m for m in tar.getmembers() if m.name == "103.png"][0]
    (d / "shard-000001.tar").write_bytes(data[:last.offset_data + 100])
    return d


def test_unreadable_samples_get_a_deterministic_substitute(bad_shards, capfd):
    from stdit.data.shards import ShardDataset
    a = ShardDataset([str(bad_shards / "shard-*.tar")], [[8, 8]], [1])
    assert len(a) == 14 and a.keys[-1] == "103"  # 104's probe cannot be read: left out, named
    err = capfd.readouterr().err
    assert "shard-000001.tar sample 104" in err and "probe (104.json) cannot be read" in err
    assert "shard-000001.tar sample 103" in err and "the shard is truncated" in err
    b = ShardDataset([str(bad_shards / "shard-*.tar")], [[8, 8]], [1])
    backwards = {i: b[i] for i in reversed(range(len(b)))}  # another order of reading: the same substitutes
    for i in range(len(a)):
        sa, sb = a[i], backwards[i]
        assert sa.sample_id == i and torch.equal(sa.video, sb.video) and sa.caption == sb.caption
    err = capfd.readouterr().err
    for i, key in [(3, "003"), (6, "006"), (8, "008"), (13, "103")]:
        assert a[i].bad["key"] == key and a[i].bad["substitute"] == a.substitute(i)
        assert f"sample {key} (member {key}.png at byte {a.entries[i][1]['png'][0]}) cannot be read" in err
    assert [a.substitute(i) for i in (3, 6, 8, 13)] == [4, 7, 9, 0]
    assert torch.equal(a[3].video, a[4].video) and getattr(a[4], "bad", None) is None


def test_training_replaces_bad_samples_the_same_way_on_resume_and_with_workers(bad_shards, tmp_path, capfd):
    shards = ["data.source=shards", f"data.shards=[{bad_shards}/shard-*.tar]", "data.resolutions=[[8,8]]",
              "data.frame_counts=[1]", "data.max_bad_fraction=0.5"]
    straight = Trainer(_cfg(tmp_path / "a", "run.steps=4", *shards)).train()
    assert sum(m.get("bad_samples", 0) for m in straight) > 0
    Trainer(_cfg(tmp_path / "b", "run.steps=2", *shards)).train()
    resumed = Trainer(_cfg(tmp_path / "b", "run.steps=4", "data.num_workers=1", *shards)).train()
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight[2:]]
    assert [m.get("bad_samples", 0) for m in resumed] == [m.get("bad_samples", 0) for m in straight[2:]]
    assert "cannot be read" in capfd.readouterr().err
    with pytest.raises(TrainingError, match=r"samples could not be decoded .* more than data.max_bad_fraction=0.1"):
        Trainer(_cfg(tmp_path / "c", "run.steps=4", *shards, "data.max_bad_fraction=0.1")).train()
    with pytest.raises(TrainingError, match=r"1 of 15 samples of data.shards cannot be indexed .* more than data"):
        Trainer(_cfg(tmp_path / "d", "run.steps=4", *shards, "data.max_bad_fraction=0.05"))


def test_data_shard_names_a_caption_that_is_not_utf8_and_goes_on(tmp_path):
    from stdit.data import ingest
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(_png(i))
        (src / f"{i}.txt").write_bytes(b"caf\xe9 latte" if i == 1 else b"a caption")
    summary = ingest.shard(src, tmp_path / "out", progress=False)
    assert summary["written"] == 2
    (skip,) = summary["skipped"]
    assert skip["file"].endswith("1.png") and "1.txt is not UTF-8 text" in skip["why"]


def test_a_parameter_that_never_had_a_gradient_is_checkpointed_and_resumed(tmp_path, monkeypatch):
    """torch's AdamW creates a parameter's state at its first update: one that has had no gradient yet (unused
    by the forward, or frozen by a user) is saved with zero moments instead of failing the checkpoint."""
    from stdit.models import stdit as model_module
    init = model_module.STDiT.__init__

    def with_unused(self, *a, **kw):
        init(self, *a, **kw)
        self.unused = torch.nn.Parameter(torch.ones(3))

    monkeypatch.setattr(model_module.STDiT, "__init__", with_unused)
    Trainer(_cfg(tmp_path, "run.steps=2", "checkpoint.every=2")).train()
    ckpt = checkpoint.latest(tmp_path)
    assert ckpt is not None and ckpt.name == "step_00000002"
    full = checkpoint.read_weights(ckpt, "exp_avg")
    assert torch.equal(full["unused"], torch.zeros(3))
    Trainer(_cfg(tmp_path, "run.steps=3")).train()  # resumes through it
    assert sorted(_losses(tmp_path)) == [1, 2, 3]


# --------------------------------------------------------------------------------------------------------------
# 6. Disk full, generation memory
# --------------------------------------------------------------------------------------------------------------

def _disk(free: int):
    return lambda path: shutil._ntuple_diskusage(10 ** 15, 10 ** 15 - free, free)


def test_a_checkpoint_that_does_not_fit_the_disk_is_refused_before_writing(run4, tmp_path, capsys, monkeypatch):
    run = _copy(run4, tmp_path / "run")
    root = run / "checkpoints"
    before = {p.name: checkpoint.read_manifest(p) for p in root.glob("step_*")}
    size = sum(f.stat().st_size for f in (root / "step_00000004").rglob("*") if f.is_file())
    params = sum(torch.Size(s).numel() for s in checkpoint.read_meta(root / "step_00000004")["params"].values())
    estimate = sum(checkpoint.checkpoint_bytes(params, False, True, 4, 0).values())
    assert 0.9 * size <= estimate <= size  # the tensors: all but the headers, RNG and JSON files
    monkeypatch.setattr(shutil, "disk_usage", _disk(estimate - 1))
    line = _error(capsys, _args(run, "run.steps=6", "checkpoint.keep=3"))
    assert f"not enough disk space for checkpoint step_00000006 in {run}: it needs about {estimate:,} bytes" in line
    assert f"{estimate - 1:,} are free; nothing was written or removed" in line
    assert "lower checkpoint.keep (now 3" in line and "checkpoint.full_copy does not apply to one process" in line
    assert {p.name: checkpoint.read_manifest(p) for p in root.glob("step_*")} == before
    assert checkpoint.latest(run) == root / "step_00000004" and not list(root.glob(".tmp-*"))
    monkeypatch.setattr(shutil, "disk_usage", _disk(estimate))  # exactly enough
    cli(_args(run, "run.steps=6", "checkpoint.keep=3"))
    assert checkpoint.latest(run) == root / "step_00000006"


def test_a_disk_that_fills_up_while_writing_leaves_the_previous_checkpoint(run4, tmp_path, capsys, monkeypatch):
    import errno
    run = _copy(run4, tmp_path / "run")
    root = run / "checkpoints"
    write, written = safe_io._HashingWriter.write, [0]

    def full_disk(self, data):  # the disk fills up 1000 bytes into the new checkpoint
        written[0] += memoryview(data).nbytes
        if written[0] > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)
    monkeypatch.setattr(safe_io._HashingWriter, "write", full_disk)
    line = _error(capsys, _args(run, "run.steps=5"))
    assert f"the disk filled up while writing checkpoint step_00000005 in {run} ([Errno 28] No space left" in line
    assert "`latest` still names the previous complete checkpoint" in line and "checkpoint.full_copy" in line
    assert checkpoint.latest(run) == root / "step_00000004" and not list(root.glob(".tmp-*"))
    checkpoint.verify(root / "step_00000004")
    monkeypatch.setattr(safe_io._HashingWriter, "write", write)
    Trainer(_cfg(run, "run.steps=5")).train()  # space again: resumes from step 4
    assert checkpoint.latest(run) == root / "step_00000005"


def test_generation_refuses_what_will_not_fit_in_memory_before_sampling(run4, tmp_path, capsys, monkeypatch):
    from stdit import estimate
    from stdit.generate import check_memory
    base = ["generate", "--run", str(run4), "--prompt", "a red square", "--out", str(tmp_path / "x.mp4")]
    line = _error(capsys, [*base, "--frames", "2000", "--height", "2048", "--width", "2048"])
    assert "sampling 2000x2048x2048 (frames x height x width, 4,194,304,000 tokens per model call with guidance) " \
           "needs about" in line and "lower --frames, --height, --width or --upscale" in line
    line = _error(capsys, [*base, "--length", "100000", "--height", "2048", "--width", "2048"])
    assert "lower --length, --height, --width or --upscale" in line
    demo = load_config("recipes/tiny.yaml", [])
    check_memory(demo, (8, 16, 24), "cpu", upscale=4)  # the README's demo request
    check_memory(demo, (16, 256, 256), "cpu", upscale=4)
    monkeypatch.setattr(estimate, "available_bytes", lambda device: (10 ** 6, 10 ** 6))  # 1 MB free
    with pytest.raises(ValueError, match=r"sampling 8x24x24 .* needs about .* but cpu has 0.000931 GiB free"):
        check_memory(demo, (8, 24, 24), "cpu", upscale=4)
