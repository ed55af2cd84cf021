"""Every generation mode: given frames come out exact, the generated frames depend on them, time positions are
honoured, bad combinations are refused; long-video schedules; the causal autoencoder's frame mapping."""
import pytest
import torch
from conftest import randomize, tiny_model_cfg

from stdit.conditioning import Given, condition_for
from stdit.config import Config
from stdit.generate import generate
from stdit.longvideo import SCHEMES, generate_long, schedule
from stdit.models.stdit import STDiT

TEXT_DIM, T, HW = 16, 6, (8, 8)


class _TextStub:
    """Captions as a few deterministic vectors (the modes do not care what the encoder is)."""
    dim = TEXT_DIM

    def encode(self, captions):
        return [torch.randn(3, TEXT_DIM, generator=torch.Generator().manual_seed(len(c))) for c in captions]


def _setup(causal=False):
    torch.manual_seed(0)  # the same model every time: differences come from the inputs alone
    cfg = Config()
    cfg.model = tiny_model_cfg(temporal_causal=causal)
    cfg.diffusion.cfg_scale = 2.0
    model = randomize(STDiT(cfg.model, TEXT_DIM), std=0.1).eval()
    return model, cfg


def _clip(n, seed):
    return torch.rand(3, n, *HW, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _gen(mode, causal=False, **kw):
    model, cfg = _setup(causal)
    return generate(model, _TextStub(), cfg, "a prompt", (T, *HW), mode, steps=3, **kw)


@pytest.mark.parametrize("mode,inputs,given", [
    ("i2v", dict(image=_clip(1, 1)), {0: ("image", 0)}),
    ("i2v", dict(image=_clip(2, 1)), {0: ("image", 0), 1: ("image", 1)}),  # continuation
    ("extend_forward", dict(clip=_clip(5, 2), k=2), {0: ("clip", 3), 1: ("clip", 4)}),
    ("extend_backward", dict(clip=_clip(5, 2), k=2), {T - 2: ("clip", 0), T - 1: ("clip", 1)}),
    ("connect", dict(clip=_clip(4, 2), clip_b=_clip(4, 3), k=1), {0: ("clip", 3), T - 1: ("clip_b", 0)}),
    ("keyframes", dict(keyframes=[(_clip(1, 4), 0), (_clip(1, 5), 3)]), {0: ("key0", 0), 3: ("key1", 0)}),
    ("loop", dict(image=_clip(1, 6)), {0: ("image", 0)}),
])
def test_given_frames_are_exact_and_the_rest_depends_on_them(mode, inputs, given):
    out = _gen(mode, **inputs)
    assert out.shape == (3, T, *HW)
    keys = {f"key{i}": f for i, (f, _) in enumerate(inputs.get("keyframes", []))}
    for frame, (name, src) in given.items():
        torch.testing.assert_close(out[:, frame], (keys[name] if name in keys else inputs[name])[:, src])
    # the same request with other given pixels changes the generated frames
    other = {k: ([(-f, at) for f, at in v] if k == "keyframes" else -v if torch.is_tensor(v) else v)
             for k, v in inputs.items()}
    out2 = _gen(mode, **other)
    free = [f for f in range(T) if f not in given]
    assert (out2[:, free] - out[:, free]).abs().max() > 1e-3


def test_loop_closes_on_its_first_frame():
    """The frame after the last is given as the first again: sampled with it, then dropped."""
    image = _clip(1, 6)
    model, cfg = _setup()
    from stdit.conditioning import mode_givens
    givens, frames = mode_givens("loop", T, 1, image)
    assert frames == T + 1 and [g.at for g in givens] == [0, T]
    assert torch.equal(_gen("loop", image=image)[:, 0], image[:, 0])


def test_text_to_image_and_edit_strengths():
    img = _gen("t2v")
    model, cfg = _setup()
    one = generate(model, _TextStub(), cfg, "a prompt", (1, *HW), steps=3)
    assert one.shape == (3, 1, *HW)
    clip = _clip(T, 7)
    # strength 1: the clip is forgotten (pure noise start: text-to-video); small strength: close to the clip
    torch.testing.assert_close(_gen("edit", clip=clip, strength=1.0), img)
    near = (_gen("edit", clip=clip, strength=0.05) - clip).abs().mean()
    far = (_gen("edit", clip=clip, strength=0.9) - clip).abs().mean()
    assert near < far
    with pytest.raises(ValueError, match="edit needs a clip"):
        _gen("edit", clip=_clip(T - 1, 7))


def test_bad_combinations_are_refused():
    with pytest.raises(ValueError, match="causal in time"):
        _gen("extend_backward", causal=True, clip=_clip(3, 1), k=1)
    _gen("extend_forward", causal=True, clip=_clip(3, 1), k=1)  # earlier frames only: fine
    with pytest.raises(ValueError, match="do not fit"):
        _gen("keyframes", keyframes=[(_clip(1, 1), T)])
    with pytest.raises(ValueError, match="overlap"):
        _gen("keyframes", keyframes=[(_clip(1, 1), 2), (_clip(1, 2), 2)])
    with pytest.raises(ValueError, match="nothing is left"):
        _gen("i2v", image=_clip(T, 1))
    with pytest.raises(ValueError, match="needs its input"):
        _gen("extend_forward")
    model, cfg = _setup()
    from stdit.diffusion.sampler import sample_videos
    with pytest.raises(ValueError, match="the condition clip has shape"):
        sample_videos(model, _TextStub(), ["a"], [(T, *HW)], cfg.model, cfg.diffusion, steps=1,
                      conditions=[(_clip(T - 1, 1), torch.tensor([True] + [False] * (T - 2)))])


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("length,window", [(32, 8), (9, 4), (5, 8), (50, 6)])
def test_long_video_schedules(scheme, length, window):
    """Every frame generated exactly once, each stage fits the window, given frames exist already."""
    done = set()
    for s in schedule(scheme, length, window):
        assert len(s.generate) + len(s.given) <= window and s.generate
        assert set(s.given) <= done and not set(s.generate) & done
        done |= set(s.generate)
    assert done == set(range(length))


def test_long_video_keeps_given_frames_and_real_time_positions():
    model, cfg = _setup()
    video = generate_long(model, _TextStub(), ["a", "b"], 12, HW, 4, "hierarchical", cfg.model, cfg.diffusion,
                          steps=2)
    assert video.shape == (3, 12, *HW) and video.abs().sum(dim=(0, 2, 3)).min() > 0  # every frame was made
    with pytest.raises(ValueError, match="causal in time"):
        generate_long(*_setup(True)[:1], _TextStub(), ["a"], 12, HW, 4, "hierarchical", _setup(True)[1].model,
                      cfg.diffusion, steps=1)


def test_condition_mapping_through_the_causal_autoencoder():
    """Pixel frames given anywhere map to the latent frames a causal encoder gives them: at the start the video's
    own first latents, later a chunk of its own at a multiple of the time factor."""
    from stdit.config import load_config
    from stdit.models.vae import VideoVAE
    vae = VideoVAE(load_config("recipes/vae/tiny.yaml").vae).eval()
    ft = vae.time_factor
    head, tail = _clip(5, 1)[:, :, :8, :8], _clip(5, 2)[:, :, :8, :8]
    hw = (16, 16)
    head, tail = [torch.nn.functional.interpolate(c, size=hw) for c in (head, tail)]
    t = 1 + 4 * ft  # 5 latent frames
    with torch.no_grad():
        clean, mask = condition_for([Given(head, 0), Given(tail, t - 5)], (t, *hw), (1, 1, 1), vae)
        assert mask.tolist() == [True, True, False, True, True]
        torch.testing.assert_close(clean[:, :2], vae.encode(head[None])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clean[:, 3:], vae.encode(tail[None])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 4"):
        condition_for([Given(tail, 3)], (t, *hw), (1, 1, 1), vae)


def test_cli_modes(tmp_path, capsys):
    """`stdit generate` on a briefly trained run: a real PNG for one frame, modes from files, a long video's
    schedule, and clear errors."""
    import numpy as np
    from PIL import Image

    from stdit.cli import main
    from stdit.data.video import read_video, write_video
    fast = ["model.hidden_size=32", "model.depth=2", "model.num_heads=4", "data.resolutions=[[8,8]]",
            "data.frame_counts=[1,4]", "data.batch_size=2", "data.micro_batches=0", "data.token_budget=64",
            "data.num_samples=8",
            "text.hidden_size=16", "text.num_layers=1", "text.ff_size=32", "run.samples_at_end=0"]
    run = tmp_path / "run"
    main(["train", "recipes/tiny.yaml", *fast, "run.steps=1", f"run.dir={run}"])
    base = ["generate", "--run", str(run), "--prompt", "a red square on a blue background", "--height", "8",
            "--width", "8", "--steps", "2", "--upscale", "1"]
    main([*base, "--frames", "1", "--out", str(tmp_path / "x.png")])
    with Image.open(tmp_path / "x.png") as im:
        assert im.format == "PNG" and im.size == (8, 8)
    clip = (np.random.default_rng(0).random((5, 8, 8, 3)) * 255).astype(np.uint8)
    write_video(tmp_path / "clip.gif", clip)
    main([*base, "--frames", "4", "--extend-backward", str(tmp_path / "clip.gif"), "--cond-frames", "2",
          "--out", str(tmp_path / "back.gif")])
    frames, _ = read_video(tmp_path / "back.gif")
    assert frames.shape[0] >= 3  # GIF may merge identical frames; the last two are the clip's first two
    assert (frames[-2:].double() - torch.from_numpy(clip[:2]).double()).abs().mean() < 12
    main([*base, "--frames", "4", "--loop", "--out", str(tmp_path / "loop.gif")])
    capsys.readouterr()
    main([*base, "--length", "16", "--scheme", "hierarchical", "--dry-run", "--out", str(tmp_path / "long.mp4")])
    out = capsys.readouterr().out
    assert "hierarchical: 16 frames in" in out and "stage   0: generate 0,5,10,15" in out
    for args, msg in [(["--frames", "4", "--loop", "--edit", "x.mp4"], "choose one mode"),
                      (["--frames", "4", "--keyframe", "nofile"], "give FILE@FRAME"),
                      (["--frames", "0"], "--frames must be >= 1"),
                      (["--frames", "4", "--out", str(tmp_path / "y.png")], "names an image: use --frames 1")]:
        with pytest.raises(SystemExit) as e:
            main([*base, *args, *([] if "--out" in args else ["--out", str(tmp_path / "z.mp4")])])
        assert e.value.code == 2 and msg in capsys.readouterr().err
