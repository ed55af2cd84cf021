"""`stdit data caption SHARDS... OUT --model PATH`: (re)caption the clips of shards with a local vision-language
model, for training on detailed synthetic captions.

Every clip of the shards (`stdit data shard` output) is decoded and --frames frames are taken evenly over it (an
image gives one). The model is a transformers image-text-to-text model in a local folder (AutoProcessor +
AutoModelForImageTextToText, local files only: nothing is downloaded). It is shown the frames as images (any
multi-image model: LLaVA-OneVision, Idefics3 / SmolVLM, Qwen2-VL, LLaVA) or as one video (--frames-as video, for
processors with a video processor, e.g. Qwen2-VL; transformers needs torchvision for those), then the prompt,
whose `{caption}` is replaced by the clip's own caption (to refine it rather than start over). --batch clips go
through each generate call (left-padded), on the GPU when there is one; --workers processes (one GPU each) share
the batches while this one writes every line. Greedy decoding by default; with --temperature > 0 each batch
samples from a generator seeded by (--seed, its first clip's position).

OUT/captions.jsonl holds one line per clip (in shard order with one worker): {"shard", "key", "caption" (the new
one), "original" (the shard's own), "source"}, plus "error" where the clip cannot be decoded (its caption stays
the original).
OUT/caption.json records the model and the settings. Resumable: a rerun into OUT continues after the clips
already written (a line cut off by the interruption is redone) and refuses other settings. Train on the new
captions with `data.captions=OUT/captions.jsonl`; without it the shards' own captions are used.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DEFAULT_PROMPT = ("Describe this video in detail, as one paragraph: the main subjects and how they look, what moves "
                  "and how, the setting and background, colours, lighting and camera motion.")


@dataclass
class CaptionSettings:
    """What the captions depend on (recorded in OUT/caption.json; a rerun must match), and the batch size."""

    prompt: str = DEFAULT_PROMPT
    frames: int = 8
    frames_as: str = "images"
    max_new_tokens: int = 160
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch: int = 4

    def check(self) -> None:
        """ValueError naming the option to change."""
        if self.frames < 1:
            raise ValueError(f"--frames must be >= 1, got {self.frames}")
        if self.frames_as not in ("images", "video"):
            raise ValueError(f"--frames-as must be images or video, got {self.frames_as!r}")
        if self.max_new_tokens < 1 or self.batch < 1:
            raise ValueError("--max-new-tokens and --batch must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"--temperature must be >= 0 and --top-p in (0, 1], got {self.temperature}, {self.top_p}")
        try:
            self.prompt.format(caption="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"the prompt may hold {{caption}} and no other {{...}} field ({e!r}); write {{{{ }}}} "
                             "for a literal brace") from None


def clips(patterns) -> list[tuple[Path, str, dict]]:
    """(shard, key, {extension: (offset, size)}) of every clip of the shards, in shard and key order."""
    from stdit.data.shards import expand, tar_index
    out = []
    for shard in expand(patterns):
        for key, parts in tar_index(shard, []).items():
            if "txt" in parts and "json" in parts and len(parts) >= 3:
                out.append((shard, key, parts))
    return out


def sample_frames(shard: Path, parts: dict, n: int) -> np.ndarray:
    """n frames (fewer if the clip has fewer) evenly spaced over a clip, first and last included: uint8 [n, H, W, 3].
    Frames are decoded in order and only the chosen ones kept, so a long clip never sits in memory whole."""
    import av

    from stdit.data.shards import decode, read_member
    media = next(e for e in parts if e not in ("txt", "json"))
    data = read_member(shard, parts[media])
    if media in ("jpg", "jpeg", "png"):
        return decode(data, media, 1)[0].numpy()
    total = int(json.loads(read_member(shard, parts["json"]))["frames"])
    pick = set(np.linspace(0, total - 1, min(n, total)).round().astype(int).tolist())
    out = []
    with av.open(io.BytesIO(data)) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i in pick:
                out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == len(pick):
                break
    if not out:
        raise ValueError("no decodable frames")
    return np.stack(out)


class Captioner:
    """A local vision-language model that writes one caption per clip (a list of frames)."""

    def __init__(self, path: str | Path, settings: CaptionSettings, device: str = "auto"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from stdit.device import resolve_device
        path = Path(path)
        self.name = model_name(path)
        self.settings, self.device = settings, resolve_device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
        except (ValueError, KeyError, ImportError, AttributeError) as e:  # not a VLM, or its processor needs more
            why = " ".join(str(e).split())[:300]
            raise ValueError(f"--model {path} cannot be loaded as a vision-language model with its processor "
                             f"({type(e).__name__}: {why}); see README, Models for captioning and prompt "
                             "expansion") from None
        if settings.frames_as == "video" and getattr(self.processor, "video_processor", None) is None:
            raise ValueError(f"--frames-as video: {path}'s processor takes no videos; use --frames-as images")
        self.model.to(self.device).eval()
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"  # generation continues every row from its last token

    def _text(self, n_frames: int, original: str) -> str:
        visual = [{"type": "video"}] if self.settings.frames_as == "video" else [{"type": "image"}] * n_frames
        content = visual + [{"type": "text", "text": self.settings.prompt.format(caption=original)}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)

    def __call__(self, batch: list[tuple[np.ndarray, str]], seed: int = 0) -> list[str]:
        """Captions of [(frames uint8 [n, H, W, 3], original caption)]."""
        import torch
        s = self.settings
        texts = [self._text(len(frames), original) for frames, original in batch]
        if s.frames_as == "video":
            media = {"videos": [frames for frames, _ in batch]}
        else:
            media = {"images": [list(frames) for frames, _ in batch]}
        inputs = self.processor(text=texts, padding=True, return_tensors="pt", **media).to(self.device)
        for key in ("pixel_values", "pixel_values_videos"):  # the model's dtype (bf16 on a GPU)
            if key in inputs:
                inputs[key] = inputs[key].to(self.model.dtype)
        sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p} if s.temperature > 0 else \
            {"do_sample": False}
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=s.max_new_tokens, **sampling)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]


def _done(path: Path) -> dict[tuple[str, str], dict]:
    """The records of captions.jsonl, the file cut back to its last complete line (an interrupted write)."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        path.write_bytes(whole)
    records = {}
    for n, line in enumerate(whole.decode("utf-8").splitlines()):
        try:
            row = json.loads(line)
            records[(row["shard"], row["key"])] = row
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}, line {n + 1} is not a caption record; remove that line (or the file) and "
                             "rerun") from None
    return records


def caption_batch(part: list[tuple[int, tuple]], captioner, settings: CaptionSettings) -> list[dict]:
    """The manifest rows of a batch of (position, (shard, key, parts)) clips: decoded, then captioned together."""
    from stdit.data.shards import read_member
    batch, rows = [], []
    for _, (shard, key, parts) in part:
        original = read_member(shard, parts["txt"]).decode("utf-8", "replace").strip()
        source = json.loads(read_member(shard, parts["json"])).get("source", "")
        rows.append({"shard": shard.name, "key": key, "caption": original, "original": original, "source": source})
        try:
            batch.append((sample_frames(shard, parts, settings.frames), original))
        except Exception as e:  # a damaged member: it keeps its caption, and the line says why
            rows[-1]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    texts = iter(captioner(batch, seed=settings.seed + part[0][0]) if batch else [])
    for row in rows:
        if "error" not in row:
            row["caption"] = next(texts)
    return rows


def _worker(rank: int, workers: int, model: str, settings: CaptionSettings, device: str, batches, queue) -> None:
    """One captioning process: its own copy of the model (its own GPU when there are GPUs), rows to `queue`."""
    import os

    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    if device == "cuda":
        device = f"cuda:{rank % torch.cuda.device_count()}"
    captioner = Captioner(model, settings, device)
    for part in batches:
        queue.put(caption_batch(part, captioner, settings))


def _in_workers(batches: list, model: str, settings: CaptionSettings, device: str, workers: int):
    """Rows of the batches, as `workers` processes finish them (batch b goes to process b % workers)."""
    from queue import Empty

    import torch
    ctx = torch.multiprocessing.get_context("spawn" if device == "cuda" else "fork")  # fork: no re-import on CPU
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, workers, str(model), settings, device, batches[r::workers], queue))
             for r in range(workers)]
    for proc in procs:
        proc.start()
    try:
        for _ in batches:
            while True:
                try:
                    yield queue.get(timeout=5)
                    break
                except Empty:
                    if any(proc.exitcode not in (None, 0) for proc in procs):
                        raise RuntimeError(f"caption workers stopped (exit codes {[p.exitcode for p in procs]}); "
                                           "what was written is kept: rerun to continue") from None
    except BaseException:  # a failed worker, or the caller stopped reading: stop the others too
        for proc in procs:
            proc.terminate()
        raise
    for proc in procs:
        proc.join()


def model_name(path: str | Path) -> dict:
    """What the output records of a model folder: its path, model type and architectures (from config.json)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: not a local transformers model folder (no config.json); "
                                "download the model beforehand (nothing is fetched at run time)")
    config = json.loads((path / "config.json").read_text())
    return {"path": str(path.resolve()), "model_type": config.get("model_type"),
            "architectures": list(config.get("architectures") or [])}


def caption(patterns, out: str | Path, model: str | Path, settings: CaptionSettings | None = None,
            device: str = "auto", progress: bool = True, captioner: Captioner | None = None,
            workers: int = 1) -> dict:
    """Caption every clip of the shards not captioned yet into OUT/captions.jsonl; returns OUT/caption.json's
    record (settings, model, counts). With `workers` > 1, that many processes caption batches in parallel (one
    GPU each when there are GPUs); this process writes every line."""
    from tqdm import tqdm

    from stdit.device import resolve_device
    settings = settings or CaptionSettings()
    settings.check()
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    out = Path(out)
    todo = clips(patterns)
    names = {shard.name for shard, _, _ in todo}
    if len(names) != len({shard for shard, _, _ in todo}):
        raise ValueError("the shards must have distinct file names (the manifest names a clip by shard file name "
                         "and key)")
    record = {"model": model_name(model), "settings": {k: v for k, v in asdict(settings).items() if k != "batch"}}
    out.mkdir(parents=True, exist_ok=True)
    manifest, record_path = out / "captions.jsonl", out / "caption.json"
    if record_path.exists():
        before = json.loads(record_path.read_text())
        changed = sorted(k for k in record["settings"] if before["settings"].get(k) != record["settings"][k])
        if changed or before["model"]["path"] != record["model"]["path"]:
            raise FileExistsError(f"{out} holds captions made with another model or settings "
                                  f"({', '.join(changed or ['model'])}); choose another OUT or remove it")
    done = _done(manifest)
    rest = [(i, c) for i, c in enumerate(todo) if (c[0].name, c[1]) not in done]
    batches = [rest[i:i + settings.batch] for i in range(0, len(rest), settings.batch)]
    workers = min(workers, len(batches))
    if workers > 1:
        results = _in_workers(batches, model, settings, resolve_device(device).type, workers)
    else:
        captioner = captioner or (Captioner(model, settings, device) if batches else None)
        results = (caption_batch(part, captioner, settings) for part in batches)
    record_path.write_text(json.dumps(record, indent=1))
    with open(manifest, "a", encoding="utf-8") as f, \
            tqdm(total=len(todo), initial=len(todo) - len(rest), desc="caption", disable=not progress,
                 mininterval=1.0) as bar:
        for rows in results:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
            f.flush()
            done.update(((row["shard"], row["key"]), row) for row in rows)
            bar.update(len(rows))
    errors = sum("error" in r for r in done.values())
    record.update(clips=len(todo), captioned=len(todo) - errors, errors=errors)
    record_path.write_text(json.dumps(record, indent=1))
    return record
