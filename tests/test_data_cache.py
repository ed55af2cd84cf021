"""`stdit data cache`: latents + caption embeddings written once; training from them equals encoding on the fly."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from test_data_shard import _write

from stdit.config import load_config, to_yaml
from stdit.data.ingest import shard
from stdit.models.text import TextEncoder
from stdit.models.vae import VideoVAE

BUCKETS = ["data.resolutions=[[16,16],[16,32],[32,16]]", "data.frame_counts=[1,5,9]"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Pixel shards of real clips (two shards), a random autoencoder export and a local T5 encoder."""
    root = tmp_path_factory.mktemp("cache")
    src = root / "src"
    src.mkdir()
    clips = {"a.mp4": (9, (32, 48)), "b.mp4": (6, (48, 24)), "c.webm": (9, (24, 24)), "d.mp4": (5, (40, 72))}
    for i, (name, (frames, size)) in enumerate(clips.items()):
        _write(src / name, "libvpx-vp9" if name.endswith("webm") else "libx264", frames, size, 10 + i)
        (src / name).with_suffix(".txt").write_text(f"clip number {i} of {name}")
    shard(src, root / "shards", shard_size=1, progress=False)  # one sample per shard
    vae_cfg = load_config("recipes/vae/tiny.yaml", BUCKETS)
    torch.manual_seed(0)
    vae = VideoVAE(vae_cfg.vae)
    export = root / "vae"
    export.mkdir()
    save_file(vae.state_dict(), str(export / "ema.safetensors"))
    (export / "config.yaml").write_text(to_yaml(vae_cfg))
    (export / "latent_stats.json").write_text(json.dumps({"mean": [0.1, -0.2, 0.0, 0.3], "std": [0.5, 2.0, 1.0, 0.7]}))
    enc = TextEncoder("t5", hidden_size=16, num_layers=1, num_heads=2, ff_size=32, seed=3)
    enc.model.save_pretrained(root / "t5")
    enc.tokenizer.save_pretrained(root / "t5")
    return root


def _cache_cli(root, out, *extra):
    cmd = [sys.executable, "-m", "stdit.cli", "data", "cache", "--vae", str(root / "vae"), "--text-encoder",
           str(root / "t5"), "--recipe", "recipes/tiny.yaml", *extra, str(root / "shards" / "shard-*.tar"), str(out),
           *BUCKETS]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_cache_is_resumable_and_parallel(sources, tmp_path):
    out = tmp_path / "cache"
    printed = _cache_cli(sources, out, "--workers", "2")
    assert "cached 4 samples in 4 shards" in printed
    tars = sorted(out.glob("cache-*.tar"))
    first = {p.name: p.read_bytes() for p in tars}
    # interrupted: one shard missing, a partial temporary left behind; the rerun encodes only that one
    tars[2].unlink()
    (out / (tars[2].name + ".tmp")).write_bytes(b"partial")
    printed = _cache_cli(sources, out)
    assert "3 of 4 shards already cached" in printed and "encoding the other 1" in printed
    assert {p.name: p.read_bytes() for p in sorted(out.glob("cache-*.tar"))} == first
    again = subprocess.run([sys.executable, "-m", "stdit.cli", "data", "cache", "--vae", str(sources / "vae"),
                            "--recipe", "recipes/tiny.yaml", str(sources / "shards" / "shard-*.tar"), str(out),
                            *BUCKETS], capture_output=True, text=True)
    assert again.returncode == 2 and "other settings (text_encoder, text_fingerprint)" in again.stderr


def test_cached_training_matches_encoding_on_the_fly(sources, tmp_path):
    """First-step loss from cached latents and embeddings == from pixel shards encoded by the trainer."""
    from stdit.train import Trainer
    out = tmp_path / "cache"
    _cache_cli(sources, out)
    common = [*BUCKETS, f"model.vae={sources / 'vae'}", f"text.path={sources / 't5'}", "data.source=shards",
              "data.batch_size=4", "data.micro_batches=0", "data.token_budget=256", "model.hidden_size=32",
              "model.depth=1",
              "run.samples_at_end=0", "run.steps=1", "run.log_every=1", "run.log_sample_ids=true",
              "diffusion.caption_dropout=0.5", "data.masks={first_frame: 1.0}"]
    fly = load_config("recipes/tiny.yaml", [*common, f"data.shards=[{sources}/shards/shard-*.tar]",
                                            f"run.dir={tmp_path / 'fly'}"])
    cached = load_config("recipes/tiny.yaml", [*common, f"data.shards=[{out}/cache-*.tar]", "data.cached=true",
                                               f"run.dir={tmp_path / 'cached'}"])
    a, b = Trainer(fly).train()[0], Trainer(cached).train()[0]
    assert a["sample_ids"] == b["sample_ids"] and a["tokens"] == b["tokens"] > 0
    print(f"first-step loss on the fly {a['loss']:.7f}, cached {b['loss']:.7f}")
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    with pytest.raises(Exception, match="^text.path: data.cached=true"):  # the cache's encoder is required
        Trainer(load_config("recipes/tiny.yaml", [*common[:3], *common[4:], "data.cached=true",
                                                  f"data.shards=[{out}/cache-*.tar]", f"run.dir={tmp_path / 'x'}"]))


def test_cache_shard_encodes_captions_in_batches_as_one_by_one(sources, tmp_path):
    """A shard's captions go through the text encoder a batch at a time (its fixed shape); each sample's cached
    embedding is what encoding its caption alone gives, latents and captions stay with their samples."""
    from stdit.autoencoder import load_vae
    from stdit.data.cache import CachedDataset, _settings, cache_shard
    cfg = load_config("recipes/tiny.yaml", BUCKETS)
    shard(sources / "src", tmp_path / "one", progress=False)  # all four clips in one shard
    (source,) = sorted((tmp_path / "one").glob("shard-*.tar"))
    settings = _settings(str(sources / "vae"), cfg)
    vae = load_vae(settings["vae"], torch.device("cpu"))
    text = TextEncoder("t5", path=str(sources / "t5"))
    text.BATCH = 3  # 4 captions: a batch of 3, then 1
    calls = []
    encode = text.encode
    text.encode = lambda captions: calls.append(len(captions)) or encode(captions)
    result = cache_shard(source, tmp_path / "cache-000000.tar", settings, vae, text, progress=False)
    assert result["written"] == 4 and calls == [3, 1]
    alone = TextEncoder("t5", path=str(sources / "t5"))
    data = CachedDataset([str(tmp_path / "cache-000000.tar")])
    assert sorted(data[i].caption for i in range(4)) == [f"clip number {i} of {n}" for i, n in
                                                         enumerate(["a.mp4", "b.mp4", "c.webm", "d.mp4"])]
    for i in range(4):
        s = data[i]
        torch.testing.assert_close(s.text, alone.encode([s.caption])[0], rtol=1e-5, atol=1e-6)
        assert s.video.shape[0] == 4
