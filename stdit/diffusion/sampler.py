"""Euler sampling of the rectified-flow ODE with classifier-free guidance.

The conditional and unconditional copies of every video are packed into one sequence, so one forward pass
per step serves both (and any mix of shapes). Conditioning frames (image-to-video, continuation, ...: the mask
strategies of training, stdit/diffusion/masks.py) are held at their given clean values with timestep 0, as in
training; only the other frames are integrated.
"""
from __future__ import annotations

import torch

from stdit.diffusion.rectified_flow import sample_generator, shift_t, timestep_shift, velocity_of
from stdit.grid import token_grid
from stdit.packing import pack, patchify, unpack


@torch.no_grad()
def sample_videos(model, text_encoder, prompts: list[str], shapes: list[tuple[int, int, int]], model_cfg,
                  diffusion_cfg, seed: int = 0, fps: float = 8.0, steps: int | None = None,
                  cfg_scale: float | None = None, progress=None, conditions=None, times=None, edits=None,
                  strength: float = 1.0, lengths=None) -> list[torch.Tensor]:
    """Generate one [C, T, H, W] video in [-1, 1]-ish per (prompt, (T, H, W)) from pure noise.

    conditions[i], if given, is (clean video [C, T, H, W] of that shape, bool [T'] over token frames): the True
    frames are given, taken from the clean video; the others are generated.
    times[i], if given, is the time index of each token frame in the video the sample belongs to (strictly
    increasing; e.g. frames 0, 8, 16, 17 of a long video): RoPE sees the real gaps. lengths[i], if given, is
    that video's length in token frames (default: the last time index + 1).
    edits[i], if given, is a clean video [C, T, H, W] to edit (SDEdit): sampling starts from it noised to noise
    level `strength` (0: unchanged, 1: pure noise, the prompt decides everything) instead of from pure noise.
    cfg_scale (default diffusion.cfg_scale) guides the samples without given frames; those with given frames use
    diffusion.cfg_scale_given (None: cfg_scale).
    """
    steps = steps or diffusion_cfg.sample_steps
    cfg_scale = diffusion_cfg.cfg_scale if cfg_scale is None else cfg_scale
    given_scale = cfg_scale if diffusion_cfg.cfg_scale_given is None else diffusion_cfg.cfg_scale_given
    device = next(model.parameters()).device
    patch = tuple(model_cfg.patch_size)
    n = len(prompts)
    conditions, times, edits = conditions or [None] * n, times or [None] * n, edits or [None] * n
    scales = [cfg_scale if c is None or not bool(c[1].any()) else given_scale for c in conditions]
    guided = any(s != 1.0 for s in scales)
    texts = text_encoder.encode(list(prompts) + ([""] * n if guided else []))
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must be in (0, 1]")
    for i, (s, c, e) in enumerate(zip(shapes, conditions, edits)):
        for what, v in (("condition", None if c is None else c[0]), ("edit", e)):
            if v is not None and tuple(v.shape) != (model_cfg.in_channels, *s):
                raise ValueError(f"sample {i}: the {what} clip has shape {tuple(v.shape)} but the requested video is "
                                 f"{(model_cfg.in_channels, *s)} (channels, frames, height, width); give a clip of "
                                 "that shape")
    placeholders = [torch.zeros(model_cfg.in_channels, *s) if c is None else c[0].float()
                    for s, c in zip(shapes, conditions)]
    masks = [None if c is None else c[1] for c in conditions]
    videos = placeholders + (placeholders if guided else [])
    total = sum(v[0].numel() // (patch[0] * patch[1] * patch[2]) for v in videos)
    times = list(times) + (list(times) if guided else [])
    lengths = list(lengths or [None] * n) * (2 if guided else 1)
    batch = pack(videos, texts, [fps] * len(videos), patch, total,
                 cond_frames=masks + (masks if guided else []), times=times, lengths=lengths).to(device)
    token_dim = batch.tokens.shape[1]

    x = torch.zeros(batch.offsets[n] if guided else total, token_dim, device=device)
    shifts, starts = [], []
    for i, s in enumerate(shapes):
        g = token_grid(s, patch)
        num = g[0] * g[1] * g[2]
        off = batch.offsets[i]
        noise = torch.randn(num, token_dim, generator=sample_generator(seed, 0, i, "sample")).to(device)
        shift, start = timestep_shift(num, diffusion_cfg), 1.0
        if edits[i] is not None:  # start on the ODE path at noise level `strength`, from the clip to edit
            x0 = patchify(edits[i].float(), patch).to(device)
            noise = (1 - strength) * x0 + strength * noise
            start = strength / (shift - (shift - 1) * strength)  # the unshifted time whose shifted value it is
        x[off:off + num] = noise
        shifts.append(shift)
        starts.append(start)
    shifts = torch.tensor(shifts * (2 if guided else 1), device=device)
    starts = torch.tensor(starts * (2 if guided else 1), device=device)
    given = batch.frame_cond[batch.token_frame[:x.shape[0]]]  # tokens of conditioning frames
    x[given] = batch.tokens[:x.shape[0]][given].float()

    sample_scale = torch.tensor(scales, device=device)
    model.eval()
    ts = torch.linspace(1.0, 0.0, steps + 1, device=device)[:, None] * starts  # [steps + 1, samples]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for k in range(steps):
        t_cur, t_next = shift_t(ts[k], shifts), shift_t(ts[k + 1], shifts)         # per packed sample
        t_frame = torch.cat([t_cur, t_cur.new_zeros(1)])[batch.frame_sample]
        t_frame = torch.where(batch.frame_cond, torch.zeros_like(t_frame), t_frame)
        x_in = torch.cat([x, x]) if guided else x
        with autocast:
            v = velocity_of(model(x_in, t_frame, batch), x_in, t_frame[batch.token_frame[:x_in.shape[0]]],
                            diffusion_cfg)
        if guided:
            v_cond, v_uncond = v[:x.shape[0]], v[x.shape[0]:]
            scale = sample_scale[batch.token_sample[:x.shape[0]]][:, None]
            v = v_uncond + scale * (v_cond - v_uncond)
        dt = (t_next - t_cur)[batch.token_sample[:x.shape[0]]][:, None]
        x = x + dt * v * ~given[:, None]
        if progress is not None:
            progress.update(1)
    full = torch.cat([x, x]) if guided else x
    return [vid.float().cpu() for vid in unpack(full, batch)[:n]]
