"""`stdit eval`: does a model trained on the synthetic world (stdit/data/synthetic.py) follow its prompts?

Every synthetic clip is one shape of one palette colour moving one way over a background of another palette colour,
so a caption can be checked from pixels alone: no learned metric, nothing that could share the model's mistakes.
`measure` reads background colour, object colour, shape and motion direction off a clip; `evaluate` generates clips
from held-out captions in each mode of MODES, scores them against their captions and writes the report
(stdit/eval_report.py). The measurement is validated on the dataset's own clips (tests/test_eval.py): ~100% with
their captions, chance with shuffled ones.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from stdit.data.synthetic import COLOURS, DIRECTIONS, SHAPES, SyntheticClips, _shape_mask

NAMES = list(COLOURS)
PALETTE = torch.tensor([COLOURS[c] for c in NAMES])  # [10, 3] RGB in [0, 1]
# chance of a uniform guess; the object colour is never the background colour, so 1 of 9
CHANCE = {"background": 1 / len(COLOURS), "object_colour": 1 / (len(COLOURS) - 1), "direction": 1 / len(DIRECTIONS),
          "shape": 1 / len(SHAPES)}
_ALT = "|".join
_CAPTION = re.compile(rf"an? ({_ALT(COLOURS)}) ({_ALT(SHAPES)})(?: moving ({_ALT(DIRECTIONS)}))? "
                      rf"on an? ({_ALT(COLOURS)}) background")


def parse_caption(text: str) -> dict:
    """{fg, shape, direction (None for a still), bg} of a caption of the synthetic grammar; ValueError otherwise."""
    m = _CAPTION.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"caption {text!r} is not of the synthetic grammar 'a|an FG SHAPE [moving DIR] on a BG "
                         f"background' (colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; directions "
                         f"{', '.join(DIRECTIONS)})")
    fg, shape, direction, bg = m.groups()
    return {"fg": fg, "shape": shape, "direction": direction, "bg": bg}


def format_caption(fg: str, shape: str, direction: str | None, bg: str) -> str:
    """The caption SyntheticClips writes for these attributes (the inverse of parse_caption)."""
    article = "an" if fg[0] in "aeiou" else "a"
    motion = f" moving {direction}" if direction else ""
    return f"{article} {fg} {shape}{motion} on a {bg} background"


def _rgb(video: torch.Tensor) -> torch.Tensor:
    """[T, H, W, 3] float in [0, 1] from [3, T, H, W] float in [-1, 1] or uint8 [T, H, W, 3] (to_uint8, read_video)."""
    if video.dtype == torch.uint8:
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"a uint8 clip must be [T, H, W, 3], got {tuple(video.shape)}")
        return video.float() / 255
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"a float clip must be [3, T, H, W] in [-1, 1], got {tuple(video.shape)}")
    return ((video.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)


def _largest_components(mask: torch.Tensor) -> torch.Tensor:
    """Per frame of a bool [T, H, W] mask, its largest 8-connected component: a speck of noise elsewhere in the
    frame must not pull the object's centroid or change its outline. Labels spread by max-pooling until stable."""
    t, h, w = mask.shape  # float32 ids (max_pool2d takes no ints) are exact up to 2**24 pixels
    ids = torch.arange(1, t * h * w + 1, dtype=torch.float32).view(t, 1, h, w) * mask[:, None]
    while True:
        grown = F.max_pool2d(ids, 3, 1, 1) * mask[:, None]
        if torch.equal(grown, ids):
            break
        ids = grown
    ids = ids[:, 0]
    out = torch.zeros_like(mask)
    for k in range(t):
        labels, counts = ids[k][mask[k]].unique(return_counts=True)
        if len(labels):
            out[k] = ids[k] == labels[counts.argmax()]
    return out


def _shape_of(blob: torch.Tensor) -> str:
    """Shape of one frame's object mask [H, W]: the shape whose rendering by the generator's own rasteriser, fitted
    to the blob's bounding box (every shape spans 2r x 2r), overlaps the blob best (intersection over union)."""
    ys, xs = blob.nonzero(as_tuple=True)
    y0, y1, x0, x1 = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
    r = (y1 - y0 + x1 - x0) / 4
    cy, cx = torch.tensor([(y0 + y1) / 2]), torch.tensor([(x0 + x1) / 2])
    grid_y, grid_x = torch.arange(blob.shape[0]) + 0.5, torch.arange(blob.shape[1]) + 0.5

    def iou(shape):
        ideal = _shape_mask(shape, grid_y, grid_x, cy, cx, r)[0]
        return (ideal & blob).sum() / (ideal | blob).sum()
    return max(SHAPES, key=iou)


def measure(video: torch.Tensor, skip: torch.Tensor | None = None, min_object: float = 0.005,
            min_move: float = 1.0) -> dict:
    """What a clip shows, read from pixels: {bg, fg, shape, direction, track}. Frames where the bool [T] `skip` is
    True are not read (given frames: the model did not make them); the others keep their time indices.

    bg: the most common nearest-palette colour over all read pixels (the object covers at most a quarter of a frame).
    fg: the most common nearest-palette colour among the other pixels; "none" if they are under `min_object` of the
    clip. shape: majority vote over frames of the outline of the largest fg-coloured blob. direction (clips of > 1
    read frame): the sign of the dominant axis of the least-squares motion of that blob's centroid over time, "none"
    when it moves less than `min_move` pixels. track: the centroids (y, x) per frame (None where no blob or skipped).
    """
    rgb = _rgb(video)
    total = rgb.shape[0]
    times = torch.arange(total) if skip is None else (~skip).nonzero()[:, 0]
    if len(times) == 0:
        raise ValueError("every frame is skipped: nothing to measure")
    rgb = rgb[times]
    labels = ((rgb[..., None, :] - PALETTE) ** 2).sum(-1).argmin(-1)  # [T, H, W] nearest palette colour
    bg = int(torch.bincount(labels.flatten(), minlength=len(NAMES)).argmax())
    other = labels[labels != bg]
    result = {"bg": NAMES[bg], "fg": "none", "shape": "none", "direction": None, "track": [None] * total}
    if rgb.shape[0] > 1:
        result["direction"] = "none"
    if other.numel() < max(min_object * labels.numel(), 1):
        return result
    fg = int(torch.bincount(other, minlength=len(NAMES)).argmax())
    result["fg"] = NAMES[fg]
    blobs = _largest_components(labels == fg)
    present = [k for k in range(len(blobs)) if blobs[k].any()]
    votes = [_shape_of(blobs[k]) for k in present]
    result["shape"] = max(SHAPES, key=votes.count)
    track = [None] * total
    for k in present:
        ys, xs = blobs[k].nonzero(as_tuple=True)
        track[int(times[k])] = (ys.float().mean().item() + 0.5, xs.float().mean().item() + 0.5)
    result["track"] = track
    if len(present) >= 2:
        ts = times[present].double()
        pos = torch.tensor([track[int(times[k])] for k in present], dtype=torch.float64)  # [n, 2] (y, x)
        tc = ts - ts.mean()
        move = (tc[:, None] * (pos - pos.mean(0))).sum(0) / (tc ** 2).sum() * (ts[-1] - ts[0])  # (dy, dx) fitted
        axis = int(move.abs().argmax())
        if move[axis].abs() >= min_move:
            step = [0, 0]
            step[axis] = 1 if move[axis] > 0 else -1
            result["direction"] = next(d for d, v in DIRECTIONS.items() if list(v) == step)
    return result


def check(got: dict, caption: str) -> dict:
    """A measurement (measure's dict) checked against a caption: the measured fields plus {caption, expected,
    *_ok}; direction_ok is None where the caption names no motion or a single frame was read."""
    want = parse_caption(caption)
    moving = want["direction"] is not None and got["direction"] is not None
    return {"caption": caption, "expected": want, **{k: got[k] for k in ("bg", "fg", "shape", "direction")},
            "bg_ok": got["bg"] == want["bg"], "fg_ok": got["fg"] == want["fg"],
            "shape_ok": got["shape"] == want["shape"],
            "direction_ok": got["direction"] == want["direction"] if moving else None}


def score_clip(video: torch.Tensor, caption: str, skip: torch.Tensor | None = None) -> dict:
    """check(measure(video, skip), caption): one clip scored against its caption."""
    return check(measure(video, skip), caption)


def accuracies(records: list[dict]) -> dict:
    """Fraction correct of each measure over the records that have it (None where none has it) and their counts."""
    out = {}
    for name, key in (("background", "bg_ok"), ("object_colour", "fg_ok"), ("direction", "direction_ok"),
                      ("shape", "shape_ok")):
        marks = [r[key] for r in records if r[key] is not None]
        out[name] = {"accuracy": sum(marks) / len(marks) if marks else None, "correct": sum(marks), "n": len(marks)}
    return out


def condition_metrics(video: torch.Tensor, clip: torch.Tensor, given: torch.Tensor) -> dict:
    """For a clip generated around given frames (bool [T] over pixel frames): kept = max abs error on the given
    frames (0 when they are kept exactly); jump = mean abs change across each given/generated boundary; typical = the
    median mean abs change between consecutive generated frames; jump_ratio = jump / typical (~1 for a seamless
    clip, None when the generated frames do not change). All in [-1, 1] pixel units."""
    v, c = video.float().clamp(-1, 1), clip.float()
    kept = (v[:, given] - c[:, given]).abs().max().item()
    diffs = (v[:, 1:] - v[:, :-1]).abs().mean(dim=(0, 2, 3))  # [T - 1]
    boundary, inside = given[1:] != given[:-1], ~given[1:] & ~given[:-1]
    jump = diffs[boundary].mean().item() if boundary.any() else None
    typical = diffs[inside].median().item() if inside.any() else None
    ratio = jump / typical if jump is not None and typical is not None and typical > 1e-6 else None
    return {"kept": kept, "jump": jump, "typical": typical, "jump_ratio": ratio}


@dataclass(frozen=True)
class Mode:
    """How a generation mode is evaluated. still: 1-frame clips (else the run's longest); given: token-frame count ->
    indices of the token frames taken from a real clip of the caption (None: text only). A new conditioned mode
    (extension, loop, keyframes) is a new row of MODES."""

    still: bool
    given: Callable[[int], list[int]] | None = None


MODES = {"t2v": Mode(still=False), "t2i": Mode(still=True), "i2v": Mode(still=False, given=lambda n: [0])}


def held_out_clips(cfg, mode: Mode, n: int, seed: int) -> list:
    """n synthetic clips (caption + real video) of the run's resolutions. Their generator key `eval{seed}/{i}` is
    disjoint from training's `{run.seed}/{i}`, so none is a training clip (a caption may still recur: the world
    has only 1440 of them)."""
    frames = 1 if mode.still else max(cfg.data.frame_counts)
    if frames == 1 and not mode.still:
        raise ValueError("the run trained on single frames only (data.frame_counts); evaluate it with --modes t2i")
    data = SyntheticClips(n, cfg.data.resolutions, [frames], cfg.data.fps_choices, seed=f"eval{seed}")
    return [data[i] for i in range(n)]


@torch.no_grad()
def build_condition(clip: torch.Tensor, mode: Mode, patch_size, vae=None):
    """((clean video in the model's space, bool mask over token frames), bool [T] of the given pixel frames).
    With an autoencoder only a prefix of token frames can be given: the clip is encoded with the frames after the
    given ones replaced by the last given one, so its causal encoder sees nothing else (as stdit generate does)."""
    t, pt = clip.shape[1], patch_size[0]
    ft = 1 if vae is None else vae.time_factor
    tokens = (1 + (t - 1) // ft) // pt
    mask = torch.zeros(tokens, dtype=torch.bool)
    mask[mode.given(tokens)] = True
    if mask.all() or not mask.any():
        raise ValueError(f"clips of {tokens} token frame(s) leave nothing to give or to generate")
    if vae is None:
        return (clip, mask), mask.repeat_interleave(pt)
    k = int(mask.sum())
    if not mask[:k].all():
        raise ValueError("with an autoencoder only a prefix of frames can be given")
    px = 1 + (k * pt - 1) * ft  # pixel frames behind the first k * pt latent frames
    video = torch.cat([clip[:, :px], clip[:, px - 1:px].expand(-1, t - px, -1, -1)], dim=1)
    latent = vae.encode(video[None].to(next(vae.parameters()).device), tiled=True)[0].cpu()
    return (latent, mask), torch.arange(t) < px


@torch.no_grad()
def generate(model, text_encoder, cfg, clips, mode: Mode, vae=None, seed: int = 0, steps=None, cfg_scale=None,
             batch: int = 8, progress=None):
    """Pixel clips [3, T, H, W] for the clips' captions (and given frames of `mode`), batch by batch, and the bool
    [T] masks of their given pixel frames (None for text-only modes)."""
    from stdit.diffusion.sampler import sample_videos
    from stdit.grid import latent_shape
    factors = (1, 1) if vae is None else (vae.time_factor, vae.space_factor)
    videos, givens = [], []
    for start in range(0, len(clips), batch):
        part = clips[start:start + batch]
        conds = [build_condition(c.video, mode, cfg.model.patch_size, vae) if mode.given else (None, None)
                 for c in part]
        out = sample_videos(model, text_encoder, [c.caption for c in part],
                            [latent_shape(c.video.shape[1:], factors) for c in part], cfg.model, cfg.diffusion,
                            seed=seed + start, fps=cfg.data.fps_choices[0], steps=steps, cfg_scale=cfg_scale,
                            progress=progress, conditions=[c for c, _ in conds])
        if vae is not None:
            out = [vae.decode(v[None].to(next(vae.parameters()).device), tiled=True)[0].cpu() for v in out]
        videos += out
        givens += [g for _, g in conds]
    return videos, givens


def score_mode(clips, videos, givens) -> dict:
    """{n, accuracy, chance, clips} of one mode, plus kept / jump_ratio summaries for conditioned modes."""
    records = []
    for c, v, g in zip(clips, videos, givens):
        r = score_clip(v, c.caption, g)  # given frames are the real clip's: only generated frames are scored
        if g is not None:
            r.update(condition_metrics(v, c.video, g))
        records.append(r)
    result = {"n": len(records), "accuracy": accuracies(records), "chance": CHANCE, "clips": records}
    if givens and givens[0] is not None:
        ratios = sorted(r["jump_ratio"] for r in records if r["jump_ratio"] is not None)
        result["kept_max_abs_error"] = max(r["kept"] for r in records)
        result["jump_ratio_median"] = ratios[len(ratios) // 2] if ratios else None
    return result


def evaluate(run, out, n: int = 16, modes=("t2v", "t2i", "i2v"), seed: int = 0, steps: int | None = None,
             cfg_scale: float | None = None, device: str = "auto", weights: str = "ema", batch: int = 8,
             progress: bool = False) -> dict:
    """Generate n held-out clips per mode with a run's weights, score them, write the report into `out`
    (results.json, results.md, contact_MODE.png, report.html, tb/) and return the results."""
    from tqdm import tqdm

    from stdit.eval_report import write_report
    from stdit.generate import find_checkpoint, load_for_generation
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown mode(s) {unknown or modes}; choose from {', '.join(MODES)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ckpt = find_checkpoint(Path(run))
    model, text_encoder, cfg = load_for_generation(ckpt, device, weights)
    vae = None
    if cfg.model.vae is not None:
        from stdit.autoencoder import load_vae
        vae = load_vae(cfg.model.vae, next(model.parameters()).device)
    steps = steps or cfg.diffusion.sample_steps
    cfg_scale = cfg.diffusion.cfg_scale if cfg_scale is None else cfg_scale
    step = re.fullmatch(r"step_(\d+)", ckpt.name)
    results = {"run": str(run), "checkpoint": str(ckpt), "step": int(step.group(1)) if step else 0, "n": n,
               "seed": seed, "steps": steps, "cfg_scale": cfg_scale, "weights": weights, "modes": {}}
    shown = {}
    for name in modes:
        mode = MODES[name]
        clips = held_out_clips(cfg, mode, n, seed)
        with tqdm(total=steps * -(-n // batch), desc=f"eval {name}", disable=not progress, mininterval=1.0) as bar:
            videos, givens = generate(model, text_encoder, cfg, clips, mode, vae, seed, steps, cfg_scale, batch, bar)
        results["modes"][name] = score_mode(clips, videos, givens)
        shown[name] = (videos, givens)
    write_report(Path(out), results, shown)
    return results
