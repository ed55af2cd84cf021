"""`stdit data cache`: encode shards once into autoencoder latents and caption embeddings, for DiT training.

    stdit data cache --vae RUN_OR_PATH [--text-encoder PATH --text-kind t5|clip] SRC_SHARDS... OUT
                     [--recipe RECIPE] [--workers N] [key=value ...]

Samples are read exactly as training reads pixel shards (the recipe's data.resolutions, frame_counts, frame_stride,
target_fps), encoded with the autoencoder (scaled posterior means, tiled) and the text encoder (unpadded token
embeddings), and written to OUT/cache-XXXXXX.tar, one per source shard, with the same sample keys and order: a
safetensors member {latent [C, T, H, W], text [n, D]}, the caption (txt) and json (shape, fps, source). Train
from them with `data.source=shards data.shards=OUT/cache-*.tar data.cached=true`.

Resumable: a shard is written to a temporary name and renamed when complete; a rerun skips finished shards.
Parallel: --workers processes take the source shards round robin, each on its own GPU when there are GPUs.
OUT/cache.json records the autoencoder, the text encoder and the bucket settings, with a fingerprint of each
encoder (its config and a hash of its weights, `fingerprints`); a rerun checks they match, and so does training
(`check_fingerprints`): latents of another autoencoder or embeddings of another T5 are refused, not trained on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from queue import Empty

import torch
from tqdm import tqdm

from stdit.autoencoder import load_vae
from stdit.data.sample import Sample
from stdit.data.shards import ShardDataset, expand, read_member, tar_index
from stdit.device import resolve_device
from stdit.models.text import TextEncoder


def _settings(vae: str, cfg) -> dict:
    d = cfg.data
    return {"vae": str(Path(vae).resolve()), "text_encoder": cfg.text.path, "text_kind": cfg.text.kind,
            "text_max_length": cfg.text.max_length, "resolutions": [list(r) for r in d.resolutions],
            "frame_counts": list(d.frame_counts), "frame_stride": d.frame_stride, "target_fps": d.target_fps,
            "buckets": [list(b) for b in d.buckets], "allow_upscale": d.allow_upscale,
            "captions": str(Path(d.captions).resolve()) if d.captions else None}


def _encoders(settings: dict, text_cfg, device: torch.device):
    return load_vae(settings["vae"], device), TextEncoder.from_config(text_cfg).to(device)


# ----------------------------------------------------------------------------------------------------------
# Fingerprints of the encoders a cache was made with
# ----------------------------------------------------------------------------------------------------------

SAMPLED = 4096  # values hashed per tensor


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of every tensor's name, shape, dtype and SAMPLED evenly spaced values: any two differently trained
    (or seeded) models differ in it, and it costs milliseconds where hashing every byte of a T5-XXL (19 GB) would
    take most of a minute on every process of a run."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        values = flat[::max(1, flat.numel() // SAMPLED)][:SAMPLED].float().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(values.numpy().tobytes())
    return h.hexdigest()


def fingerprints(vae, text_encoder) -> dict:
    """What decides the cached tensors: the autoencoder's config, latent scaling and weights; the text encoder's
    config, tokenizer, caption length and weights."""
    config = {k: v for k, v in text_encoder.model.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures")}
    tokenizer = text_encoder.tokenizer
    found = {"vae_fingerprint": {"config": dataclasses.asdict(vae.cfg),
                                 "latent_scaling": [vae.latent_mean.tolist(), vae.latent_std.tolist()],
                                 "weights_sha256": weights_hash(vae)},
             "text_fingerprint": {"config": config, "tokenizer": [type(tokenizer).__name__, len(tokenizer)],
                                  "max_length": text_encoder.max_length,
                                  "weights_sha256": weights_hash(text_encoder.model)}}
    return json.loads(json.dumps(found, default=str))  # as cache.json holds it (lists, not tuples)


def check_fingerprints(shards: list[str | Path], vae, text_encoder) -> None:
    """The cache.json beside every cached shard must record the fingerprints of these encoders (model.vae, text.*);
    otherwise one line saying which encoder differs, in what, and what the cache was made with."""
    mine = fingerprints(vae, text_encoder)
    for folder in sorted({Path(s).parent for s in shards}):
        record = folder / "cache.json"
        if not record.is_file():
            raise ValueError(f"{folder} has no cache.json (written by `stdit data cache` beside its shards): keep it "
                             "with the shards; training checks the text encoder and autoencoder against it")
        settings = json.loads(record.read_text())["settings"]
        for key, what, config_key in (("vae_fingerprint", "autoencoder", "model.vae"),
                                      ("text_fingerprint", "text encoder", "text.path")):
            made = settings.get(key)
            if made is None:
                raise ValueError(f"{folder} was cached before encoder fingerprints were recorded; cache the shards "
                                 "again (`stdit data cache`) so training can check its encoders")
            if made != mine[key]:
                parts = sorted(k for k in mine[key] if made.get(k) != mine[key][k])
                used = settings["vae" if key == "vae_fingerprint" else "text_encoder"]
                raise ValueError(f"{folder} was cached with another {what} than {config_key} gives (differs in: "
                                 f"{', '.join(parts)}); set {config_key}={used} as its cache.json records, or cache "
                                 "again with this one")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@torch.no_grad()
def cache_shard(source: Path, out: Path, settings: dict, vae, text_encoder, progress: bool = True) -> dict:
    """Encode one source shard into `out` (written as out.tmp, then renamed); returns counts and skips."""
    from safetensors.torch import save
    data = ShardDataset([str(source)], settings["resolutions"], settings["frame_counts"], settings["frame_stride"],
                        settings["target_fps"], settings.get("buckets"), settings.get("allow_upscale", False),
                        settings.get("captions"))
    device = next(vae.parameters()).device
    tmp, written, skipped, pending = out.with_suffix(".tar.tmp"), 0, [], []

    def flush():  # the pending samples' captions in one text-encoder call (its fixed batch shape), then written
        texts = text_encoder.encode([s.caption for _, s, _ in pending])
        for (key, s, latent), text in zip(pending, texts):
            text = text.float().cpu().contiguous()
            meta = {"shape": list(latent.shape[1:]), "channels": latent.shape[0], "fps": s.fps,
                    "text_tokens": text.shape[0], "text_dim": text.shape[1], "source": f"{source.name}/{key}"}
            _add(tar, f"{key}.safetensors", save({"latent": latent, "text": text}))
            _add(tar, f"{key}.txt", s.caption.encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
        pending.clear()

    with tarfile.open(tmp, "w") as tar:
        for i in tqdm(range(len(data)), desc=source.name, disable=not progress, mininterval=1.0):
            key = data.keys[i]
            try:
                s = data[i]
            except Exception as e:  # a sample the prober passed but the decoder now rejects
                skipped.append({"shard": source.name, "key": key, "why": f"{type(e).__name__}: {e}"})
                continue
            latent = vae.encode(s.video[None].to(device), tiled=True)[0].float().cpu().contiguous()
            pending.append((key, s, latent))
            written += 1
            if len(pending) == text_encoder.BATCH:
                flush()
        if pending:
            flush()
    result = {"written": written, "skipped": skipped}
    out.with_suffix(".json").write_text(json.dumps(result))  # what this shard holds, kept across reruns
    os.replace(tmp, out)
    return result


def _worker(rank: int, workers: int, jobs: list[tuple[str, str]], settings: dict, text_cfg, device: str,
            results) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    if device == "cuda":
        dev = torch.device("cuda", rank % torch.cuda.device_count())
    else:
        dev = torch.device("cpu")
    vae, text_encoder = _encoders(settings, text_cfg, dev)
    for src, dst in jobs:
        cache_shard(Path(src), Path(dst), settings, vae, text_encoder, progress=rank == 0)
        results.put(src)


def cache(sources: list[str], out: str | Path, vae: str, cfg, workers: int = 1, device: str = "auto") -> dict:
    """Cache every source shard not cached yet into OUT; returns the summary written to OUT/cache.json."""
    out = Path(out)
    shards = expand(sources)
    names = [p.name for p in shards]
    if len(set(names)) != len(names):
        raise ValueError("source shards must have distinct file names (one cache shard each)")
    settings = _settings(vae, cfg)
    encoders = _encoders(settings, cfg.text, torch.device("cpu"))  # fingerprinted first: a rerun must match them
    settings.update(fingerprints(*encoders))
    out.mkdir(parents=True, exist_ok=True)
    record = out / "cache.json"
    if record.exists():
        before = json.loads(record.read_text())["settings"]
        if before != settings:
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            raise FileExistsError(f"{out} holds a cache made with other settings ({', '.join(changed)}); "
                                  "choose another OUT or remove it")
    else:
        record.write_text(json.dumps({"settings": settings, "shards": {}}, indent=1))
    todo = [(str(src), str(out / f"cache-{i:06d}.tar")) for i, src in enumerate(shards)
            if not (out / f"cache-{i:06d}.tar").exists()]
    done = len(shards) - len(todo)
    if done:
        print(f"{done} of {len(shards)} shards already cached in {out}; encoding the other {len(todo)}")
    device = resolve_device(device).type
    workers = max(1, min(workers, len(todo)))
    if workers == 1 and todo:
        vae_m, text_m = (e.to(device if device == "cpu" else "cuda") for e in encoders)
        for src, dst in todo:
            cache_shard(Path(src), Path(dst), settings, vae_m, text_m)
    elif todo:
        del encoders  # each worker loads its own
        ctx = torch.multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, workers, todo[r::workers], settings, cfg.text, device, queue))
                 for r in range(workers)]
        for p in procs:
            p.start()
        finished = 0
        while finished < len(todo):
            try:
                queue.get(timeout=5)
                finished += 1
            except Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or all(p.exitcode is not None for p in procs):
                    for p in procs:
                        p.terminate()
                    raise RuntimeError(f"cache workers stopped (exit codes {[p.exitcode for p in procs]}) with "
                                       f"{len(todo) - finished} shards left; finished shards are kept, rerun to "
                                       "encode the rest")
        for p in procs:
            p.join()
    summary = {"settings": settings, "shards": {}}
    for i, src in enumerate(shards):
        summary["shards"][src.name] = json.loads((out / f"cache-{i:06d}.json").read_text())
    record.write_text(json.dumps(summary, indent=1))
    return summary


class CachedDataset:
    """Samples of `stdit data cache` shards, by index: scaled latents and unpadded caption embeddings."""

    def __init__(self, patterns):
        self.entries = []  # (shard, {extension: (offset, size)}, meta)
        for shard in expand(patterns):
            for key, parts in tar_index(shard).items():
                if "safetensors" not in parts or "json" not in parts:
                    raise ValueError(f"{shard}: sample {key} has no latents (safetensors) or no json; is this a "
                                     "`stdit data cache` shard? Pixel shards need data.cached=false")
                self.entries.append((shard, parts, json.loads(read_member(shard, parts["json"]))))

    def __len__(self) -> int:
        return len(self.entries)

    def shape_of(self, i: int) -> tuple[int, int, int]:
        """(T, H, W) of sample i's latents."""
        return tuple(self.entries[i][2]["shape"])

    def __getitem__(self, i: int) -> Sample:
        from safetensors.torch import load
        shard, parts, meta = self.entries[i]
        tensors = load(read_member(shard, parts["safetensors"]))
        caption = read_member(shard, parts["txt"]).decode()
        return Sample(sample_id=i, video=tensors["latent"], caption=caption, fps=meta["fps"],
                      text=tensors["text"], latent=True)
