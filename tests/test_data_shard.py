"""`stdit data shard`: real files in several containers and codecs, plus bad ones that are skipped and reported."""
import json
import subprocess
import sys
import tarfile
from fractions import Fraction

import numpy as np
import pytest
import torch


def _write(path, codec, frames, size, fps, pix_fmt="yuv420p"):
    import av
    h, w = size
    rng = np.random.default_rng(len(str(path)))
    with av.open(str(path), mode="w") as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        for _ in range(frames):
            img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())


def _audio_only(path):
    import av
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for _ in range(4):
            c.mux(s.encode(frame))
        c.mux(s.encode())


@pytest.fixture
def media(tmp_path):
    from PIL import Image
    src = tmp_path / "src"
    src.mkdir()
    good = {  # name: (codec, frames, (h, w), fps)
        "landscape.mp4": ("libx264", 9, (48, 64), 24), "portrait.webm": ("libvpx-vp9", 5, (64, 32), 30),
        "square.mkv": ("mpeg4", 6, (32, 32), 12.5), "single.mov": ("mjpeg", 1, (40, 56), 8),
        "short.avi": ("mpeg4", 2, (24, 40), 10),
    }
    for name, (codec, n, size, fps) in good.items():
        _write(src / name, codec, n, size, fps, "yuvj420p" if codec == "mjpeg" else "yuv420p")
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(src / "still.png")
    (src / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (src / "empty.mp4").write_bytes(b"")
    _audio_only(src / "sound.mkv")
    _write(src / "uncaptioned.mp4", "libx264", 3, (16, 16), 8)
    for p in src.iterdir():
        if p.stem != "uncaptioned":
            p.with_suffix(".txt").write_text(f"a clip called {p.stem}\n")
    return src, good


def test_shard_writes_good_files_and_reports_bad_ones(media, tmp_path):
    src, good = media
    out = tmp_path / "shards"
    run = subprocess.run([sys.executable, "-m", "stdit.cli", "data", "shard", str(src), str(out), "--shard-size", "20000"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == len(good) + 1  # + the png
    why = {s["file"].rsplit("/", 1)[-1]: s["why"] for s in summary["skipped"]}
    assert set(why) == {"corrupt.mp4", "empty.mp4", "sound.mkv", "uncaptioned.mp4"}
    assert why["sound.mkv"] == "no video stream" and why["empty.mp4"] == "empty file"
    assert "no caption" in why["uncaptioned.mp4"] and "cannot be decoded" in why["corrupt.mp4"]
    assert len(summary["shards"]) > 1  # the size limit started new shards
    seen = {}
    for name in summary["shards"]:
        with tarfile.open(out / name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for member, data in members.items():
            if member.endswith(".json"):
                meta = json.loads(data)
                caption = members[member[:-5] + ".txt"].decode()
                seen[meta["source"]] = (meta, caption)
    for name, (codec, n, (h, w), fps) in good.items():
        meta, caption = seen[name]
        assert (meta["frames"], meta["height"], meta["width"]) == (n, h, w), name
        assert abs(meta["fps"] - fps) < 0.01 and caption == f"a clip called {name.split('.')[0]}"
    assert seen["still.png"][0]["frames"] == 1
    assert "skipped 4" in run.stdout and "sound.mkv: no video stream" in run.stdout
    again = subprocess.run([sys.executable, "-m", "stdit.cli", "data", "shard", str(src), str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already holds shards" in again.stderr


def test_shard_reads_a_manifest(media, tmp_path):
    from stdit.data.ingest import shard
    src, _ = media
    (tmp_path / "m.jsonl").write_text('{"path": "landscape.mp4", "caption": "from the manifest"}\n'
                                      '{"path": "missing.mp4", "caption": "x"}\n')
    summary = shard(src, tmp_path / "out", manifest=tmp_path / "m.jsonl", progress=False)
    assert summary["written"] == 1 and summary["skipped"][0]["why"] == "file not found"


def test_training_reads_the_shards(media, tmp_path):
    """A few DiT steps from the shards: every clip is cut to an allowed length and fitted to its aspect bucket."""
    from stdit.config import load_config
    from stdit.data.loader import build_dataset
    from stdit.data.ingest import shard
    from stdit.train import Trainer
    src, good = media
    shard(src, tmp_path / "shards", progress=False)
    overrides = ["data.source=shards", f"data.shards=[{tmp_path}/shards/shard-*.tar]", "data.frame_counts=[1,2,4,8]",
                 "data.resolutions=[[16,16],[16,24],[24,16]]", "data.batch_size=3", "data.micro_batches=0",
                 "data.token_budget=1024",
                 "model.hidden_size=32", "model.depth=1", "text.hidden_size=16", "text.num_layers=1",
                 "text.ff_size=32", "run.samples_at_end=0", "run.steps=2", "run.log_every=1", f"run.dir={tmp_path / 'run'}"]
    cfg = load_config("recipes/tiny.yaml", overrides)
    data = build_dataset(cfg.data, cfg.run.seed)
    assert len(data) == len(good) + 1
    shapes = {}
    for i in range(len(data)):
        s = data[i]
        shapes[s.caption.rsplit(" ", 1)[-1]] = tuple(s.video.shape)
        assert s.video.min() >= -1 and s.video.max() <= 1
        assert data.shape_of(i) == tuple(s.video.shape[1:])  # known from the probe, for the packing sampler
    assert shapes["landscape"] == (3, 8, 16, 24) and shapes["portrait"] == (3, 4, 24, 16)
    assert shapes["single"] == (3, 1, 16, 24) and shapes["short"] == (3, 2, 16, 24) and shapes["still"][1] == 1
    history = Trainer(cfg).train()
    assert [m["step"] for m in history] == [1, 2] and all(m["loss"] > 0 for m in history)


def test_frame_stride_and_target_fps(media, tmp_path):
    """Every k-th frame: a fixed stride, or per clip from its fps; the fps reported follows."""
    from stdit.data.ingest import shard
    from stdit.data.shards import ShardDataset
    src, good = media
    shard(src, tmp_path / "shards", progress=False)
    pattern, buckets = [f"{tmp_path}/shards/shard-*.tar"], [[16, 16], [16, 24], [24, 16]]
    plain = ShardDataset(pattern, buckets, [1, 2, 3, 4, 5, 8])
    by_name = {plain[i].caption.rsplit(" ", 1)[-1]: i for i in range(len(plain))}
    land, port = by_name["landscape"], by_name["portrait"]  # 9 frames at 24 fps, 5 frames at 30 fps
    strided = ShardDataset(pattern, buckets, [1, 2, 3, 4, 5, 8], frame_stride=2)
    a, b = plain[land], strided[land]
    assert b.video.shape[1] == 5 and b.fps == pytest.approx(a.fps / 2)
    torch.testing.assert_close(b.video, ShardDataset(pattern, buckets, [9])[land].video[:, ::2])
    by_fps = ShardDataset(pattern, buckets, [1, 2, 3, 4, 5, 8], target_fps=15)
    assert by_fps.stride(24.0) == 2 and by_fps.stride(30.0) == 2 and by_fps.stride(8.0) == 1
    assert by_fps[port].video.shape[1] == 3 and by_fps.shape_of(port) == tuple(by_fps[port].video.shape[1:])
