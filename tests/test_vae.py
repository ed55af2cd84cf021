"""The spacetime autoencoder: causality, shapes, tiling, training (single and data parallel), and the DiT in its
latent space end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import free_port, logged_losses

from stdit.config import ConfigError, VAEConfig, load_config
from stdit.models.vae import VideoVAE

SMALL = dict(base_channels=8, channel_mult=[1, 2, 2, 2], norm_groups=4, latent_channels=4)
VAE_FAST = ["run.log_every=1", "run.samples_at_end=1", "data.num_samples=64",
            "data.batch_size=4", "data.micro_batches=0", "data.resolutions=[[16,16],[16,24],[24,16]]",
            "data.frame_counts=[1,5]",
            "vae.base_channels=8", "vae.norm_groups=4", "vae.stats_samples=8", "optim.warmup_steps=2"]


def _vae(**kw) -> VideoVAE:
    torch.manual_seed(0)
    return VideoVAE(VAEConfig(**{**SMALL, **kw})).eval()


@torch.no_grad()
def test_latents_of_early_frames_ignore_later_frames():
    vae = _vae()
    x = torch.randn(1, 3, 13, 16, 16)
    later = x.clone()
    later[:, :, 5:] = torch.randn_like(later[:, :, 5:])  # frames 5.. feed latent frames 2.. only
    a, b = vae.posterior(x)[0], vae.posterior(later)[0]
    assert torch.equal(a[:, :, :2], b[:, :, :2])
    assert not torch.allclose(a[:, :, 2:], b[:, :, 2:])  # the test can fail: later latents do change
    # decoding is causal too: frames of the first two latents (0 .. 4) depend on those latents only
    za = a.clone()
    za[:, :, 2:] = torch.randn_like(za[:, :, 2:])
    assert torch.equal(vae.decoder(a)[:, :, :5], vae.decoder(za)[:, :, :5])


@torch.no_grad()
@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_shapes_follow_the_compression_rule(frames):
    vae = _vae()
    x = torch.randn(2, 3, frames, 16, 24)
    recon, mean, logvar = vae(x)
    assert mean.shape == logvar.shape == (2, 4, 1 + (frames - 1) // 4, 2, 3)
    assert recon.shape == x.shape
    assert vae.latent_shape(frames, 16, 24) == (1 + (frames - 1) // 4, 2, 3)
    assert vae.video_shape(*vae.latent_shape(frames, 16, 24)) == (frames, 16, 24)


def test_shapes_that_do_not_fit_fail_saying_what_fits():
    with pytest.raises(ValueError, match=r"frames must be 1 \+ 4k and height / width multiples of 8"):
        _vae().posterior(torch.randn(1, 3, 4, 16, 16))
    with pytest.raises(ConfigError, match="data.frame_counts"):
        load_config("recipes/vae/tiny.yaml", ["data.frame_counts=[1,4]"])
    with pytest.raises(ConfigError, match="parallel"):
        load_config("recipes/vae/tiny.yaml", ["parallel.tp=2"])


@torch.no_grad()
def test_temporal_tiling_is_exact():
    """Chunks streamed through the causal caches give what the whole video gives (fp32 round-off)."""
    vae = _vae(tile_frames=2, tile_size=0)
    x = torch.randn(1, 3, 29, 16, 16) * 0.5  # 8 latent frames: chunks of 2
    mean = vae.posterior(x)[0]
    torch.testing.assert_close(vae.tiled_encode(x), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.tiled_decode(mean), vae.decoder(mean), rtol=1e-5, atol=1e-5)
    assert vae.tiled_decode(mean).shape == x.shape


def _vae_args(run_dir, steps, *extra):
    return ["recipes/vae/tiny.yaml", *VAE_FAST, f"run.dir={run_dir}", f"run.steps={steps}", *extra]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A tiny autoencoder trained for 4 steps on one process (also the reference of the data-parallel test)."""
    run = tmp_path_factory.mktemp("vae")
    out = subprocess.run([sys.executable, "-m", "stdit.cli", "train", *_vae_args(run, 4)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def test_vae_run_writes_metrics_stats_reconstructions_and_checkpoint(vae_run):
    lines = [json.loads(x) for x in (vae_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all({"loss", "recon_l1", "kl", "psnr", "grad_norm", "lr"} <= set(m) for m in lines)
    stats = json.loads((vae_run / "latent_stats.json").read_text())
    assert len(stats["mean"]) == len(stats["std"]) == 4 and all(s > 0 for s in stats["std"])
    assert list((vae_run / "samples").glob("recon_*.mp4")) and list((vae_run / "tb").glob("events.*"))
    assert (vae_run / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_vae_data_parallel_zero2_matches_one_process(vae_run, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "stdit.train", *_vae_args(tmp_path, 4, "parallel.zero=2", "run.samples_at_end=0")]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ref, got = logged_losses(vae_run), logged_losses(tmp_path)
    assert len(got) == len(ref) == 4
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(got, ref)), (got, ref)


def test_vae_reconstruct_cli_and_python_api(vae_run, tmp_path):
    from stdit.autoencoder import load_vae
    from stdit.data.synthetic import SyntheticClips
    from stdit.data.video import read_video, to_uint8, write_video
    clip = SyntheticClips(1, [(24, 32)], [7], [8.0], seed=3)[0].video  # 7 frames: cropped to 5
    src = write_video(tmp_path / "in.mp4", to_uint8(clip), fps=8.0)
    out = subprocess.run([sys.executable, "-m", "stdit.cli", "vae", "reconstruct", "--run", str(vae_run), str(src),
                          str(tmp_path / "out.mp4")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cropping 7x24x32 to 5x24x32" in out.stdout and "PSNR" in out.stdout
    frames, fps = read_video(tmp_path / "out.mp4")
    assert frames.shape == (5, 24, 32, 3) and fps == 8.0
    vae = load_vae(vae_run)
    latents = vae.encode(clip[None, :, :5])
    assert latents.shape == (1, 4, 2, 3, 4) and vae.decode(latents).shape == (1, 3, 5, 24, 32)


def test_dit_trains_in_the_latent_space_and_generates_pixels(vae_run, tmp_path):
    from stdit.data.video import read_video
    run = tmp_path / "dit"
    args = ["recipes/tiny_latent.yaml", f"model.vae={vae_run}", f"run.dir={run}", "run.steps=2", "run.log_every=1",
            "run.samples_at_end=1", "model.hidden_size=32", "model.depth=1", "text.hidden_size=16",
            "text.num_layers=1", "text.ff_size=32", "data.num_samples=16", "data.batch_size=4", "data.micro_batches=0",
            "data.resolutions=[[16,16],[16,32]]", "diffusion.sample_steps=2"]
    out = subprocess.run([sys.executable, "-m", "stdit.cli", "train", *args], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = load_config(run / "config.yaml")
    assert cfg.model.in_channels == 4 and cfg.model.vae == str(vae_run.resolve())
    assert list((run / "samples").glob("*.mp4"))
    gen = subprocess.run([sys.executable, "-m", "stdit.cli", "generate", "--run", str(run), "--prompt", "a red square",
                          "--frames", "5", "--height", "16", "--width", "32", "--steps", "2", "--upscale", "1",
                          "--out", str(tmp_path / "gen.mp4")], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    frames, _ = read_video(tmp_path / "gen.mp4")
    assert frames.shape == (5, 16, 32, 3)


@torch.no_grad()
def test_spatial_tiles_are_placed_and_blended_exactly_for_a_local_map():
    """The tile grid and blending weights: with a position-wise map (pooling by 8 down, nearest x8 up) the tiled
    result is the untiled one to round-off. (With the real network spatial tiles are an approximation: GroupNorm
    statistics and the middle attention see a tile, not the frame.)"""
    vae = _vae(tile_size=32, tile_overlap=16, tile_frames=0)
    x = torch.randn(1, 3, 5, 56, 72)
    pool = lambda v: torch.nn.functional.avg_pool3d(v, (1, 8, 8))  # noqa: E731
    up = lambda v: v.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)  # noqa: E731
    torch.testing.assert_close(vae._tiled(x, pool, 8, down=True), pool(x), rtol=1e-5, atol=1e-6)
    z = torch.randn(1, 4, 2, 7, 9)
    torch.testing.assert_close(vae._tiled(z, up, 8, down=False), up(z), rtol=1e-5, atol=1e-6)
    assert len(vae._spatial_tiles(56, 32, 16)) == 3  # the frame really was tiled
