"""`stdit eval`: does a model trained on the synthetic world (stdit/data/synthetic.py) follow its prompts and its
given frames, in every generation mode and over long videos?

Every synthetic clip is one shape of one palette colour moving one way (or out and back) over a background of
another palette colour, so a caption can be checked from pixels alone: no learned metric, nothing that could share
the model's mistakes. `measure` (stdit/eval_measure.py) reads background colour, object colour, shape and motion off
a clip; `evaluate` generates clips from held-out captions in each mode of MODES and scores them against their
captions:

- short modes (t2v, t2i, i2v, extend_forward, extend_backward, loop, connect, keyframes, edit): the given frames come
  from a real held-out clip of the caption at their own times (stdit.conditioning.mode_givens + condition_for, so
  in latent space exactly as `stdit generate` gives them); only generated frames are scored; conditioned modes add
  `kept` (max abs error on given frames), the boundary jump ratio (change across given/generated boundaries over
  the typical change between generated frames) and, for loop, the closure ratio (last -> first frame over typical;
  asked of round trips where the run's world has them, data.round_trips);
- long modes (long_autoregressive, long_long_range, long_hierarchical): videos of 2x, 4x, 8x the training window by
  stdit.longvideo.generate_long, every window-long chunk scored on its own.

The report is stdit/eval_report.py. The measurement is validated on the dataset's own clips (tests/test_eval.py):
~100% with their captions, chance with shuffled ones; the condition metrics on constructed clips.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from stdit.conditioning import condition_for, mode_givens
from stdit.data.synthetic import SyntheticClips
from stdit.eval_measure import CHANCE, accuracies, check, condition_metrics, loop_closure, parse_caption, score_clip
from stdit.longvideo import SCHEMES

# ---------------------------------------------------------------------------------------------------- the modes

MODES = {
    "t2v": "text to video: nothing given",
    "t2i": "text to image: one frame, nothing given",
    "i2v": "image to video: the held-out clip's first frame given at frame 0",
    "extend_forward": "the last k frames of a clip (one that ends where the held-out clip starts) begin the output",
    "extend_backward": "the first k frames of a clip (one that starts where the held-out clip ends) end the output",
    "loop": "the clip's first frame given at frame 0 and one frame past the end (the end leads into the start); "
            "clips that go out and back where the world has them (data.round_trips)",
    "connect": "clip A's last k frames start the output, clip B's first k frames end it (A ends where the held-out "
               "clip starts, B starts where it ends: two clips of the same caption)",
    "keyframes": "2 frames of the held-out clip given at their own times (T/4 and 3T/4)",
    "edit": "SDEdit: a real clip of a different caption (every attribute differs) noised to --strength, sampled "
            "with the prompt",
    **{f"long_{s}": f"long videos by the {s} FDM schedule (stdit/longvideo.py) at --long-factors x the training "
                    f"window; every window-long chunk scored" for s in SCHEMES},
}
DEFAULT_MODES = ("t2v", "t2i", "i2v")
LONG_FACTORS = (2, 4, 8)
JUMP_TARGET = 1.5  # issue 13: boundary jumps and loop closure at most 1.5x the typical frame-to-frame change


def expand_modes(modes) -> list[str]:
    """Mode names, `all` expanded to every mode (in MODES order), duplicates dropped; ValueError names unknown
    ones."""
    names = []
    for m in modes:
        for name in (MODES if m == "all" else [m]):
            if name not in names:
                names.append(name)
    unknown = [m for m in names if m not in MODES]
    if unknown or not names:
        raise ValueError(f"unknown mode(s) {', '.join(unknown) or '(none given)'}; choose from all, "
                         f"{', '.join(MODES)}")
    return names


def training_window(cfg, time_factor: int = 1) -> int:
    """Token frames of the run's longest training sample: the longest of data.frame_counts after the autoencoder's
    time compression and the temporal patch, cut to data.window where that is set (nonzero)."""
    pt = cfg.model.patch_size[0]
    longest = max((1 + (t - 1) // time_factor) // pt for t in cfg.data.frame_counts)
    window = int(getattr(cfg.data, "window", 0) or 0)
    return min(window, longest) if window else longest


def _pixels(tokens: int, patch_t: int, time_factor: int) -> int:
    """Pixel frames behind the first `tokens` token frames of a clip (or a chunk encoded on its own)."""
    return 1 + (tokens * patch_t - 1) * time_factor


def clip_frames(cfg, time_factor: int = 1) -> int:
    """Pixel frames of the held-out clips of the short modes: the run's longest frame count, cut to data.window's
    pixel length where the run trains on windows of longer clips."""
    t = max(cfg.data.frame_counts)
    if int(getattr(cfg.data, "window", 0) or 0):
        t = min(t, _pixels(training_window(cfg, time_factor), cfg.model.patch_size[0], time_factor))
    return t


def held_out_clips(cfg, n: int, seed: int, frames: int, round_trips: float | None = None) -> list:
    """n synthetic clips (caption + real video) of `frames` frames at the run's resolutions, round trips among them
    as in the run's world (data.round_trips) unless `round_trips` says otherwise. Their generator key
    `eval{seed}/{i}` is disjoint from training's `{run.seed}/{i}`, so none is a training clip (a caption may still
    recur: the world has only 1440 one-way ones); every mode draws the same captions."""
    round_trips = cfg.data.round_trips if round_trips is None else round_trips
    data = SyntheticClips(n, cfg.data.resolutions, [frames], cfg.data.fps_choices, seed=f"eval{seed}",
                          round_trips=round_trips, round_trip_frames=cfg.data.window)
    return [data[i] for i in range(n)]


def mode_clips(cfg, mode: str, n: int, seed: int, frames: int) -> list:
    """A mode's held-out clips: stills for t2i; round trips only for a loop where the run's world has them (a
    one-way motion cannot close on itself); one-way clips only for long videos (every chunk moves)."""
    trips = 0.0 if mode.startswith("long_") else 1.0 if mode == "loop" and cfg.data.round_trips > 0 else None
    return held_out_clips(cfg, n, seed, 1 if mode == "t2i" else frames, trips)


def edit_source(clip, seed: int, i: int):
    """A synthetic clip of clip's size whose caption differs from clip's in every attribute (background, object
    colour, shape, direction): what `edit` starts from, so whatever the output gets right came from the prompt."""
    want = parse_caption(clip.caption)
    _, t, h, w = clip.video.shape
    data = SyntheticClips(1000, [(h, w)], [t], [clip.fps], seed=f"eval{seed}-edit/{i}")
    for j in range(len(data)):
        got = parse_caption(data[j].caption)
        if all(got[k] != want[k] for k in want if want[k] is not None):
            return data[j]
    raise RuntimeError(f"no synthetic clip differs from {clip.caption!r} in every attribute")  # ~half of them do


@dataclass
class Case:
    """One clip to generate and score. clip: the held-out clip [3, T, H, W]; its frames at the output's given
    positions are the given frames (the reference of `kept`). frames: pixel frames sampled (loop: T + time factor;
    the extra ones are dropped). condition: condition_for's (clean video in the model's space, bool token-frame
    mask) or None. given: bool [T] output frames given (not scored) or None. edit: the pixel clip to edit, source:
    its caption. prompt: what the model is given instead of the caption (an expanded prompt), or None."""

    caption: str
    clip: torch.Tensor
    frames: int
    condition: tuple | None = None
    given: torch.Tensor | None = None
    edit: torch.Tensor | None = None
    source: str | None = None
    prompt: str | None = None


def mode_case(mode: str, clip, cfg, vae=None, seed: int = 0, index: int = 0) -> Case:
    """The Case of a short mode for one held-out clip, its given frames chosen by stdit.conditioning.mode_givens
    and mapped to the model's space by condition_for (latent frames with an autoencoder). Extension and connect
    give k pixel frames (those of a quarter of the token frames, at least one); ValueError where the run cannot
    do the mode (clip too short, temporal patch too long for single given frames, causal model given later
    frames)."""
    video = clip.video
    t, h, w = video.shape[1:]
    ft, pt = (vae.time_factor if vae is not None else 1), cfg.model.patch_size[0]
    if mode != "t2i" and t == 1:
        raise ValueError("the run trains on single frames only (data.frame_counts); evaluate it with --modes t2i")
    tokens = (1 + (t - 1) // ft) // pt
    k = _pixels(max(1, tokens // 4), pt, ft)
    inputs = {}
    if mode == "i2v":
        inputs = {"image": video[:, :_pixels(1, pt, ft)]}  # the first token frame's pixels (one frame when pt = 1)
    elif mode == "loop":
        inputs = {"image": video[:, :1]}
    elif mode == "extend_forward":  # the last k frames of a clip that ends with the held-out clip's first k
        inputs = {"clip": video[:, :k], "k": k}
    elif mode == "extend_backward":  # the first k frames of a clip that starts with the held-out clip's last k
        inputs = {"clip": video[:, t - k:], "k": k}
    elif mode == "connect":
        inputs = {"clip": video[:, :k], "clip_b": video[:, t - k:], "k": k}
    elif mode == "keyframes":
        times = sorted({(t * q // 4) // ft * ft for q in (1, 3)})
        if len(times) < 2:
            raise ValueError(f"clips of {t} frames have no room for 2 keyframes")
        inputs = {"keyframes": [(video[:, a:a + 1], a) for a in times]}
    givens, frames = mode_givens("t2v" if mode == "t2i" else mode, t, ft, **inputs)
    condition = condition_for(givens, (frames, h, w), cfg.model.patch_size, vae)
    given = None
    if givens:
        given = torch.zeros(t, dtype=torch.bool)
        for g in givens:
            given[g.at:g.at + g.frames.shape[1]] = True  # frames past the output (loop's closing one) drop out
        mask = condition[1]
        if cfg.model.temporal_causal and mask[int((~mask).nonzero()[0]):].any():
            raise ValueError(f"mode {mode} gives frames after generated ones, but the model is causal in time "
                             "(model.temporal_causal=true)")
    if mode != "edit":
        return Case(clip.caption, video, frames, condition, given)
    source = edit_source(clip, seed, index)
    return Case(clip.caption, video, frames, edit=source.video, source=source.caption)


@torch.no_grad()
def generate(model, text_encoder, cfg, cases: list[Case], vae=None, seed: int = 0, steps=None, cfg_scale=None,
             batch: int = 8, strength: float = 0.7, progress=None) -> list[torch.Tensor]:
    """Pixel clips [3, T, H, W] for the cases, `batch` per sample_videos call (their conditions and edits
    packed together); edits start at noise level `strength`."""
    from stdit.diffusion.sampler import sample_videos
    from stdit.grid import latent_shape
    factors = (1, 1) if vae is None else (vae.time_factor, vae.space_factor)
    device = None if vae is None else next(vae.parameters()).device
    videos = []
    for start in range(0, len(cases), batch):
        part = cases[start:start + batch]
        edits = [None if c.edit is None else c.edit if vae is None else
                 vae.encode(c.edit[None].to(device), tiled=True)[0].cpu() for c in part]
        edited = any(e is not None for e in edits)
        out = sample_videos(model, text_encoder, [c.prompt or c.caption for c in part],
                            [latent_shape((c.frames, *c.clip.shape[2:]), factors) for c in part], cfg.model,
                            cfg.diffusion, seed=seed + start, fps=cfg.data.fps_choices[0], steps=steps,
                            cfg_scale=cfg_scale, progress=progress, conditions=[c.condition for c in part],
                            edits=edits if edited else None, strength=strength if edited else 1.0)
        if vae is not None:
            out = [vae.decode(v[None].to(device), tiled=True)[0].cpu() for v in out]
        videos += [v[:, :c.clip.shape[1]] for v, c in zip(out, part)]
    return videos


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def score_mode(cases: list[Case], videos, mode: str = "") -> dict:
    """{n, accuracy, chance, clips} of one short mode; conditioned modes add kept_max_abs_error, jump_ratio_median
    and jump_within_target (fraction of clips whose jump ratio is at most JUMP_TARGET), loop closure_ratio_median
    and closure_within_target, edit source_accuracy (how often the output still shows the edited clip's own
    attributes instead of the prompt's)."""
    records, sources = [], []
    for c, v in zip(cases, videos):
        r = score_clip(v, c.caption, c.given)  # given frames are the real clip's: only generated frames are scored
        if c.prompt is not None:
            r["prompt"] = c.prompt
        if c.given is not None:
            r.update(condition_metrics(v, c.clip, c.given), given_frames=c.given.nonzero().flatten().tolist())
        if mode == "loop":
            r.update(loop_closure(v, c.given))
        if c.source is not None:
            r["source"] = c.source
            sources.append(check(r, c.source))
        records.append(r)
    result = {"n": len(records), "accuracy": accuracies(records), "chance": CHANCE, "clips": records}
    if any(c.given is not None for c in cases):
        ratios = [r["jump_ratio"] for r in records if r.get("jump_ratio") is not None]
        result["kept_max_abs_error"] = max(r["kept"] for r in records)
        result["jump_ratio_median"] = _median(ratios)
        result["jump_within_target"] = sum(x <= JUMP_TARGET for x in ratios) / len(ratios) if ratios else None
    if mode == "loop":
        ratios = [r["closure_ratio"] for r in records if r["closure_ratio"] is not None]
        result["closure_ratio_median"] = _median(ratios)
        result["closure_within_target"] = sum(x <= JUMP_TARGET for x in ratios) / len(ratios) if ratios else None
    if sources:
        result["source_accuracy"] = accuracies(sources)
    return result


# ----------------------------------------------------------------------------------------------- long videos

def chunk_spans(length: int, window: int, time_factor: int = 1) -> list[tuple[int, int]]:
    """[start, end) pixel frames of each chunk of `window` model frames of a `length`-frame video in the model's
    space (the last chunk may be shorter). Latent frame 0 is pixel frame 0, latent m >= 1 pixel frames
    ft(m-1)+1 .. ft m."""
    spans = []
    for m0 in range(0, length, window):
        m1 = min(length, m0 + window)
        spans.append((0 if m0 == 0 else time_factor * (m0 - 1) + 1, time_factor * (m1 - 1) + 1))
    return spans


def score_long(video: torch.Tensor, caption: str, spans: list[tuple[int, int]]) -> dict:
    """A long clip scored chunk by chunk (each span read on its own): {caption, chunks (check records), right
    (per chunk: background, object colour and shape all right), all_right}."""
    chunks = []
    for a, b in spans:
        r = score_clip(video[:, a:b], caption)
        r.pop("expected")
        chunks.append(r)
    right = [bool(r["bg_ok"] and r["fg_ok"] and r["shape_ok"]) for r in chunks]
    return {"caption": caption, "spans": [list(s) for s in spans], "chunks": chunks, "right": right,
            "all_right": all(right)}


def score_long_mode(captions: list[str], videos, spans) -> dict:
    """{n, chunks, accuracy (over every chunk of every clip), whole_length (fraction of clips whose every chunk
    shows the right background, object colour and shape), right_by_chunk (that fraction per chunk position),
    clips}."""
    records = [score_long(v, c, spans) for c, v in zip(captions, videos)]
    chunks = [r for rec in records for r in rec["chunks"]]
    return {"n": len(records), "chunks": len(spans), "accuracy": accuracies(chunks), "chance": CHANCE,
            "whole_length": sum(r["all_right"] for r in records) / len(records),
            "right_by_chunk": [sum(r["right"][j] for r in records) / len(records) for j in range(len(spans))],
            "clips": records}


def check_long(cfg, scheme: str, length: int, window: int) -> None:
    """ValueError where the run cannot make long videos by `scheme` (what generate_long would refuse)."""
    from stdit.longvideo import schedule
    if cfg.model.patch_size[0] != 1:
        raise ValueError(f"long videos need temporal patch 1, model.patch_size is {list(cfg.model.patch_size)}")
    stages = schedule(scheme, length, window)
    if cfg.model.temporal_causal and any(s.given and max(s.given) > min(s.generate) for s in stages):
        raise ValueError(f"the {scheme} scheme gives frames after generated ones, but the model is causal in time "
                         "(model.temporal_causal=true)")


@torch.no_grad()
def generate_long_clips(model, text_encoder, cfg, captions: list[str], hws: list[tuple[int, int]], scheme: str,
                        length: int, window: int, vae=None, seed: int = 0, steps=None, cfg_scale=None,
                        progress=None) -> list[torch.Tensor]:
    """Pixel clips of `length` model frames per (caption, (H, W) pixels), one prompt over the whole length, by
    stdit.longvideo.generate_long; clip i uses seed + i whatever the scheme, so schemes are compared on equal
    noise."""
    from stdit.longvideo import generate_long
    fs = 1 if vae is None else vae.space_factor
    videos = []
    for i, (caption, (h, w)) in enumerate(zip(captions, hws)):
        v = generate_long(model, text_encoder, [caption], length, (h // fs, w // fs), window, scheme,
                          cfg.model, cfg.diffusion, seed=seed + i, fps=cfg.data.fps_choices[0], steps=steps,
                          cfg_scale=cfg_scale, progress=progress)
        if vae is not None:
            v = vae.decode(v[None].to(next(vae.parameters()).device), tiled=True)[0].cpu()
        videos.append(v)
    return videos


# ------------------------------------------------------------------------------------------------- the command

def evaluate(run, out, n: int = 16, modes=DEFAULT_MODES, seed: int = 0, steps: int | None = None,
             cfg_scale: float | None = None, device: str = "auto", weights: str = "ema", batch: int = 8,
             progress: bool = False, long_n: int = 4, long_factors=LONG_FACTORS, strength: float = 0.7,
             expand_prompt: str | None = None, overrides=()) -> dict:
    """Generate n held-out clips per short mode (long_n per long-video scheme and length) with a run's weights,
    score them, write the report into `out` (results.json, results.md, contact_*.png, report.html, tb/) and return
    the results. A mode the run cannot do (e.g. later given frames for a causal model) is listed under `skipped`
    with the reason. With `expand_prompt` (a local instruct model) each short mode also runs on its captions
    expanded in the style of the run's training captions (stdit/prompt.py), scored against the same captions, as
    mode `NAME+expanded`. `overrides` (key=value) change the run's sampling settings, e.g.
    diffusion.cfg_scale_given=1."""
    from tqdm import tqdm

    from stdit.eval_report import write_report
    from stdit.generate import find_checkpoint, load_for_generation
    from stdit.longvideo import schedule
    modes = expand_modes(modes)
    if n < 1 or long_n < 1:
        raise ValueError(f"n and long_n must be >= 1, got {n} and {long_n}")
    long_factors = sorted({int(f) for f in long_factors})
    if not long_factors or long_factors[0] < 1:
        raise ValueError(f"long factors must be positive integers, got {long_factors}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    ckpt = find_checkpoint(Path(run))
    model, text_encoder, cfg = load_for_generation(ckpt, device, weights, overrides)
    vae = None
    if cfg.model.vae is not None:
        from stdit.autoencoder import load_vae
        vae = load_vae(cfg.model.vae, next(model.parameters()).device)
    ft = 1 if vae is None else vae.time_factor
    steps = steps or cfg.diffusion.sample_steps
    cfg_scale = cfg.diffusion.cfg_scale if cfg_scale is None else cfg_scale
    step = re.fullmatch(r"step_(\d+)", ckpt.name)
    window = training_window(cfg, ft)
    results = {"run": str(run), "checkpoint": str(ckpt), "step": int(step.group(1)) if step else 0, "n": n,
               "seed": seed, "steps": steps, "cfg_scale": cfg_scale, "cfg_scale_given": cfg.diffusion.cfg_scale_given,
               "weights": weights, "strength": strength, "window": window, "long_n": long_n,
               "long_factors": long_factors, "modes": {}, "long": {}, "skipped": {}}
    shown, shown_long = {}, {}
    frames = clip_frames(cfg, ft)
    for name in modes:
        if name.startswith("long_"):
            scheme = name[len("long_"):]
            clips = mode_clips(cfg, name, long_n, seed, frames)
            try:
                for f in long_factors:
                    check_long(cfg, scheme, f * window, window)
            except ValueError as e:
                results["skipped"][name] = str(e)
                continue
            results["long"][name], shown_long[name] = {}, {}
            for f in long_factors:
                length = f * window
                total = len(schedule(scheme, length, window)) * long_n
                with tqdm(total=total, desc=f"eval {name} {f}x", disable=not progress, mininterval=1.0) as bar:
                    videos = generate_long_clips(model, text_encoder, cfg, [c.caption for c in clips],
                                                 [tuple(c.video.shape[2:]) for c in clips], scheme, length, window,
                                                 vae, seed, steps, cfg_scale, bar)
                r = score_long_mode([c.caption for c in clips], videos, chunk_spans(length, window, ft))
                results["long"][name][f"{f}x"] = {"scheme": scheme, "factor": f, "length": length,
                                                  "frames": videos[0].shape[1], "window": window, **r}
                shown_long[name][f"{f}x"] = videos
            continue
        clips = mode_clips(cfg, name, n, seed, frames)
        try:
            cases = [mode_case(name, c, cfg, vae, seed, i) for i, c in enumerate(clips)]
        except ValueError as e:
            results["skipped"][name] = str(e)
            continue
        with tqdm(total=steps * -(-n // batch), desc=f"eval {name}", disable=not progress, mininterval=1.0) as bar:
            videos = generate(model, text_encoder, cfg, cases, vae, seed, steps, cfg_scale, batch, strength, bar)
        results["modes"][name] = score_mode(cases, videos, name)
        shown[name] = (videos, [c.given for c in cases])
        if expand_prompt is not None:
            expanded = _expanded(expand_prompt, cfg, cases, seed, device, results.setdefault("expanded", {}))
            with tqdm(total=steps * -(-n // batch), desc=f"eval {name}+expanded", disable=not progress,
                      mininterval=1.0) as bar:
                videos = generate(model, text_encoder, cfg, expanded, vae, seed, steps, cfg_scale, batch, strength,
                                  bar)
            results["modes"][f"{name}+expanded"] = score_mode(expanded, videos, name)
            shown[f"{name}+expanded"] = (videos, [c.given for c in cases])
    if cfg.data.round_trips > 0:  # a uniform guess among the world's 8 motions: 4 ways, one way or out and back
        for r in [*results["modes"].values(), *(x for by in results["long"].values() for x in by.values())]:
            r["chance"] = {**r["chance"], "direction": CHANCE["direction"] / 2}
    write_report(Path(out), results, shown, shown_long)
    return results


def _expanded(model_path: str, cfg, cases: list[Case], seed: int, device: str, known: dict) -> list[Case]:
    """The cases with their captions expanded by a local instruct model (each caption once: `known` maps caption
    -> expansion across modes and goes into results["expanded"])."""
    from dataclasses import replace

    from stdit.prompt import PromptExpander, style_examples
    todo = sorted({c.caption for c in cases} - set(known))
    if todo:
        expander = PromptExpander(model_path, style_examples(cfg.data, seed=seed), device, seed=seed)
        known.update((c, expander.expand(c)) for c in todo)
        expander.close()
    return [replace(c, prompt=known[c.caption]) for c in cases]
