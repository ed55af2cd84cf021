"""`stdit data shard SRC OUT`: a folder of videos (and images) with captions -> webdataset tar shards.

Each file is probed with PyAV (every frame decoded: frame count, fps, size, duration, codec); what cannot be read
(corrupt, empty, no video stream, no caption) is skipped and reported, never fatal. Captions come from a `.txt`
beside each file (same stem) or from a manifest (CSV with `path,caption` columns, or JSONL with those keys; paths
relative to SRC); with `uncaptioned=True` (--uncaptioned) a file without one gets an empty caption, for
`stdit data caption` to write. A shard holds the original file bytes under its extension, the caption (`txt`)
and the probe (`json`); a new shard starts when `--shard-size` bytes are reached. OUT/summary.json lists what was
written and what was skipped and why.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from tqdm import tqdm

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def find_items(src: Path, manifest: Path | None = None, uncaptioned: bool = False
               ) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """([(media file, caption)], [(file, why skipped)]) from a folder walk with .txt captions (with `uncaptioned`,
    an empty caption where there is none), or a manifest."""
    items, skipped = [], []
    if manifest is not None:
        try:
            if manifest.suffix.lower() == ".jsonl":
                rows = []
                for n, line in enumerate(manifest.read_bytes().decode("utf-8").splitlines()):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{manifest}, line {n + 1}: not valid JSON ({e})") from None
            else:
                with open(manifest, newline="", encoding="utf-8") as f:
                    rows = list(csv.DictReader(f))
        except UnicodeDecodeError as e:
            raise ValueError(f"{manifest} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or "path" not in row or "caption" not in row:
                raise ValueError(f"{manifest}, row {i + 1}: needs `path` and `caption` (got "
                                 f"{sorted(row) if isinstance(row, dict) else type(row).__name__})")
            items.append((src / row["path"], str(row["caption"])))
        return items, skipped
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        if path.suffix.lower() not in VIDEO_EXTS + IMAGE_EXTS:
            continue
        caption = path.with_suffix(".txt")
        if not caption.is_file() and uncaptioned:
            items.append((path, ""))
            continue
        if not caption.is_file():
            skipped.append((str(path), f"no caption: expected {caption.name} beside it (or pass --manifest, or "
                                       "--uncaptioned to caption it with `stdit data caption`)"))
            continue
        try:
            items.append((path, caption.read_bytes().decode("utf-8").strip()))
        except UnicodeDecodeError as e:
            skipped.append((str(path), f"caption {caption} is not UTF-8 text (byte {e.start}: {e.reason}); "
                                       "save it as UTF-8"))
        except OSError as e:
            skipped.append((str(path), f"caption {caption} cannot be read ({e})"))
    return items, skipped


class ProbeError(ValueError):
    """Why a file cannot be used."""


def probe(path: Path) -> dict:
    """Frames, fps, height, width, duration and codec of a video or image file; ProbeError says why not."""
    if not path.is_file():
        raise ProbeError("file not found")
    if path.stat().st_size == 0:
        raise ProbeError("empty file")
    if path.suffix.lower() in IMAGE_EXTS:
        from PIL import Image
        try:
            with Image.open(path) as im:
                im.load()
                w, h = im.size
        except Exception as e:
            raise ProbeError(f"not a readable image ({e})") from None
        return {"frames": 1, "fps": 0.0, "height": h, "width": w, "duration": 0.0, "codec": "image"}
    import av
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ProbeError("no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames, size = 0, None
            for frame in container.decode(stream):
                frames += 1
                size = (frame.height, frame.width)
            codec = stream.codec_context.name
    except ProbeError:
        raise
    except Exception as e:  # PyAV raises many error types (some are ValueErrors) for corrupt input
        raise ProbeError(f"cannot be decoded ({type(e).__name__}: {e})") from None
    if frames == 0:
        raise ProbeError("no decodable frames")
    return {"frames": frames, "fps": fps, "height": size[0], "width": size[1],
            "duration": frames / fps if fps else 0.0, "codec": codec}


def shard(src: str | Path, out: str | Path, manifest: str | Path | None = None, shard_size: float = 1e9,
          progress: bool = True, uncaptioned: bool = False) -> dict:
    """Write OUT/shard-%06d.tar and OUT/summary.json; return the summary."""
    import webdataset as wds
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    if out.exists() and any(out.glob("shard-*.tar")):
        raise FileExistsError(f"{out} already holds shards; choose another OUT or remove them")
    out.mkdir(parents=True, exist_ok=True)
    items, skipped = find_items(src, Path(manifest) if manifest else None, uncaptioned)
    written, key = [], 0
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxsize=shard_size, maxcount=10 ** 9, verbose=0) as sink:
        for path, caption in tqdm(items, desc="shard", disable=not progress, mininterval=1.0):
            try:
                meta = probe(path)
            except ProbeError as e:
                skipped.append((str(path), str(e)))
                continue
            meta["source"] = str(path.relative_to(src)) if path.is_relative_to(src) else str(path)
            sink.write({"__key__": f"{key:09d}", path.suffix.lower().lstrip("."): path.read_bytes(),
                        "txt": caption, "json": meta})
            written.append(meta)
            key += 1
    shards = sorted(p.name for p in out.glob("shard-*.tar"))
    summary = {"written": len(written), "shards": shards, "frames": sum(m["frames"] for m in written),
               "skipped": [{"file": f, "why": why} for f, why in skipped]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
