"""Video shape -> token grid: the one place that says how a clip of (T, H, W) pixels becomes the DiT's tokens.

A clip is first compressed by the autoencoder's (time, space) factors (ft, fs) -- T = 1 + ft k frames -> 1 + k
latent frames, H, W -> H / fs, W / fs; (1, 1) in pixel space -- then cut into spacetime patches (pt, ph, pw).
Config validation, the estimator, generation, the autoencoder, the data cache, packing and the trainer all ask
here, so they cannot disagree about a shape.
"""
from __future__ import annotations


def latent_shape(shape, factors=(1, 1)) -> tuple[int, int, int]:
    """(T', H', W') of a (T, H, W) clip under (time, space) compression factors; ValueError when they do not fit."""
    t, h, w = (int(s) for s in shape)
    ft, fs = factors
    if t < 1 or (t - 1) % ft or h % fs or w % fs:
        raise ValueError(f"video of {t} frames, {h}x{w} does not fit: frames must be 1 + {ft}k and height / width "
                         f"multiples of {fs}")
    return 1 + (t - 1) // ft, h // fs, w // fs


def token_grid(shape, patch_size, factors=(1, 1), window: int = 0) -> tuple[int, int, int]:
    """Token grid (T', H', W') of a (T, H, W) clip: compressed by `factors`, then divided by the patch (pt, ph, pw);
    ValueError when the patch does not divide the (compressed) shape. With a `window` (data.window) a longer clip
    trains on that many of its token frames."""
    t, h, w = latent_shape(shape, factors)
    pt, ph, pw = patch_size
    if t % pt or h % ph or w % pw:
        where = " after compression" if tuple(factors) != (1, 1) else ""
        raise ValueError(f"shape {t}x{h}x{w}{where} is not divisible by the patch (pt, ph, pw)=({pt}, {ph}, {pw})")
    t = t // pt
    return (min(t, window) if window else t), h // ph, w // pw
