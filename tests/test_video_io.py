"""Video files: uint8 conversion, mp4 / gif writing, reading back, and clear errors."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from stdit.data import video as video_io
from stdit.data.video import read_video, to_uint8, write_video


def pattern(t, h, w):
    """A smooth [3, T, H, W] test video in [-1, 1] whose frames all differ (GIF merges identical frames)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    ramp = torch.linspace(-0.5, 0.5, t)[:, None, None]
    return torch.stack([yy.expand(t, h, w) * 0.5 + ramp, xx.expand(t, h, w), (yy * xx).expand(t, h, w)])


def test_to_uint8():
    v = torch.tensor([-1.0, -2.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)  # grey, with out-of-range values
    out = to_uint8(v)
    assert out.shape == (1, 1, 5, 3) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
    assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 0], out[..., 2])
    rgb = to_uint8(pattern(2, 3, 4))
    assert rgb.shape == (2, 3, 4, 3) and rgb.is_contiguous()
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(2, 1, 3, 3))


@pytest.mark.parametrize("t,h,w,upscale", [(6, 16, 24, 1), (5, 17, 31, 1), (4, 9, 13, 3), (1, 8, 8, 2)])
def test_mp4_roundtrip(tmp_path, t, h, w, upscale):
    frames = to_uint8(pattern(t, h, w))
    path = write_video(tmp_path / "deep" / "dir" / "a.mp4", frames, fps=12.0, upscale=upscale)
    assert path == tmp_path / "deep" / "dir" / "a.mp4" and path.is_file()
    back, fps = read_video(path)
    H, W = h * upscale, w * upscale
    assert back.dtype == torch.uint8 and back.shape == (t, H + H % 2, W + W % 2, 3)  # odd sizes padded to even
    assert fps == pytest.approx(12.0)
    err = (back[:, :H:upscale, :W:upscale].float() - frames.float()).abs().mean()
    assert err < 10, float(err)


def test_ndarray_input_and_mpeg4_fallback_codec(tmp_path):
    frames = to_uint8(pattern(4, 16, 16)).numpy()
    back, _ = read_video(write_video(tmp_path / "n.mp4", frames))
    assert back.shape == (4, 16, 16, 3)
    video_io._write_pyav(tmp_path / "m.mp4", frames, 8.0, "mpeg4")  # the codec tried when libx264 is missing
    back, fps = read_video(tmp_path / "m.mp4")
    assert back.shape == (4, 16, 16, 3) and fps == pytest.approx(8.0)
    assert (back.float() - torch.from_numpy(frames).float()).abs().mean() < 10


def test_gif_roundtrip(tmp_path):
    frames = to_uint8(pattern(5, 11, 14))
    path = write_video(tmp_path / "g.gif", frames, fps=10.0, upscale=2)
    assert path.suffix == ".gif"
    back, fps = read_video(path)
    assert back.shape == (5, 22, 28, 3)  # no padding for GIF
    assert fps == pytest.approx(10.0, rel=0.1)  # durations are stored in 10 ms units
    assert (back[:, ::2, ::2].float() - frames.float()).abs().mean() < 25  # 256-colour palette
    from PIL import Image
    with Image.open(path) as im:
        assert im.info.get("loop") == 0  # loops forever


def test_failed_mp4_falls_back_to_gif(tmp_path, monkeypatch):
    def broken(path, *args):
        Path(path).write_bytes(b"half")  # a partial file must not be left behind
        raise RuntimeError("no encoder")

    monkeypatch.setattr(video_io, "_write_pyav", broken)
    with pytest.warns(UserWarning, match="no encoder"):
        path = write_video(tmp_path / "x.mp4", to_uint8(pattern(3, 8, 8)))
    assert path == tmp_path / "x.gif" and not (tmp_path / "x.mp4").exists()
    assert read_video(path)[0].shape == (3, 8, 8, 3)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "a.mp4", torch.zeros(2, 4, 4, 3))  # float frames
    with pytest.raises(ValueError, match="upscale"):
        write_video(tmp_path / "a.mp4", torch.zeros(2, 4, 4, 3, dtype=torch.uint8), upscale=0)
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "a.mp4", torch.zeros(2, 4, 4, 3, dtype=torch.uint8), fps=0)


def test_read_video_errors_name_the_file(tmp_path):
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="garbage.mp4"):
        read_video(bad)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    import av
    audio = tmp_path / "sound.wav"  # a valid file with no video stream
    with av.open(str(audio), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="sound.wav.*no video stream"):
            read_video(audio)
