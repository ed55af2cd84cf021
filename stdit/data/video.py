"""Video files: write mp4 (H.264 via PyAV) or gif, read any container PyAV decodes."""
from __future__ import annotations

import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[C, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8 (1 channel is repeated as grey)."""
    v = video.detach().float().cpu()
    if v.shape[0] == 1:
        v = v.repeat(3, 1, 1, 1)
    v = ((v[:3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).contiguous()


def _frames_array(frames, upscale: int) -> np.ndarray:
    arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {arr.dtype} {arr.shape}")
    if upscale > 1:
        arr = arr.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return arr


def _write_gif(path: Path, arr: np.ndarray, fps: float) -> Path:
    from PIL import Image
    images = [Image.fromarray(f) for f in arr]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(int(1000 / fps), 20), loop=0)
    return path


def _write_mp4(path: Path, arr: np.ndarray, fps: float, codec: str) -> None:
    import av
    # yuv420p needs even sizes: pad by repeating the last row / column
    t, h, w, _ = arr.shape
    arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = arr.shape[2], arr.shape[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "medium"}
        for frame in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_video(path, frames, fps: float = 8.0, upscale: int = 1) -> Path:
    """Write uint8 [T, H, W, 3] frames; .mp4 via PyAV (libx264, else mpeg4), .gif via Pillow. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = _frames_array(frames, upscale)
    if path.suffix.lower() == ".gif":
        return _write_gif(path, arr, fps)
    errors = []
    for codec in ("libx264", "mpeg4"):
        try:
            _write_mp4(path, arr, fps, codec)
            return path
        except Exception as e:  # a codec missing from this FFmpeg build: try the next
            errors.append(f"{codec}: {e}")
    gif = path.with_suffix(".gif")
    warnings.warn(f"could not encode {path} ({'; '.join(errors)}); wrote {gif} instead")
    return _write_gif(gif, arr, fps)


def read_video(path) -> tuple[torch.Tensor, float]:
    """Decode every frame of a video file: uint8 [T, H, W, 3] and its fps."""
    import av
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 8.0
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path} cannot be decoded: {e}") from None
    if not frames:
        raise ValueError(f"{path} has no decodable frames")
    return torch.from_numpy(np.stack(frames)), fps
