"""Resolution buckets (data.buckets) on real encoded files: where each clip goes, what it decodes to, and
`stdit data stats` (bucket histogram and the packing sampler's padding)."""

import numpy as np
import pytest
from test_data_shard import _write

BUCKETS = [[16, 16, 1], [16, 16, 4], [32, 32, 4], [24, 32, 1], [24, 32, 8], [32, 16, 4]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from PIL import Image

    from stdit.data.ingest import shard
    src = tmp_path_factory.mktemp("bucket_src")
    for name, (t, h, w) in {"landscape": (9, 48, 64), "portrait": (5, 64, 32), "square": (6, 32, 32),
                            "small": (3, 12, 12)}.items():
        _write(src / f"{name}.mp4", "libx264", t, (h, w), 12)
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(src / "still.png")
    Image.fromarray(np.full((40, 40, 3), 30, np.uint8)).save(src / "photo.png")
    for p in list(src.iterdir()):
        p.with_suffix(".txt").write_text(f"clip {p.stem}")
    out = src.parent / "bucket_shards"
    shard(src, out, progress=False)
    return str(out / "shard-*.tar")


def _by_name(data):
    return {data.entries[i][2]["source"].split(".")[0]: i for i in range(len(data))}


def test_each_clip_goes_to_the_largest_bucket_that_fits_inside_it(shards):
    from stdit.data.shards import ShardDataset
    data = ShardDataset([shards], [[16, 16]], [1], buckets=BUCKETS)
    at = _by_name(data)
    want = {"landscape": (8, 24, 32), "portrait": (4, 32, 16), "square": (4, 32, 32), "photo": (1, 16, 16)}
    assert {k: data.shape_of(i) for k, i in at.items()} == want
    for name, i in at.items():
        s = data[i]
        assert tuple(s.video.shape) == (3, *want[name]) and -1 <= s.video.min() and s.video.max() <= 1
    # 12x12 (3 frames) is smaller than the only square bucket short enough (16x16x1); the 20x30 image is smaller
    # than 24x32x1, the only 1-frame bucket near its aspect ratio: both left out, never enlarged
    why = {key: why for _, key, why in data.unplaced}
    assert len(why) == 2 and all("data.allow_upscale" in w for w in why.values())
    up = ShardDataset([shards], [[16, 16]], [1], buckets=BUCKETS, allow_upscale=True)
    at = _by_name(up)
    assert up.shape_of(at["small"]) == (1, 16, 16) and up.shape_of(at["still"]) == (1, 24, 32)
    assert tuple(up[at["still"]].video.shape) == (3, 1, 24, 32) and not up.unplaced


def test_weights_move_clips_down_to_the_next_bucket_that_fits(shards):
    from stdit.data.shards import ShardDataset
    light = [b + [1e-9] if b == [32, 32, 4] else b for b in BUCKETS]
    data = ShardDataset([shards], [[16, 16]], [1], buckets=light)
    at = _by_name(data)
    assert data.shape_of(at["square"]) == (4, 16, 16)  # 32x32x4 keeps (almost) nothing
    only = ShardDataset([shards], [[16, 16]], [1], buckets=[[32, 32, 4, 1e-9], [24, 32, 8]])
    assert only.shape_of(_by_name(only)["square"]) == (4, 32, 32)  # the smallest that fits keeps it anyway
    from stdit.data.buckets import Bucket, assign
    half = [Bucket(32, 32, 1, 0.5), Bucket(16, 16, 1)]
    kept = [assign(64, 64, 1, half, name=f"s/{i}")[0] == half[0] for i in range(2000)]
    assert 0.45 < sum(kept) / len(kept) < 0.55
    assert kept == [assign(64, 64, 1, half, name=f"s/{i}")[0] == half[0] for i in range(2000)]  # fixed by name


def test_without_buckets_resolutions_apply_as_before(shards):
    from stdit.data.shards import ShardDataset
    data = ShardDataset([shards], [[16, 16], [16, 24], [24, 16]], [1, 2, 4, 8])
    at = _by_name(data)
    assert data.shape_of(at["landscape"]) == (8, 16, 24) and data.shape_of(at["small"]) == (2, 16, 16)
    assert len(data) == 6 and not data.unplaced


def test_stats_prints_the_histogram_and_the_packing_padding(shards, capsys):
    from stdit.cli import main
    from stdit.config import load_config
    from stdit.data.stats import bucket_stats
    over = [f"data.buckets={BUCKETS}", "data.window=0", "data.batch_size=1", "data.micro_batches=0",
            "data.token_budget=1536",
            "model.patch_size=[1,2,2]"]
    main(["data", "stats", shards, "--recipe", "recipes/tiny.yaml", *over])
    out = capsys.readouterr().out
    assert "4 clips in 4 buckets" in out and "24x32x8" in out and "2 clips fit no bucket" in out
    cfg = load_config("recipes/tiny.yaml", ["data.source=shards", f"data.shards=[{shards}]", *over])
    stats = bucket_stats(cfg)
    tokens = {8 * 12 * 16: 1, 4 * 16 * 8: 1, 4 * 16 * 16: 1, 1 * 8 * 8: 1}  # T x H/2 x W/2, one clip each
    assert {b["tokens"]: b["count"] for b in stats["buckets"]} == tokens
    # one clip per step, one micro-batch each: padding is what each clip leaves of the budget
    assert stats["steps"] == 4 and stats["padding"] == pytest.approx(1 - sum(tokens) / (4 * 1536))
    assert f"expected padding {stats['padding']:.1%}" in out
    packed = bucket_stats(load_config("recipes/tiny.yaml", ["data.source=shards", f"data.shards=[{shards}]", *over,
                                                            "data.micro_batches=1", "data.lookahead=4"]))
    assert packed["padding"] < stats["padding"]  # the look-ahead packs clips together


def test_bucket_config_errors_name_the_key():
    from stdit.config import ConfigError, load_config
    base = ["data.source=shards", "data.shards=[x.tar]", "model.patch_size=[1,2,2]"]
    for bad, says in ((["data.buckets=[[16,16,1,2.0]]"], "weight must be in (0, 1]"),
                      (["data.buckets=[[16,16]]"], "[height, width, frames]"),
                      (["data.buckets=[[15,16,1]]"], "divisible by the patch"),
                      (["data.buckets=[[256,256,64]]"], "drop the largest entries of data.buckets")):
        with pytest.raises(ConfigError, match=r"data\.(buckets|token_budget)") as e:
            load_config("recipes/tiny.yaml", base + ["data.window=0"] + bad)
        assert says in str(e.value)
    with pytest.raises(ConfigError, match="data.buckets: buckets place real clips"):
        load_config("recipes/tiny.yaml", ["data.buckets=[[16,16,1]]"])


def test_training_steps_on_buckets_with_a_caption_manifest(shards, tmp_path):
    """The trainer takes bucketed clips (their token grids, packing) and the manifest's captions."""
    import json

    from stdit.config import load_config
    from stdit.data.loader import build_dataset
    from stdit.data.shards import ShardDataset
    from stdit.train import Trainer
    every = ShardDataset([shards], [[16, 16]], [1])
    rows = [{"shard": shard.name, "key": key, "caption": f"new caption {key}", "original": ""}
            for (shard, _, _), key in zip(every.entries, every.keys)]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("recipes/tiny.yaml", [
        "data.source=shards", f"data.shards=[{shards}]", f"data.buckets={BUCKETS}", "data.window=0",
        f"data.captions={tmp_path / 'captions.jsonl'}", "data.batch_size=2", "data.micro_batches=0",
        "data.token_budget=1536",
        "model.hidden_size=32", "model.depth=1", "text.hidden_size=16", "text.num_layers=1", "text.ff_size=32",
        "run.samples_at_end=0", "run.steps=2", "run.log_every=1", f"run.dir={tmp_path / 'run'}"])
    data = build_dataset(cfg.data, 0)
    assert {data[i].caption for i in range(len(data))} == {f"new caption {k}" for k in data.keys}
    history = Trainer(cfg).train()
    assert [m["step"] for m in history] == [1, 2] and all(m["loss"] > 0 for m in history)
