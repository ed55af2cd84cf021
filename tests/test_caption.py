"""`stdit data caption` with a tiny random LLaVA built here: frames per clip, batching, the manifest's format,
resumption after an interruption, a damaged clip, and training reading the new captions (data.captions)."""
import io
import json
import tarfile

import numpy as np
import pytest
from test_data_shard import _write
from tiny_hf import tiny_lm, tiny_vlm


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(shard pattern, model folder, {source file: frame count}): 4 videos and an image in two shards, plus a third
    shard holding a clip whose media is garbage."""
    from PIL import Image

    from stdit.data.ingest import shard
    root = tmp_path_factory.mktemp("caption")
    src = root / "src"
    src.mkdir()
    frames = {"a.mp4": 6, "b.mp4": 2, "c.mp4": 9, "d.mp4": 4, "e.png": 1}
    for name, t in frames.items():
        if name.endswith(".png"):
            Image.fromarray(np.full((24, 32, 3), 128, np.uint8)).save(src / name)
        else:
            _write(src / name, "libx264", t, (24, 32), 8)
        (src / name).with_suffix(".txt").write_text(f"original {name}")
    shard(src, root / "shards", shard_size=6000, progress=False)
    with tarfile.open(root / "shards" / "shard-000099.tar", "w") as tar:
        for ext, data in (("mp4", b"not a video"), ("txt", b"original broken"),
                          ("json", json.dumps({"frames": 3, "height": 24, "width": 32, "fps": 8.0}).encode())):
            info = tarfile.TarInfo(f"000000100.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(root / "shards" / "shard-*.tar"), tiny_vlm(root / "vlm"), frames


@pytest.fixture(scope="module")
def captioner(world):
    from stdit.data.caption import Captioner, CaptionSettings
    return Captioner(world[1], CaptionSettings(frames=3, max_new_tokens=5, batch=2), device="cpu")


class _Spy:
    """The captioner, noting the frame count of each clip of each call."""

    def __init__(self, captioner, calls):
        self.captioner, self.calls, self.name = captioner, calls, captioner.name

    def __call__(self, batch, seed=0):
        self.calls.append([len(frames) for frames, _ in batch])
        return self.captioner(batch, seed)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_captions_every_clip_in_batches_keeping_the_originals(world, captioner, tmp_path):
    from stdit.data.caption import caption, clips
    pattern, model, frames = world
    calls = []
    record = caption([pattern], tmp_path / "out", model, captioner.settings, progress=False,
                     captioner=_Spy(captioner, calls))
    rows = _lines(tmp_path / "out" / "captions.jsonl")
    assert [(r["shard"], r["key"]) for r in rows] == [(s.name, k) for s, k, _ in clips([pattern])]
    good = [r for r in rows if "error" not in r]
    assert len(good) == 5 and {r["source"] for r in good} == set(frames)
    assert all(r["original"] == f"original {r['source']}" and r["caption"] and r["caption"] != r["original"]
               for r in good)
    bad = [r for r in rows if "error" in r]
    assert len(bad) == 1 and bad[0]["caption"] == bad[0]["original"] == "original broken"
    # 6 clips two at a time (the damaged one leaves its batch with one); 3 evenly spaced frames, fewer if fewer
    assert sum(map(len, calls)) == 5 and max(map(len, calls)) == 2 and len(calls) == 3
    per_clip = [n for call in calls for n in call]
    assert per_clip == [min(3, frames[r["source"]]) for r in good]
    assert record["model"]["model_type"] == "llava" and record["model"]["path"] == str(model.resolve())
    assert record["settings"]["frames"] == 3 and record["settings"]["prompt"] == captioner.settings.prompt
    assert (record["clips"], record["captioned"], record["errors"]) == (6, 5, 1)
    assert json.loads((tmp_path / "out" / "caption.json").read_text()) == record
    # batching does not change a caption: one clip at a time gives the same ones
    from dataclasses import replace
    one = replace(captioner.settings, batch=1)
    caption([pattern], tmp_path / "one", model, one, progress=False, captioner=captioner)
    assert [r["caption"] for r in _lines(tmp_path / "one" / "captions.jsonl")] == [r["caption"] for r in rows]


def test_an_interrupted_run_continues_where_it_stopped(world, captioner, tmp_path):
    from dataclasses import replace

    from stdit.data.caption import caption
    pattern, model, _ = world
    out = tmp_path / "out"
    caption([pattern], out, model, captioner.settings, progress=False, captioner=captioner)
    full = (out / "captions.jsonl").read_text()
    lines = full.splitlines(keepends=True)
    (out / "captions.jsonl").write_text("".join(lines[:2]) + lines[2][:15])  # killed while writing line 3
    calls = []
    caption([pattern], out, model, captioner.settings, progress=False, captioner=_Spy(captioner, calls))
    assert (out / "captions.jsonl").read_text() == full  # the same lines, each once
    assert sum(map(len, calls)) == 3  # clips 3, 4 and 5 (the damaged 6th is not sent to the model)
    with pytest.raises(FileExistsError, match="frames"):
        caption([pattern], out, model, replace(captioner.settings, frames=4), progress=False, captioner=captioner)


def test_training_reads_the_new_captions(world, captioner, tmp_path):
    from stdit.config import ConfigError, load_config
    from stdit.data.caption import caption
    from stdit.data.loader import build_dataset
    from stdit.data.shards import ShardDataset
    pattern, model, _ = world
    caption([pattern], tmp_path / "out", model, captioner.settings, progress=False, captioner=captioner)
    manifest = tmp_path / "out" / "captions.jsonl"
    new = {(r["shard"], r["key"]): r["caption"] for r in _lines(manifest)}
    cfg = load_config("recipes/tiny.yaml", ["data.source=shards", f"data.shards=[{pattern}]",
                                            f"data.captions={manifest}", "data.batch_size=2", "data.micro_batches=0",
                                            "data.resolutions=[[16,16]]", "data.frame_counts=[1]"])
    data = build_dataset(cfg.data, 0)
    for i in range(len(data)):
        shard, key = data.entries[i][0].name, data.keys[i]
        if getattr(data[i], "bad", None) is None:  # (the damaged clip trains as a substitute, with its caption)
            assert data[i].caption == new[(shard, key)]
    plain = ShardDataset([pattern], [[16, 16]], [1])
    assert {plain[i].caption for i in range(len(plain))} >= {"original a.mp4", "original e.png"}
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(ConfigError, match="has no caption for 3 of 6 clips"):
        build_dataset(cfg.data, 0)
    with pytest.raises(ConfigError, match="data.captions: replaces the captions of pixel shards"):
        load_config("recipes/tiny.yaml", [f"data.captions={manifest}"])


def test_command_line(world, tmp_path, capsys):
    from stdit.cli import main
    pattern, model, _ = world
    out = tmp_path / "out"
    main(["data", "caption", pattern, str(out), "--model", str(model), "--frames", "2", "--batch", "4",
          "--max-new-tokens", "3", "--device", "cpu", "--prompt", "Caption this; it was: {caption}"])
    printed = capsys.readouterr().out
    assert "captioned 5 of 6 clips" in printed and f"data.captions={out / 'captions.jsonl'}" in printed
    assert json.loads((out / "caption.json").read_text())["settings"]["prompt"] == "Caption this; it was: {caption}"
    fresh, lm = [pattern, str(tmp_path / "o")], tiny_lm(tmp_path / "lm")
    for argv, says in (([*fresh, "--model", str(tmp_path)], "not a local transformers model"),
                       ([*fresh, "--model", str(lm)], "cannot be loaded as a vision-language model"),
                       ([*fresh, "--model", str(model), "--prompt", "{x}"], "{caption} and no other"),
                       ([*fresh, "--model", str(model), "--frames", "0"], "--frames must be >= 1")):
        with pytest.raises(SystemExit) as e:
            main(["data", "caption", *argv])
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_raw_videos_without_captions_are_sharded_then_captioned(world, captioner, tmp_path):
    from stdit.data.caption import caption
    from stdit.data.ingest import shard
    src = tmp_path / "raw"
    src.mkdir()
    _write(src / "x.mp4", "libx264", 3, (16, 16), 8)
    skipped = shard(src, tmp_path / "refused", progress=False)
    assert skipped["written"] == 0 and "--uncaptioned" in skipped["skipped"][0]["why"]
    assert shard(src, tmp_path / "shards", progress=False, uncaptioned=True)["written"] == 1
    caption([str(tmp_path / "shards" / "shard-*.tar")], tmp_path / "out", world[1], captioner.settings,
            progress=False, captioner=captioner)
    [row] = _lines(tmp_path / "out" / "captions.jsonl")
    assert row["original"] == "" and row["caption"] and row["source"] == "x.mp4"


def test_workers_write_the_same_captions(world, captioner, tmp_path):
    from stdit.data.caption import caption
    pattern, model, _ = world
    caption([pattern], tmp_path / "one", model, captioner.settings, progress=False, captioner=captioner)
    record = caption([pattern], tmp_path / "two", model, captioner.settings, device="cpu", progress=False, workers=2)
    one, two = (sorted((r["shard"], r["key"], r["caption"], r.get("error", ""))
                       for r in _lines(tmp_path / name / "captions.jsonl")) for name in ("one", "two"))
    assert one == two and len(two) == 6 and record["errors"] == 1  # any order: the workers finish in any
