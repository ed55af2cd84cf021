"""NaViT-style packing: videos of any (T, H, W) laid out frame-major in one token sequence of fixed length L.

Every attention kind becomes one varlen kernel call on the flat sequence:
  spatial   one segment per frame (a token sees its own frame only)
  temporal  one segment per (video, row, column), reached through a gather permutation and its inverse
  full      one segment per video
  cross     query: one segment per video; key/value: that video's unpadded text tokens
Temporal segments are ordered by length (samples of equal frame count adjacent), so each attention kind's
segments are also given host-side as a few runs of equal lengths (`runs`): the dense backend batches each run in
one SDPA without reading the boundaries back from the device (stdit/ops/attention.py).
The tail no sample fills is padding: one frame of its own, out of the loss, and in no self-attention segment (the
segments end at the last real token; the attention layer gives padding output 0), so it costs no attention work
and does not set max_seqlen. For cross-attention the padding is one query segment against one zero text token.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from einops import rearrange

from stdit.grid import token_grid
from stdit.ops.attention import length_runs


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: to CUDA through pinned memory with a
    non-blocking copy (the caching host allocator keeps the pinned block until the copy is done)."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------------
# Patchify
# ----------------------------------------------------------------------------------------------------------



def patchify(video: torch.Tensor, patch_size) -> torch.Tensor:
    """[C, T, H, W] -> [T'*H'*W', C*pt*ph*pw], tokens in frame-major (t, h, w) order."""
    pt, ph, pw = patch_size
    c, t, h, w = video.shape
    if t % pt or h % ph or w % pw:
        raise ValueError(f"video of shape (T, H, W)=({t}, {h}, {w}) is not divisible by model.patch_size={list(patch_size)}")
    return rearrange(video, "c (t pt) (h ph) (w pw) -> (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: torch.Tensor, grid, patch_size) -> torch.Tensor:
    """[T'*H'*W', C*pt*ph*pw] -> [C, T, H, W]."""
    pt, ph, pw = patch_size
    t, h, w = grid
    return rearrange(tokens, "(t h w) (c pt ph pw) -> c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)


# ----------------------------------------------------------------------------------------------------------
# The packed batch
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Segments:
    """Arguments of one varlen attention call; `perm`/`inv` gather the tokens into segment order and back."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    causal: bool = False
    perm: torch.Tensor | None = None
    inv: torch.Tensor | None = None
    tokens: int | None = None  # segments cover the first `tokens` rows of q and k (after perm); None: all rows
    runs: torch.Tensor | None = None  # CPU [runs, 3] rows (len_q, len_k, count): the segments as runs of equal lengths
    kind: str | None = None    # spatial | temporal | full | cross: which rung of the backend ladder auto takes


@dataclass
class PackedBatch:
    """One micro-batch: B samples (plus padding) in L tokens. Slot B is the padding 'sample', frame F-1 its frame."""

    tokens: torch.Tensor         # [L, C*pt*ph*pw] clean patch tokens (x0)
    coords: torch.Tensor         # [L, 3] long: frame index, row, column (for RoPE)
    token_sample: torch.Tensor   # [L] long: sample slot of each token (padding: B)
    token_frame: torch.Tensor    # [L] long: frame slot of each token
    frame_sample: torch.Tensor   # [F] long: sample slot of each frame
    frame_cond: torch.Tensor     # [F] bool: frame given clean (timestep 0), not denoised, not in the loss
    frame_time: torch.Tensor     # [F] float: time index minus its sample's first frame's (padding: 0)
    loss_mask: torch.Tensor      # [L] bool
    fps: torch.Tensor            # [B(+1)] float
    text: torch.Tensor           # [S, D_text] unpadded caption tokens of all samples (+1 zero token for padding)
    caption: torch.Tensor        # [B(+1), D_text] each caption's mean token (padding: zero), whole on every cp rank
    clip_length: torch.Tensor    # [B(+1)] float: the length of the clip each sample is part of, in token frames
    cu_spatial: torch.Tensor     # int32 cumulative segment offsets, one segment per frame (padding: in none)
    cu_temporal: torch.Tensor    # int32, one segment per (sample, row, column) in permuted order (padding: none)
    cu_full: torch.Tensor        # int32, one segment per sample (padding: in none)
    cu_text: torch.Tensor        # int32, text segments matching cu_cross
    cu_cross: torch.Tensor       # int32, cross-attention queries: cu_full, plus the padding as one segment
    temporal_perm: torch.Tensor  # [L] long: packed order -> temporal order
    temporal_inv: torch.Tensor   # [L] long: inverse of temporal_perm
    max_spatial: int
    max_temporal: int
    max_full: int
    max_text: int
    max_cross: int               # longest cross-attention query segment (the padding's included)
    num_real_tokens: int         # tokens of the samples; self-attention segments end here, padding follows
    grids: list                  # [(T', H', W')] per sample
    offsets: list                # first token of each sample
    sample_ids: list             # dataset ids of the samples
    patch_size: tuple
    runs: dict | None = None     # attention kind -> its segments as runs (length_runs: a CPU [runs, 3] tensor)

    @property
    def num_samples(self) -> int:
        return len(self.grids)

    @torch.compiler.disable  # host-side bookkeeping: a compiled block would specialise on the runs every step
    def segments(self, kind: str, causal: bool = False) -> Segments:
        """Varlen arguments for attention `kind` in spatial | temporal | full | cross."""
        n = self.num_real_tokens
        extra = {"runs": self.runs[kind] if self.runs and kind in self.runs else None, "kind": kind}
        if kind == "spatial":
            return Segments(self.cu_spatial, self.cu_spatial, self.max_spatial, self.max_spatial, tokens=n, **extra)
        if kind == "temporal":
            return Segments(self.cu_temporal, self.cu_temporal, self.max_temporal, self.max_temporal, causal,
                            self.temporal_perm, self.temporal_inv, tokens=n, **extra)
        if kind == "full":
            return Segments(self.cu_full, self.cu_full, self.max_full, self.max_full, tokens=n, **extra)
        if kind == "cross":
            return Segments(self.cu_cross, self.cu_text, self.max_cross, self.max_text, **extra)
        raise ValueError(f"unknown attention kind {kind!r}")

    def to(self, device) -> "PackedBatch":
        """On `device`; to CUDA by non-blocking copies from pinned memory (the host does not wait)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = to_device(v, device)
        return PackedBatch(**moved)


def _numel(grid) -> int:
    t, h, w = grid
    return t * h * w


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)


def _frame_times(given: torch.Tensor | None, t: int, i: int) -> torch.Tensor:
    """Time index of each of a sample's t token frames: given (checked) or 0..t-1."""
    if given is None:
        return torch.arange(t)
    given = torch.as_tensor(given, dtype=torch.long).cpu()
    if given.shape != (t,) or (given.diff() <= 0).any() or (given < 0).any():
        raise ValueError(f"times[{i}] = {given.tolist()} must be {t} strictly increasing non-negative time indices, "
                         "one per token frame")
    return given


def pack(
    videos: list[torch.Tensor],
    texts: list[torch.Tensor],
    fps: list[float],
    patch_size,
    token_budget: int,
    sample_ids: list[int] | None = None,
    cond_frames: list[torch.Tensor | None] | None = None,
    times: list[torch.Tensor | None] | None = None,
    lengths: list[int | None] | None = None,
) -> PackedBatch:
    """Pack videos [C, T, H, W] with their unpadded text embeddings [n_i, D] into `token_budget` tokens.

    cond_frames[i], if given, is a bool vector over the sample's token frames: True frames are conditioning
    (clean, timestep 0, no loss). times[i], if given, is each token frame's time index in the source video,
    strictly increasing (default 0..T'-1): a sample may be any subset of a longer video's frames. RoPE's time
    coordinate is this index, and the temporal (causal) order follows it. lengths[i], if given, is the length of
    that source video in token frames (default: its last time index + 1).
    """
    patch_size = tuple(patch_size)
    if not videos:
        raise ValueError("pack needs at least one video")
    sample_ids = list(range(len(videos))) if sample_ids is None else list(sample_ids)
    cond_frames = cond_frames or [None] * len(videos)
    times = times or [None] * len(videos)
    lengths = lengths or [None] * len(videos)
    token_list, grids, offsets = [], [], []
    for v in videos:
        offsets.append(sum(_numel(g) for g in grids))
        tok = patchify(v, patch_size)
        grids.append(token_grid(v.shape[1:], patch_size))
        token_list.append(tok)
    n_real = offsets[-1] + _numel(grids[-1])
    if n_real > token_budget:
        raise ValueError(
            f"{len(videos)} samples need {n_real} tokens but data.token_budget={token_budget}; "
            "raise data.token_budget or pack fewer samples per micro-batch")
    pad = token_budget - n_real
    B, dim = len(videos), token_list[0].shape[1]
    dev = token_list[0].device

    coords, token_sample, token_frame, frame_sample, frame_cond, loss_mask = [], [], [], [], [], []
    frame_time, clip_length = [], []
    spatial_len, columns = [], {}  # columns: frame count t -> temporal order of each sample with t frames
    n_frames = 0
    for i, ((t, h, w), off) in enumerate(zip(grids, offsets)):
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        ft = _frame_times(times[i], t, i)
        coords.append(torch.stack([ft[tt], hh, ww], -1).reshape(-1, 3))
        frame_time.append((ft - ft[0]).float())
        clip_length.append(int(ft[-1]) + 1 if lengths[i] is None else int(lengths[i]))
        if clip_length[-1] <= ft[-1]:
            raise ValueError(f"lengths[{i}] = {lengths[i]} token frames, but the sample has a frame at time "
                             f"{int(ft[-1])}: give the length of the video its frames come from")
        token_sample.append(torch.full((t * h * w,), i))
        token_frame.append(n_frames + tt.reshape(-1))
        frame_sample.append(torch.full((t,), i))
        cond = torch.zeros(t, dtype=torch.bool) if cond_frames[i] is None else cond_frames[i].bool().cpu()
        if cond.shape != (t,):
            raise ValueError(f"cond_frames[{i}] has shape {tuple(cond.shape)}, expected ({t},) token frames")
        frame_cond.append(cond)
        loss_mask.append((~cond).repeat_interleave(h * w))
        spatial_len += [h * w] * t
        # temporal order: for each (row, column) its t tokens, ascending in time; samples grouped by t below
        columns.setdefault(t, []).append(
            off + (torch.arange(t)[None, :] * (h * w) + torch.arange(h * w)[:, None]).reshape(-1))
        n_frames += t
    # temporal segments by length, so that they form one run per distinct frame count
    temporal_perm = [c for t in sorted(columns) for c in columns[t]]
    temporal_len = [t for t in sorted(columns) for c in columns[t] for _ in range(c.numel() // t)]
    full_len = [_numel(g) for g in grids]
    text_len = [int(x.shape[0]) for x in texts]
    if len(texts) != B or min(text_len) < 1:
        raise ValueError("pack needs one text embedding of >= 1 token per video (the empty caption still has EOS)")
    text = torch.cat([x.to(dev) for x in texts])
    caption = torch.stack([x.to(dev).float().mean(0) for x in texts])
    fps_t = torch.tensor(list(fps), dtype=torch.float32)
    cross_len = list(full_len)
    if pad:
        # padding is a sample slot of its own with one frame, its tokens at the origin; in no self-attention
        # segment (it stays last in temporal order too); its cross-attention queries read one zero text token
        coords.append(torch.zeros(pad, 3, dtype=torch.long))
        token_sample.append(torch.full((pad,), B))
        token_frame.append(torch.full((pad,), n_frames))
        frame_sample.append(torch.tensor([B]))
        frame_cond.append(torch.tensor([True]))
        frame_time.append(torch.zeros(1))
        loss_mask.append(torch.zeros(pad, dtype=torch.bool))
        temporal_perm.append(torch.arange(n_real, token_budget))
        cross_len.append(pad)
        text_len.append(1)
        text = torch.cat([text, text.new_zeros(1, text.shape[1])])
        caption = torch.cat([caption, caption.new_zeros(1, caption.shape[1])])
        fps_t = torch.cat([fps_t, torch.zeros(1)])
        clip_length.append(1)
    tokens = torch.cat(token_list + ([token_list[0].new_zeros(pad, dim)] if pad else []))
    perm = torch.cat(temporal_perm)
    return PackedBatch(
        tokens=tokens, coords=torch.cat(coords).to(dev), token_sample=torch.cat(token_sample).to(dev),
        token_frame=torch.cat(token_frame).to(dev), frame_sample=torch.cat(frame_sample).to(dev),
        frame_cond=torch.cat(frame_cond).to(dev), frame_time=torch.cat(frame_time).to(dev),
        loss_mask=torch.cat(loss_mask).to(dev), fps=fps_t.to(dev),
        text=text, caption=caption, clip_length=torch.tensor(clip_length, dtype=torch.float32).to(dev),
        cu_spatial=_cu(spatial_len).to(dev), cu_temporal=_cu(temporal_len).to(dev),
        cu_full=_cu(full_len).to(dev), cu_text=_cu(text_len).to(dev), cu_cross=_cu(cross_len).to(dev),
        temporal_perm=perm.to(dev), temporal_inv=torch.argsort(perm).to(dev), max_spatial=max(spatial_len),
        max_temporal=max(temporal_len), max_full=max(full_len), max_text=max(text_len), max_cross=max(cross_len),
        num_real_tokens=n_real, grids=grids, offsets=offsets, sample_ids=sample_ids, patch_size=patch_size,
        runs={"spatial": length_runs(spatial_len), "temporal": length_runs(temporal_len),
              "full": length_runs(full_len), "cross": length_runs(cross_len, text_len)},
    )


def unpack(tokens: torch.Tensor, batch: PackedBatch) -> list[torch.Tensor]:
    """Token tensor [L, C*pt*ph*pw] of a packed batch -> one [C, T, H, W] video per sample."""
    return [unpatchify(tokens[off:off + _numel(g)], g, batch.patch_size) for g, off in zip(batch.grids, batch.offsets)]


def token_counts(shapes, patch_size) -> list[int]:
    """Tokens of each (T, H, W) shape."""
    return [_numel(token_grid(s, patch_size)) for s in shapes]
