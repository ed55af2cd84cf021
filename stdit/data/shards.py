"""Reading the tar shards `stdit data shard` writes (stdit/data/ingest.py), as a random-access dataset.

Opening the shards builds an index (shard, member offset and size of each sample's media, caption and probe)
from the tar headers alone, so sample i is one seek and one decode, and the StepSampler's epoch permutations and
stream positions (stdit/data/loader.py: exact resume on any layout) apply to real data as to the synthetic clips.

A sample is decoded with PyAV (Pillow for images); every k-th frame is kept (k = data.frame_stride, or the
source fps / data.target_fps rounded, at least 1); the first frames are cut to the largest of
`data.frame_counts` the clip holds (an image is one frame); then resized to cover and centre-cropped to the
entry of `data.resolutions` whose aspect ratio is nearest its own (portrait clips go to portrait buckets).
The shape a sample will have is known from the index (the probe) without decoding: shape_of(i).
"""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stdit.data.sample import Sample


def expand(patterns: list[str] | str) -> list[Path]:
    """Shard paths from patterns: brace ranges (shard-{000000..000009}.tar), globs, or plain paths."""
    import glob

    import braceexpand
    out, missing = [], []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        for p in braceexpand.braceexpand(str(pattern)):
            found = sorted(glob.glob(p))
            out.extend(Path(f) for f in found)
            if not found:
                missing.append(p)
    if not out or missing:
        raise FileNotFoundError(f"data.shards={patterns}: no shard file at {missing or patterns}")
    return out


def tar_index(shard: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """{sample key: {extension: (data offset, size)}} of a tar shard, from its headers alone, keys sorted."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            groups.setdefault(key, {})[ext] = (m.offset_data, m.size)
    return dict(sorted(groups.items()))


def read_member(shard: Path, where: tuple[int, int]) -> bytes:
    """The bytes of one tar member at (data offset, size)."""
    with open(shard, "rb") as f:
        f.seek(where[0])
        return f.read(where[1])


class ShardDataset:
    """Samples of webdataset tar shards, by index."""

    def __init__(self, patterns, resolutions, frame_counts, frame_stride: int = 1, target_fps: float = 0.0):
        self.resolutions = [tuple(int(x) for x in r) for r in resolutions]
        self.frame_counts = sorted(int(t) for t in frame_counts)
        self.frame_stride, self.target_fps = int(frame_stride), float(target_fps)
        self.entries, self.keys = [], []  # (shard, {extension: (offset, size)}, probe); the samples' tar keys
        for shard in expand(patterns):
            for key, parts in tar_index(shard).items():
                if "txt" in parts and "json" in parts and len(parts) >= 3:
                    self.entries.append((shard, parts, json.loads(read_member(shard, parts["json"]))))
                    self.keys.append(key)

    def __len__(self) -> int:
        return len(self.entries)

    def stride(self, fps: float) -> int:
        """Keep every k-th source frame: data.frame_stride, or source fps / data.target_fps when that is set."""
        if self.target_fps > 0 and fps > 0:
            return max(1, round(fps / self.target_fps))
        return self.frame_stride

    def _frames(self, probe: dict) -> int:
        """Frames the sample will have: the largest allowed count the strided clip holds (1 if none)."""
        held = 1 + (int(probe["frames"]) - 1) // self.stride(probe.get("fps", 0.0))
        return max([t for t in self.frame_counts if t <= held] or [1])

    def shape_of(self, i: int) -> tuple[int, int, int]:
        """(T, H, W) of sample i as __getitem__ returns it, from the probe alone."""
        probe = self.entries[i][2]
        return (self._frames(probe), *bucket(probe["height"], probe["width"], self.resolutions))

    def __getitem__(self, i: int) -> Sample:
        shard, parts, probe = self.entries[i]
        caption = read_member(shard, parts["txt"]).decode().strip()
        media = next(e for e in parts if e not in ("txt", "json"))
        k, t = self.stride(probe.get("fps", 0.0)), self._frames(probe)
        frames, fps = decode(read_member(shard, parts[media]), media, 1 + (t - 1) * k)
        frames = frames[::k][:t]
        if frames.shape[0] != t:
            raise ValueError(f"{shard} sample {i}: decoded {frames.shape[0]} frames, its probe promised {t}")
        video = fit_to_bucket(frames, self.resolutions)
        fps = fps or probe.get("fps") or 8.0
        return Sample(sample_id=i, video=video, caption=caption, fps=fps / k)


def decode(data: bytes, ext: str, max_frames: int) -> tuple[torch.Tensor, float]:
    """Up to `max_frames` frames of a video (or the image) in `data`: uint8 [T, H, W, 3] and fps."""
    if ext in ("jpg", "jpeg", "png"):
        from PIL import Image
        with Image.open(io.BytesIO(data)) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy())[None], 0.0
    import av
    out = []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        for frame in container.decode(stream):
            out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == max_frames:
                break
    return torch.from_numpy(np.stack(out)), fps


def bucket(H: int, W: int, resolutions) -> tuple[int, int]:
    """The (h, w) of `resolutions` nearest in aspect ratio to H x W (ties: the larger)."""
    return tuple(min(resolutions, key=lambda r: (abs(math.log((r[0] / r[1]) / (H / W))), -r[0] * r[1])))


def fit_to_bucket(frames: torch.Tensor, resolutions: list[tuple[int, int]]) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, h, w] in [-1, 1] at the bucket of the nearest aspect ratio (resize to
    cover, centre crop)."""
    _, H, W, _ = frames.shape
    h, w = bucket(H, W, resolutions)
    scale = max(h / H, w / W)
    nh, nw = max(h, round(H * scale)), max(w, round(W * scale))
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - h) // 2, (nw - w) // 2
    x = x[:, :, top:top + h, left:left + w]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()
