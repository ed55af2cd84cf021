"""Demo clips, video files and the caption encoder."""
import pytest
import torch

from stdit.data.synthetic import COLOURS, SyntheticClips
from stdit.data.video import read_video, to_uint8, write_video
from stdit.models.text import TextEncoder

RES = [(16, 16), (16, 24), (24, 16)]


def test_clips_are_deterministic_and_independent_of_access_order():
    a, b = SyntheticClips(50, RES, [1, 4, 8], [8.0, 16.0], seed=3), SyntheticClips(50, RES, [1, 4, 8], [8.0], seed=3)
    first = [a[i] for i in range(10)]
    for i in reversed(range(10)):
        s = SyntheticClips(50, RES, [1, 4, 8], [8.0, 16.0], seed=3)[i]
        assert torch.equal(s.video, first[i].video) and s.caption == first[i].caption
        assert tuple(s.video.shape[1:]) == a.shape_of(i) and s.video.shape[0] == 3
        assert s.video.min() >= -1 and s.video.max() <= 1
    assert b[0].caption == a[0].caption
    assert any(not torch.equal(a[i].video, SyntheticClips(50, RES, [1, 4, 8], [8.0, 16.0], seed=4)[i].video)
               for i in range(5))
    with pytest.raises(IndexError):
        a[50]


def test_captions_say_what_the_clip_shows():
    ds = SyntheticClips(200, RES, [1, 8], [8.0], seed=0)
    moving = 0
    for i in range(40):
        s = ds[i]
        words = s.caption.split()
        fg, bg = words[1], words[-2]
        rgb = lambda name: torch.tensor(COLOURS[name]) * 2 - 1  # noqa: E731
        corner = s.video[:, 0, 0, 0]
        assert torch.allclose(corner, rgb(bg)), (s.caption, corner)
        is_fg = (s.video - rgb(fg)[:, None, None, None]).abs().sum(0) < 1e-6  # [T, H, W]
        assert is_fg.any()
        if s.video.shape[1] == 1:
            assert "moving" not in s.caption
            continue
        moving += 1
        direction = words[words.index("moving") + 1]
        ys, xs = torch.meshgrid(torch.arange(s.video.shape[2]).float(), torch.arange(s.video.shape[3]).float(),
                                indexing="ij")
        cy = [(ys * m).sum() / m.sum() for m in is_fg.float()]
        cx = [(xs * m).sum() / m.sum() for m in is_fg.float()]
        dy, dx = cy[-1] - cy[0], cx[-1] - cx[0]
        expect = {"left": dx < -1, "right": dx > 1, "up": dy < -1, "down": dy > 1}[direction]
        assert expect, (s.caption, float(dy), float(dx))
    assert moving > 5


def test_mp4_and_gif_roundtrip(tmp_path):
    t, h, w = 6, 17, 30  # odd height is padded to even for yuv420p
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    ramp = torch.linspace(-0.5, 0.5, t)[:, None, None]  # frames differ: GIF merges identical frames
    video = torch.stack([yy.expand(t, h, w) * 0.5 + ramp, xx.expand(t, h, w), (yy * xx).expand(t, h, w)])
    frames = to_uint8(video)
    assert frames.shape == (t, h, w, 3) and frames.dtype == torch.uint8
    for name in ["a.mp4", "b.gif"]:
        path = write_video(tmp_path / "sub" / name, frames, fps=8.0, upscale=2)
        back, fps = read_video(path)
        assert back.shape[0] == t and back.shape[1] in (2 * h, 2 * h + 1) and back.shape[2] == 2 * w
        assert fps == pytest.approx(8.0, rel=0.1)  # GIF stores frame durations in 10 ms units
        err = (back[:, : 2 * h : 2, ::2].float() - frames.float()).abs().mean()
        assert err < (10 if name.endswith("mp4") else 25), (name, float(err))


def test_read_video_names_a_bad_file(tmp_path):
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="garbage.mp4"):
        read_video(bad)


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_random_text_encoder_is_seeded_unpadded_and_batch_invariant(kind, tmp_path):
    state = torch.get_rng_state()
    enc = TextEncoder(kind, hidden_size=32, num_layers=1, num_heads=2, ff_size=64, seed=1)
    assert torch.equal(state, torch.get_rng_state())  # building it leaves the global RNG alone
    caps = ["a red square moving left on a blue background", "", "a cyan circle on a black background"]
    out = enc.encode(caps)
    lengths = [len(c.encode()) + 1 for c in caps]  # ByT5: one token per byte + EOS
    assert [o.shape for o in out] == [(n, 32) for n in lengths]
    fresh = TextEncoder(kind, hidden_size=32, num_layers=1, num_heads=2, ff_size=64, seed=1)
    for c, o in zip(caps, out):
        torch.testing.assert_close(fresh.encode([c])[0], o, rtol=1e-5, atol=1e-5)
    other = TextEncoder(kind, hidden_size=32, num_layers=1, num_heads=2, ff_size=64, seed=2)
    assert not torch.allclose(other.encode(caps[:1])[0], out[0])
    # a saved model loads back from a local path with the same embeddings
    enc.model.save_pretrained(tmp_path / "enc")
    enc.tokenizer.save_pretrained(tmp_path / "enc")
    loaded = TextEncoder(kind, path=str(tmp_path / "enc"))
    torch.testing.assert_close(loaded.encode(caps)[0], out[0])
    with pytest.raises(FileNotFoundError, match="text.path"):
        TextEncoder(kind, path=str(tmp_path / "missing"))
