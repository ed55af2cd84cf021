"""Reading the tar shards `stdit data shard` writes, as a random-access dataset.

Opening the shards builds an index (shard, member offset and size of each sample's media, caption and probe)
from the tar headers alone, so sample i is one seek and one decode, and GlobalBatches' epoch permutations and
position-in-samples (exact resume on any layout) apply to real data as to the synthetic clips.

A sample is decoded with PyAV (Pillow for images), cut to the largest of `data.frame_counts` that the clip
holds (its first frames; an image is one frame), resized to cover and centre-cropped to the entry of
`data.resolutions` whose aspect ratio is nearest its own (portrait clips go to portrait buckets).
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


class ShardDataset:
    """Samples of webdataset tar shards, by index."""

    def __init__(self, patterns, resolutions, frame_counts):
        self.resolutions = [tuple(int(x) for x in r) for r in resolutions]
        self.frame_counts = sorted(int(t) for t in frame_counts)
        self.entries = []  # (shard, {extension: (offset, size)})
        for shard in expand(patterns):
            groups: dict[str, dict[str, tuple[int, int]]] = {}
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    key, _, ext = m.name.partition(".")
                    groups.setdefault(key, {})[ext] = (m.offset_data, m.size)
            for key in sorted(groups):
                if "txt" in groups[key] and len(groups[key]) >= 2:
                    self.entries.append((shard, groups[key]))

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, shard: Path, where: tuple[int, int]) -> bytes:
        with open(shard, "rb") as f:
            f.seek(where[0])
            return f.read(where[1])

    def __getitem__(self, i: int) -> Sample:
        shard, parts = self.entries[i]
        caption = self._read(shard, parts["txt"]).decode().strip()
        meta = json.loads(self._read(shard, parts["json"])) if "json" in parts else {}
        media = next(e for e in parts if e not in ("txt", "json"))
        frames, fps = decode(self._read(shard, parts[media]), media, max(self.frame_counts))
        usable = [t for t in self.frame_counts if t <= frames.shape[0]] or [1]
        frames = frames[:usable[-1]]
        video = fit_to_bucket(frames, self.resolutions)
        return Sample(sample_id=i, video=video, caption=caption, fps=fps or meta.get("fps") or 8.0)


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


def fit_to_bucket(frames: torch.Tensor, resolutions: list[tuple[int, int]]) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, h, w] in [-1, 1] at the bucket of the nearest aspect ratio (resize to
    cover, centre crop)."""
    _, H, W, _ = frames.shape
    h, w = min(resolutions, key=lambda r: (abs(math.log((r[0] / r[1]) / (H / W))), -r[0] * r[1]))
    scale = max(h / H, w / W)
    nh, nw = max(h, round(H * scale)), max(w, round(W * scale))
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - h) // 2, (nw - w) // 2
    x = x[:, :, top:top + h, left:left + w]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()
