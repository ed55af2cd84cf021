"""recipes/scale/{XL,7B,30B}.yaml run: each recipe's own keys, the model, text length and buckets shrunk by overrides,
trains a few steps on latents cached by `stdit data cache` (a tiny autoencoder and T5 built here) and decodes its
end-of-run samples to pixels; the encoders are required and checked against the cache's fingerprints."""
import json

import pytest
import torch
from safetensors.torch import save_file
from test_data_shard import _write

from stdit.config import ConfigError, load_config, to_yaml
from stdit.data import cache as cache_lib
from stdit.data.ingest import shard
from stdit.data.video import read_video
from stdit.models.text import TextEncoder
from stdit.models.vae import VideoVAE
from stdit.train import Trainer

# the same keys in every recipe, at tiny sizes: pixel buckets of 1 / 5 / 9 frames (1 / 2 / 3 latent frames) of
# 16-32 px (2-4 latent px), a 2-block model, one process
TINY = ["model.hidden_size=32", "model.depth=2", "model.num_heads=4", "model.attention_backend=reference",
        "text.max_length=16", "data.resolutions=[[16,16],[16,32],[32,16]]", "data.frame_counts=[1,5,9]",
        "data.batch_size=4", "data.token_budget=16", "data.micro_batches=2", "data.lookahead=8",
        "parallel.tp=1", "parallel.pp=1", "parallel.cp=1", "parallel.zero=0", "run.steps=2", "run.log_every=1",
        "run.samples_at_end=1", "diffusion.sample_steps=2", "optim.warmup_steps=1"]


def _t5(path, seed):
    enc = TextEncoder("t5", hidden_size=16, num_layers=1, num_heads=2, ff_size=32, seed=seed)
    enc.model.save_pretrained(path)
    enc.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Pixel shards of real clips, a random autoencoder export, two local T5 encoders (seeds 3 and 4), and the
    shards cached with the first through a scale recipe's buckets."""
    root = tmp_path_factory.mktemp("scale")
    src = root / "src"
    src.mkdir()
    for i, (frames, size) in enumerate([(9, (32, 48)), (6, (48, 24)), (9, (24, 24)), (5, (40, 72)), (1, (32, 32))]):
        _write(src / f"{i}.mp4", "libx264", frames, size, 10 + i)
        (src / f"{i}.txt").write_text(f"clip number {i}")
    shard(src, root / "shards", progress=False)
    vae_cfg = load_config("recipes/vae/tiny.yaml", ["data.resolutions=[[16,16],[16,32],[32,16]]",
                                                    "data.frame_counts=[1,5,9]"])
    torch.manual_seed(0)
    export = root / "vae"
    export.mkdir()
    save_file(VideoVAE(vae_cfg.vae).state_dict(), str(export / "ema.safetensors"))
    (export / "config.yaml").write_text(to_yaml(vae_cfg))
    (export / "latent_stats.json").write_text(json.dumps({"mean": [0.1, -0.2, 0.0, 0.3], "std": [0.5, 2, 1, 0.7]}))
    encoders = [f"model.vae={export}", f"text.path={_t5(root / 't5', 3)}"]
    cfg = load_config("recipes/scale/XL.yaml", [*TINY, *encoders])
    cache_lib.cache([str(root / "shards" / "shard-*.tar")], root / "cache", str(export), cfg, device="cpu")
    _t5(root / "t5-other", 4)
    return root, encoders


@pytest.mark.parametrize("recipe", ["XL", "7B", "30B"])
def test_scale_recipe_trains_on_cached_latents_and_decodes_its_samples(recipe, cached, tmp_path):
    root, encoders = cached
    cfg = load_config(f"recipes/scale/{recipe}.yaml", [*TINY, *encoders, f"data.shards=[{root}/cache/cache-*.tar]",
                                                        f"run.dir={tmp_path}"])
    assert cfg.data.cached and cfg.model.in_channels == 4
    history = Trainer(cfg).train()
    assert [m["step"] for m in history] == [1, 2] and all(m["loss"] > 0 for m in history)
    # the sample of the first cached clip, decoded to pixels (1 + 4 (T - 1) frames, 8x the sides, x4 upscaled)
    t, h, w = cache_lib.CachedDataset([f"{root}/cache/cache-*.tar"]).shape_of(0)
    frames, _ = read_video(tmp_path / "samples" / "step00000002_0.mp4")
    assert frames.shape == (1 + 4 * (t - 1), 8 * h * 4, 8 * w * 4, 3)


def test_scale_recipe_needs_the_encoders_of_its_cache(cached, tmp_path):
    root, encoders = cached
    shards = f"data.shards=[{root}/cache/cache-*.tar]"
    with pytest.raises(ConfigError, match=r"^text.path and model.vae: data.cached=true"):
        load_config("recipes/scale/7B.yaml", [*TINY, shards])
    other = load_config("recipes/scale/7B.yaml", [*TINY, encoders[0], f"text.path={root / 't5-other'}", shards,
                                                  f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"cached with another text encoder than text.path gives \(differs in: "
                                          r"weights_sha256\); set text.path=.*/t5 as its cache.json records"):
        Trainer(other)
    record = json.loads((root / "cache" / "cache.json").read_text())["settings"]
    assert record["vae_fingerprint"]["config"]["latent_channels"] == 4 and record["text_fingerprint"]["weights_sha256"]
