"""Generation modes as given frames: every mode of the method is some pixel frames given at some positions.

    text-to-image / -video    nothing given
    image-to-video            the image (or a clip's first k frames: continuation) at frame 0
    extend forward            the last k frames of a clip start the output
    extend backward           the first k frames of a clip end the output
    loop                      one image at frame 0 and again one frame past the end (the end leads into the start)
    connect                   clip A's last k frames start the output, clip B's first k frames end it
    keyframes                 images at chosen frames
    edit (SDEdit)             not given frames: a whole clip, noised to `strength`, is the starting point

In the model's space the given pixel frames become given token frames. Pixel space: frame p is model frame p.
With the causal autoencoder (time factor ft) latent frame 0 encodes pixel frame 0 alone and latent frame m >= 1
encodes pixel frames ft(m-1)+1 .. ft m, depending on no later frame. A clip given at the start is encoded as the
start of a video (its latents 0 .. (n-1)//ft depend on the given frames only). A clip given at pixel frame
p = ft m > 0 is encoded as its own causal chunk: its first frame becomes an image-like latent that stands for
latent m (the last pixel frame of that group is the given one), its next ft frames latent m+1, and so on; so
clips after the start must begin at a multiple of ft (`Given.at`), which the errors say.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("t2v", "i2v", "extend_forward", "extend_backward", "loop", "connect", "keyframes", "edit")


@dataclass
class Given:
    """Pixel frames [3, n, H, W] in [-1, 1], given at output frames at .. at + n - 1."""

    frames: torch.Tensor
    at: int


def condition_for(givens: list[Given], shape: tuple[int, int, int], patch_size, vae=None):
    """(clean video in the model's space, bool mask over token frames) for sample_videos, or None without givens.

    shape = (T, H, W) pixels of the output. Errors name what does not fit (overlaps, positions past the end,
    chunks not on the autoencoder's frame groups, given frames that do not fill whole temporal patches)."""
    if not givens:
        return None
    t, h, w = shape
    ft = vae.time_factor if vae is not None else 1
    model_t = 1 + (t - 1) // ft
    clean, given = None, torch.zeros(model_t, dtype=torch.bool)
    for g in givens:
        n = g.frames.shape[1]
        if tuple(g.frames.shape[2:]) != (h, w) or g.frames.shape[0] != 3:
            raise ValueError(f"a given clip of shape {tuple(g.frames.shape)} does not fit the output (3, n, {h}, {w})")
        if g.at < 0 or g.at + n > t:
            raise ValueError(f"{n} given frames at frame {g.at} do not fit in the {t} frames of the output")
        start, latents = _encode(g, vae, ft)
        if given[start:start + latents.shape[1]].any():
            raise ValueError(f"given frames at frame {g.at} overlap other given frames")
        if clean is None:
            clean = torch.zeros(latents.shape[0], model_t, *latents.shape[2:])
        clean[:, start:start + latents.shape[1]] = latents
        given[start:start + latents.shape[1]] = True
    pt = patch_size[0]
    token_given = given.view(-1, pt) if model_t % pt == 0 else None
    if token_given is None or (token_given.any(1) != token_given.all(1)).any():
        raise ValueError(f"given (latent) frames {given.nonzero().flatten().tolist()} do not fill whole temporal "
                         f"patches of {pt} frames")
    if token_given.all():
        raise ValueError(f"the given frames cover all {t} frames of the output: nothing is left to generate")
    return clean, token_given.all(1)


def _encode(g: Given, vae, ft: int) -> tuple[int, torch.Tensor]:
    """(first model frame, given frames in the model's space [C, m, h, w])."""
    if vae is None:
        return g.at, g.frames.float()
    n = g.frames.shape[1]
    if g.at % ft:
        raise ValueError(f"with the autoencoder, a clip given after the start must begin at a multiple of {ft} "
                         f"(the last frame of a latent group), not at frame {g.at}")
    keep = 1 + (n - 1) // ft  # the first frame, then the whole groups of ft: latents of given frames only
    pad = (keep - 1) * ft + 1 - n
    clip = g.frames if pad <= 0 else torch.cat([g.frames, g.frames[:, -1:].expand(-1, pad, -1, -1)], 1)
    clip = clip[:, :(keep - 1) * ft + 1]
    device = next(vae.parameters()).device
    latents = vae.encode(clip[None].float().to(device), tiled=True)[0].cpu()
    return g.at // ft, latents[:, :keep]


def mode_givens(mode: str, t: int, ft: int = 1, image=None, clip=None, clip_b=None, k: int = 1,
                keyframes: list[tuple[torch.Tensor, int]] | None = None) -> tuple[list[Given], int]:
    """(givens, frames to sample) of a mode for an output of t frames; sampled frames beyond t (loop) are
    dropped after sampling. image [3, 1, H, W]; clip, clip_b [3, n, H, W]; k given frames of a clip."""
    need = {"i2v": image, "extend_forward": clip, "extend_backward": clip, "loop": image, "connect": clip_b,
            "keyframes": keyframes}
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {list(MODES)}")
    if mode in need and need[mode] is None:
        raise ValueError(f"mode {mode} needs its input ({'a second clip' if mode == 'connect' else 'an image or clip'})")
    if mode in ("t2v", "edit"):
        return [], t
    if mode == "i2v":  # an image, or the first frames of a clip (continuation)
        return [Given(image, 0)], t
    if mode in ("extend_forward", "extend_backward", "connect"):
        if not 1 <= k < t:
            raise ValueError(f"{k} given frames must be in [1, {t - 1}] for {t} output frames")
        if mode == "extend_backward":
            return [Given(clip[:, :k], t - k)], t
        start = [Given(clip[:, -k:], 0)]
        return (start + [Given(clip_b[:, :k], t - k)]) if mode == "connect" else start, t
    if mode == "loop":  # sample ft more frames; the last of them is the first again
        return [Given(image[:, :1], 0), Given(image[:, :1], t + ft - 1)], t + ft
    return [Given(frames[:, :1], at) for frames, at in keyframes], t
