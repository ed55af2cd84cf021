"""What a synthetic clip shows, read from pixels alone (stdit/evaluate.py scores generated clips with it): the
caption grammar, `measure` (background and object colour, shape, motion: one way or out and back), `check` against a
caption, and the condition metrics (boundary jumps, loop closure). Validated on the dataset's own clips in
tests/test_eval.py: ~100% with their captions, chance with shuffled ones."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from stdit.data.synthetic import COLOURS, DIRECTIONS, SHAPES, _shape_mask

NAMES = list(COLOURS)
PALETTE = torch.tensor([COLOURS[c] for c in NAMES])  # [10, 3] RGB in [0, 1]
# chance of a uniform guess; the object colour is never the background colour, so 1 of 9
CHANCE = {"background": 1 / len(COLOURS), "object_colour": 1 / (len(COLOURS) - 1), "direction": 1 / len(DIRECTIONS),
          "shape": 1 / len(SHAPES)}
_ALT = "|".join
_CAPTION = re.compile(rf"an? ({_ALT(COLOURS)}) ({_ALT(SHAPES)})(?: moving ((?:{_ALT(DIRECTIONS)})(?: and back)?))? "
                      rf"on an? ({_ALT(COLOURS)}) background")


def parse_caption(text: str) -> dict:
    """{fg, shape, direction (None for a still; "left and back" for a round trip), bg} of a caption of the synthetic
    grammar; ValueError otherwise."""
    m = _CAPTION.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"caption {text!r} is not of the synthetic grammar 'a|an FG SHAPE [moving DIR [and back]] "
                         f"on a BG background' (colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; directions "
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
    read frame): the sign of the dominant axis of the least-squares motion of that blob's centroid over time, one
    way or out and back (`_direction`), "none" when it moves less than `min_move` pixels. track: the centroids
    (y, x) per frame (None where no blob or skipped).
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
        result["direction"] = _direction(times[present].double() / max(total - 1, 1),
                                         torch.tensor([track[int(times[k])] for k in present], dtype=torch.float64),
                                         min_move)
    return result


def _direction(p: torch.Tensor, pos: torch.Tensor, min_move: float) -> str:
    """The motion of centroids pos [n, 2] (y, x) at clip times p [n] in [0, 1]: a least-squares fit of
    a + b p + c (1 - |2p - 1|) on each axis, b the one-way displacement (over the read span) and c a round trip's
    farthest reach; the largest of them names the direction ("left", "left and back", ...), "none" when under
    min_move pixels. Only the one-way term is fitted from fewer than 3 read times or from times all on one side
    of the clip's middle."""
    both_halves = bool((p < 0.5).any() and (p > 0.5).any())  # else the round trip's term is linear in p there
    terms = [torch.ones_like(p), p] + ([1 - (2 * p - 1).abs()] if len(set(p.tolist())) >= 3 and both_halves else [])
    coef = torch.linalg.lstsq(torch.stack(terms, 1), pos - pos.mean(0)).solution  # [terms, 2]
    moves = [coef[1] * (p[-1] - p[0])] + ([coef[2]] if len(terms) == 3 else [])  # each [2] (dy, dx)
    kind, axis = max(((k, a) for k in range(len(moves)) for a in range(2)), key=lambda ka: moves[ka[0]][ka[1]].abs())
    amount = float(moves[kind][axis])
    if abs(amount) < min_move:
        return "none"
    step = [0, 0]
    step[axis] = 1 if amount > 0 else -1
    return next(d for d, v in DIRECTIONS.items() if list(v) == step) + (" and back" if kind == 1 else "")


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


def _changes(video: torch.Tensor) -> torch.Tensor:
    """[T - 1] mean abs change between consecutive frames of a [3, T, H, W] clip ([-1, 1] units, clamped)."""
    v = video.float().clamp(-1, 1)
    return (v[:, 1:] - v[:, :-1]).abs().mean(dim=(0, 2, 3))


def _typical(video: torch.Tensor, given: torch.Tensor | None) -> float | None:
    """The median change between consecutive generated frames (both not given); None where no two are adjacent."""
    diffs = _changes(video)
    inside = torch.ones_like(diffs, dtype=torch.bool) if given is None else ~given[1:] & ~given[:-1]
    return diffs[inside].median().item() if inside.any() else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 1e-6 else None


def condition_metrics(video: torch.Tensor, clip: torch.Tensor, given: torch.Tensor) -> dict:
    """For a clip generated around given frames (bool [T] over pixel frames; `clip` holds the given frames at the
    same positions): kept = max abs error on the given frames (0 when they are kept exactly); jump = mean abs
    change across each given/generated boundary; typical = the median mean abs change between consecutive
    generated frames; jump_ratio = jump / typical (~1 for a seamless clip, >> 1 at a cut; None when the generated
    frames do not change). All in [-1, 1] pixel units."""
    v, c = video.float().clamp(-1, 1), clip.float()
    kept = (v[:, given] - c[:, given]).abs().max().item()
    diffs = _changes(v)
    boundary = given[1:] != given[:-1]
    jump = diffs[boundary].mean().item() if boundary.any() else None
    typical = _typical(v, given)
    return {"kept": kept, "jump": jump, "typical": typical, "jump_ratio": _ratio(jump, typical)}


def loop_closure(video: torch.Tensor, given: torch.Tensor | None = None) -> dict:
    """How seamlessly a clip loops: closure = mean abs change from its last frame back to its first; closure_ratio
    = closure / the typical change between consecutive generated frames (`given`: bool [T] of frames that were
    given, left out of the typical change). ~1: the wrap is an ordinary step; >> 1: a visible jump."""
    v = video.float().clamp(-1, 1)
    closure = (v[:, 0] - v[:, -1]).abs().mean().item()
    typical = _typical(v, given)
    return {"closure": closure, "closure_typical": typical, "closure_ratio": _ratio(closure, typical)}
