"""Reading the tar shards `stdit data shard` writes (stdit/data/ingest.py), as a random-access dataset.

Opening the shards builds an index (shard, member offset and size of each sample's media, caption and probe)
from the tar headers alone, so sample i is one seek and one decode, and the StepSampler's epoch permutations and
stream positions (stdit/data/loader.py: exact resume on any layout) apply to real data as to the synthetic clips.

A sample is decoded with PyAV (Pillow for images); every k-th frame is kept (k = data.frame_stride, or the
source fps / data.target_fps rounded, at least 1); the first frames are cut to the largest of
`data.frame_counts` the clip holds (an image is one frame); then resized to cover and centre-cropped to the
entry of `data.resolutions` whose aspect ratio is nearest its own (portrait clips go to portrait buckets).
With `data.buckets` the (height, width, frames) of a clip is its bucket instead (stdit/data/buckets.py: the
largest that fits inside it at its aspect ratio); clips that fit none are left out, counted in `unplaced`.
The shape a sample will have is known from the index (the probe) without decoding: shape_of(i).
With `data.captions` (a manifest written by `stdit data caption`) a clip's caption is the manifest's, not its
shard's.

Bad data does not stop training. A sample whose probe cannot be read (a member cut off by a truncated shard, or
garbage) is left out of the index, and a shard that is not a tar at all is left out whole, each reported on
stderr with the shard and byte offset (`dropped`). A sample whose media cannot be decoded (truncated, empty or
corrupt member) is replaced by a substitute: the next sample in dataset order with the same shape that decodes,
so the step's plan (its packing and loss normaliser) stays valid and every layout, worker count and resume sees
the same substitute. It keeps the planned sample id (its noise draws) and carries `bad` (shard, key, offset,
why, substitute) for the trainer to count; the trainer stops when more than data.max_bad_fraction was bad.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stdit.data.buckets import assign, parse_buckets
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


def tar_index(shard: Path, problems: list | None = None) -> dict[str, dict[str, tuple[int, int]]]:
    """{sample key: {extension: (data offset, size)}} of a tar shard, from its headers alone, keys sorted.
    With `problems` (a list), a shard that cannot be read as a tar is reported there as (shard, key, offset, why)
    and gives no samples, and members cut off by the end of the file are reported (their samples stay: reading
    them fails and they are substituted); without it such a shard raises a ValueError naming it."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        size = Path(shard).stat().st_size
        tar = tarfile.open(shard)
    except (tarfile.TarError, OSError, EOFError) as e:
        if problems is None:
            raise ValueError(f"{shard} cannot be read as a tar shard ({type(e).__name__}: {e})") from None
        problems.append((shard, "*", 0, f"not a readable tar shard ({type(e).__name__}: {e}); all of it skipped"))
        return {}
    with tar:
        try:
            tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:  # truncated: the headers read so far stand
            if problems is None:
                raise ValueError(f"{shard} is truncated or damaged after {len(tar.members)} members "
                                 f"({type(e).__name__}: {e})") from None
        for m in tar.members:
            key, _, ext = m.name.partition(".")
            groups.setdefault(key, {})[ext] = (m.offset_data, m.size)
            if m.offset_data + m.size > size and problems is not None:
                problems.append((shard, key, m.offset_data, f"member {m.name} is cut off at byte {size} "
                                 f"(the shard is truncated; {m.size} bytes from byte {m.offset_data} expected)"))
    return dict(sorted(groups.items()))


def read_member(shard: Path, where: tuple[int, int]) -> bytes:
    """The bytes of one tar member at (data offset, size); an error if the shard ends before them."""
    with open(shard, "rb") as f:
        f.seek(where[0])
        data = f.read(where[1])
    if len(data) != where[1]:
        raise EOFError(f"the shard ends {where[1] - len(data)} bytes into this member (truncated)")
    return data


class ShardDataset:
    """Samples of webdataset tar shards, by index."""

    def __init__(self, patterns, resolutions, frame_counts, frame_stride: int = 1, target_fps: float = 0.0,
                 buckets=None, allow_upscale: bool = False, captions: str | Path | None = None):
        self.resolutions = [tuple(int(x) for x in r) for r in resolutions]
        self.frame_counts = sorted(int(t) for t in frame_counts)
        self.frame_stride, self.target_fps = int(frame_stride), float(target_fps)
        self.buckets, self.allow_upscale = parse_buckets(buckets or []), bool(allow_upscale)
        self.entries, self.keys = [], []  # (shard, {extension: (offset, size)}, probe); the samples' tar keys
        self.shapes: list[tuple[int, int, int]] = []  # (T, H, W) of each sample as read
        self.dropped: list[tuple] = []  # (shard, key, offset, why) of what could not be indexed
        self.unplaced: list[tuple] = []  # (shard, key, why) of clips that fit no bucket of data.buckets
        self._substitutes: dict[int, int] = {}
        cut: list[tuple] = []
        for shard in expand(patterns):
            for key, parts in tar_index(shard, cut).items():
                if "txt" in parts and "json" in parts and len(parts) >= 3:
                    try:
                        probe = json.loads(read_member(shard, parts["json"]))
                        shape = (int(probe["frames"]), int(probe["height"]), int(probe["width"]))
                        if min(shape) < 1:
                            raise ValueError(f"frames, height, width {shape} must be >= 1")
                    except Exception as e:
                        self.dropped.append((shard, key, parts["json"][0], f"its probe ({key}.json) cannot be read "
                                             f"({type(e).__name__}: {e}); left out"))
                        continue
                    placed, why = self._place(probe, f"{Path(shard).name}/{key}")
                    if placed is None:
                        self.unplaced.append((shard, key, why))
                        continue
                    self.entries.append((shard, parts, probe))
                    self.keys.append(key)
                    self.shapes.append(placed)
        self.dropped += [c for c in cut if c[1] == "*"]
        for shard, key, offset, why in cut + [d for d in self.dropped if d not in cut]:
            print(f"data: {shard} sample {key} (byte {offset}): {why}", file=sys.stderr)
        if self.unplaced:
            shard, key, why = self.unplaced[0]
            print(f"data: {len(self.unplaced)} clips fit no bucket of data.buckets and are left out (first: "
                  f"{Path(shard).name} sample {key}: {why})", file=sys.stderr)
        self.captions = load_captions(captions, self) if captions else None

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

    def _place(self, probe: dict, name: str) -> tuple[tuple[int, int, int] | None, str]:
        """((T, H, W) a clip is read at, or None and why it fits no bucket), from its probe alone."""
        H, W = int(probe["height"]), int(probe["width"])
        if not self.buckets:
            return (self._frames(probe), *bucket(H, W, self.resolutions)), ""
        held = 1 + (int(probe["frames"]) - 1) // self.stride(probe.get("fps", 0.0))
        chosen, why = assign(H, W, held, self.buckets, self.allow_upscale, name)
        return (chosen.shape if chosen else None), why

    def shape_of(self, i: int) -> tuple[int, int, int]:
        """(T, H, W) of sample i as __getitem__ returns it, from the probe alone."""
        return self.shapes[i]

    def __getitem__(self, i: int) -> Sample:
        """Sample i, or (when it cannot be read) its substitute under id i, with `bad` saying what happened."""
        try:
            return self._read(i)
        except Exception as e:  # PyAV, Pillow, tar and UTF-8 errors of a damaged member
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        shard, parts, _ = self.entries[i]
        media = next(e for e in parts if e not in ("txt", "json"))
        j = self.substitute(i)
        first = i not in self._substitutes
        self._substitutes[i] = j
        if first:
            print(f"data: {shard.name} sample {self.keys[i]} (member {self.keys[i]}.{media} at byte "
                  f"{parts[media][0]}) cannot be read ({why}); using sample {self.keys[j]} of the same shape "
                  "instead", file=sys.stderr)
        sample = dataclasses.replace(self._read(j), sample_id=i)
        sample.bad = {"id": i, "shard": shard.name, "key": self.keys[i], "offset": parts[media][0], "why": why,
                      "substitute": j}
        return sample

    def substitute(self, i: int) -> int:
        """The next sample after i (in dataset order, wrapping) of the same shape that can be read."""
        if i in self._substitutes:
            return self._substitutes[i]
        shape = self.shape_of(i)
        for k in range(1, len(self)):
            j = (i + k) % len(self)
            if self.shape_of(j) == shape:
                try:
                    self._read(j)
                    return j
                except Exception:
                    continue
        raise ValueError(f"{self.entries[i][0]} sample {self.keys[i]} cannot be read and no other sample of its "
                         f"shape {shape} can stand in for it")

    def _read(self, i: int) -> Sample:
        shard, parts, probe = self.entries[i]
        if self.captions is not None:
            caption = self.captions[(shard.name, self.keys[i])]
        else:
            caption = read_member(shard, parts["txt"]).decode().strip()
        media = next(e for e in parts if e not in ("txt", "json"))
        k, (t, h, w) = self.stride(probe.get("fps", 0.0)), self.shapes[i]
        frames, fps = decode(read_member(shard, parts[media]), media, 1 + (t - 1) * k)
        frames = frames[::k][:t]
        if frames.shape[0] != t:
            raise ValueError(f"{shard} sample {i}: decoded {frames.shape[0]} frames, its probe promised {t}")
        video = fit(frames, h, w)
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
    return fit(frames, *bucket(H, W, resolutions))


def fit(frames: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, h, w] in [-1, 1]: resized to cover h x w, centre-cropped."""
    _, H, W, _ = frames.shape
    scale = max(h / H, w / W)
    nh, nw = max(h, round(H * scale)), max(w, round(W * scale))
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - h) // 2, (nw - w) // 2
    x = x[:, :, top:top + h, left:left + w]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


def load_captions(path: str | Path, dataset: ShardDataset) -> dict[tuple[str, str], str]:
    """{(shard file name, key): caption} of a caption manifest (`stdit data caption`'s captions.jsonl) for every
    sample of `dataset`; a clip the manifest lacks, or a shard name given twice, is an error naming what to do."""
    from stdit.config import ConfigError
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.captions={path}: no caption manifest there (write one with `stdit data "
                                "caption SHARDS... OUT --model PATH`: OUT/captions.jsonl)")
    names = {shard.name: shard for shard, _, _ in dataset.entries}
    if len(names) != len({shard for shard, _, _ in dataset.entries}):
        raise ConfigError("data.captions: data.shards holds two shards of the same file name; a caption manifest "
                          "names clips by shard file name and key, so give each shard a distinct name")
    captions = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        try:
            row = json.loads(line)
            captions[(row["shard"], row["key"])] = str(row["caption"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"data.captions={path}, line {n + 1}: not a caption record ({type(e).__name__}: {e}); "
                              "rerun `stdit data caption` into that folder to repair it") from None
    missing = [(shard.name, key) for (shard, _, _), key in zip(dataset.entries, dataset.keys)
               if (shard.name, key) not in captions]
    if missing:
        raise ConfigError(f"data.captions={path} has no caption for {len(missing)} of {len(dataset)} clips (first: "
                          f"{missing[0][0]} sample {missing[0][1]}); run `stdit data caption` on these shards into "
                          "the same folder (it continues where it stopped)")
    return captions
