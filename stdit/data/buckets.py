"""Resolution buckets: which (height, width, frames) a real clip trains at.

`data.buckets` lists buckets as [height, width, frames] or [height, width, frames, weight]. A clip goes to the
largest bucket (most pixels x frames) that fits inside it at its aspect ratio:

  1. frames: the bucket's frame count is at most the clip's (after data.frame_stride / data.target_fps); an
     image (one frame) only fits buckets of 1 frame, a video may also go to a 1-frame bucket (its first frame);
  2. aspect ratio: of those, the buckets whose aspect ratio is nearest the clip's (several sizes of one aspect
     ratio coexist; portrait clips go to portrait buckets);
  3. size: resized to cover the bucket and centre-cropped, the clip is not enlarged (bucket height <= H and
     width <= W scaled alike). With data.allow_upscale, a clip smaller than every bucket of its aspect ratio
     goes to the smallest of them (enlarged); without it, it is left out and reported.

The weight (default 1, in (0, 1]) is the share of the clips reaching a bucket that stay in it; the others move
down to the next smaller bucket that fits them, and the smallest one that fits keeps them whatever its weight
(Open-Sora's keep probability: fewer clips at the costly sizes without dropping any). Which clips move is drawn
from a hash of the clip's name and the bucket, so it is the same on every process, layout and resume.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int
    frames: int
    weight: float = 1.0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(frames, height, width), as ShardDataset.shape_of returns it."""
        return self.frames, self.height, self.width

    def __str__(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"


def parse_buckets(spec) -> list[Bucket]:
    """Buckets from data.buckets entries; ValueError naming the first bad entry."""
    out = []
    for entry in spec:
        entry = [int(x) if float(x).is_integer() else float(x) for x in entry]  # as written (the config holds floats)
        if len(entry) not in (3, 4) or any(float(x) != int(x) or int(x) < 1 for x in entry[:3]):
            raise ValueError(f"entry {entry} must be [height, width, frames] or [height, width, frames, weight] "
                             "with positive integer sizes")
        weight = float(entry[3]) if len(entry) == 4 else 1.0
        if not 0 < weight <= 1:
            raise ValueError(f"entry {entry}: the weight must be in (0, 1], got {weight}")
        out.append(Bucket(int(entry[0]), int(entry[1]), int(entry[2]), weight))
    if len({b.shape for b in out}) != len(out):
        raise ValueError(f"{[str(b) for b in out]} lists a bucket twice")
    return out


def _draw(name: str, b: Bucket) -> float:
    """A number in [0, 1) fixed by the clip's name and the bucket."""
    return zlib.crc32(f"{name}/{b}".encode()) / 2 ** 32


def assign(height: int, width: int, frames: int, buckets: list[Bucket], allow_upscale: bool = False,
           name: str = "") -> tuple[Bucket | None, str]:
    """(the bucket of a clip of height x width and `frames` usable frames, or None and why it fits none)."""
    held = [b for b in buckets if b.frames <= frames]
    if not held:
        return None, f"{frames} frame(s) are fewer than every bucket's ({min(b.frames for b in buckets)} at least)"
    off = {b: abs(math.log((b.height / b.width) / (height / width))) for b in held}
    nearest = min(off.values())
    same_ratio = [b for b in held if off[b] <= nearest + 1e-9]
    fits = [b for b in same_ratio if max(b.height / height, b.width / width) <= 1 + 1e-9]
    if not fits:
        if not allow_upscale:
            smallest = min(same_ratio, key=lambda b: b.height * b.width)
            return None, (f"{height}x{width} is smaller than every bucket of its aspect ratio (the smallest is "
                          f"{smallest.height}x{smallest.width}); set data.allow_upscale=true or add a smaller bucket")
        area = min(b.height * b.width for b in same_ratio)
        fits = [b for b in same_ratio if b.height * b.width == area]
    fits.sort(key=lambda b: (-b.height * b.width * b.frames, -b.height * b.width, -b.frames))
    for b in fits[:-1]:
        if b.weight >= 1 or _draw(name, b) < b.weight:
            return b, ""
    return fits[-1], ""
