"""Video files: write mp4 (H.264 via PyAV) or gif (Pillow), read any file PyAV decodes."""
from __future__ import annotations

import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[C, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8 on the CPU; C=1 is repeated as grey, values are clamped."""
    if video.ndim != 4 or video.shape[0] not in (1, 3):
        raise ValueError(f"video must be [C, T, H, W] with C = 1 or 3, got {tuple(video.shape)}")
    v = video.detach().float().cpu()
    if v.shape[0] == 1:
        v = v.expand(3, -1, -1, -1)
    v = ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).contiguous()


def _frames_array(frames, upscale: int) -> np.ndarray:
    """Check uint8 [T, H, W, 3] frames and upscale them by pixel repetition (nearest neighbour)."""
    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or 0 in arr.shape:
        raise ValueError(f"frames must be non-empty uint8 [T, H, W, 3], got {arr.dtype} {arr.shape}")
    if int(upscale) != upscale or upscale < 1:
        raise ValueError(f"upscale must be a positive integer, got {upscale}")
    if upscale > 1:
        arr = arr.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return np.ascontiguousarray(arr)


def _write_gif(path: Path, arr: np.ndarray, fps: float) -> Path:
    """Animated GIF that loops forever. GIF stores durations in 10 ms units, and Pillow merges identical
    consecutive frames into one longer frame: playback timing is right, the decoded frame count may be lower."""
    from PIL import Image
    images = [Image.fromarray(f) for f in arr]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(round(1000 / fps), 20), loop=0)
    return path


def _write_pyav(path: Path, arr: np.ndarray, fps: float, codec: str) -> None:
    """Encode with PyAV; the container follows the suffix."""
    import av
    # yuv420p subsamples chroma 2x2, so encoders need even sizes: pad by repeating the last row / column
    _, h, w, _ = arr.shape
    arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = arr.shape[2], arr.shape[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "medium"}  # near-lossless: tiny demo clips are cheap anyway
        else:
            stream.bit_rate = 4_000_000  # mpeg4's default bit rate smears small frames
        for frame in arr:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush delayed frames


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def write_video(path, frames, fps: float = 8.0, upscale: int = 1) -> Path:
    """Write uint8 [T, H, W, 3] frames (tensor or ndarray) and return the path written.

    .png / .jpg / .jpeg: one frame as an image (more frames are refused: use .mp4 or .gif).
    .gif: Pillow animated GIF. Anything else (.mp4): PyAV, H.264 (libx264, else mpeg4), yuv420p, odd sizes padded
    to even. If no codec works, a .gif is written next to it instead (with a warning) and its path returned.
    `upscale` repeats pixels so that tiny demo videos are visible. Parent directories are created.
    """
    path = Path(path)
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    arr = _frames_array(frames, upscale)
    if path.suffix.lower() in IMAGE_SUFFIXES and arr.shape[0] != 1:
        raise ValueError(f"{path.name} names an image but there are {arr.shape[0]} frames; write .mp4 or .gif, "
                         "or generate --frames 1")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image
        Image.fromarray(arr[0]).save(path)
        return path
    if path.suffix.lower() == ".gif":
        return _write_gif(path, arr, fps)
    errors = []
    for codec in ("libx264", "mpeg4"):
        try:
            _write_pyav(path, arr, fps, codec)
            return path
        except Exception as e:  # codec missing from this FFmpeg build, or it rejects the input: try the next
            errors.append(f"{codec}: {e}")
            path.unlink(missing_ok=True)  # no half-written file left behind
    gif = path.with_suffix(".gif")
    warnings.warn(f"could not encode {path} ({'; '.join(errors)}); wrote {gif} instead", stacklevel=2)
    return _write_gif(gif, arr, fps)


def read_video(path) -> tuple[torch.Tensor, float]:
    """Decode every frame of a video file (mp4, gif, ...): uint8 [T, H, W, 3] and its fps.

    A missing file raises FileNotFoundError; a file without a decodable video stream raises ValueError naming it.
    """
    import av
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {path}")
    try:
        with av.open(str(path)) as container:
            streams = container.streams.video
            if streams:
                stream = streams[0]
                fps = float(stream.average_rate or stream.guessed_rate or 0) or 8.0
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except Exception as e:  # PyAV raises many types (some of them ValueError); report them all the same way
        raise ValueError(f"{path} cannot be decoded as a video: {e}") from e
    if not streams:
        raise ValueError(f"{path} has no video stream")
    if not frames:
        raise ValueError(f"{path} has no decodable frames")
    return torch.from_numpy(np.stack(frames)), fps
