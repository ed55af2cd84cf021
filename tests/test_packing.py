import dataclasses

import pytest
import torch

from stdit.data.binpack import first_fit_decreasing
from stdit.models.attention import VarlenAttention
from stdit.models.stdit import STDiT
from stdit.ops import attention as attn_mod
from stdit.packing import pack, patchify, token_counts, unpack, unpatchify

from conftest import rand_videos, randomize, tiny_model_cfg

SHAPES = [(3, 8, 12), (1, 6, 6), (5, 4, 8), (2, 10, 4)]
PATCH = (1, 2, 2)


def _texts(n, dim=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2 + i, dim, generator=g) for i in range(n)]


def test_patchify_roundtrip():
    v = torch.randn(4, 4, 6, 8)
    for patch in [(1, 2, 2), (2, 2, 2), (1, 1, 1), (4, 3, 4)]:
        tok = patchify(v, patch)
        assert tok.shape == (4 // patch[0] * 6 // patch[1] * 8 // patch[2], 4 * patch[0] * patch[1] * patch[2])
        torch.testing.assert_close(unpatchify(tok, (4 // patch[0], 6 // patch[1], 8 // patch[2]), patch), v)


@pytest.mark.parametrize("pad", [0, 13])
def test_unpack_pack_is_identity(pad):
    videos = rand_videos(SHAPES)
    n = sum(token_counts([v.shape[1:] for v in videos], PATCH))
    b = pack(videos, _texts(4), [8, 16, 24, 8], PATCH, n + pad)
    assert b.tokens.shape[0] == n + pad and b.num_real_tokens == n
    for a, v in zip(unpack(b.tokens, b), videos):
        assert torch.equal(a, v)
    assert int(b.loss_mask.sum()) == n and not b.loss_mask[n:].any()


def test_segments_describe_frames_positions_and_videos():
    videos = rand_videos(SHAPES)
    b = pack(videos, _texts(4), [8] * 4, PATCH, 200)
    grids = [(t, h // 2, w // 2) for t, h, w in SHAPES]
    pad = 200 - b.num_real_tokens
    # spatial: one segment per frame; padding (the tail) in none
    assert torch.diff(b.cu_spatial).tolist() == [h * w for t, h, w in grids for _ in range(t)]
    # full: one per video; cross: one per video + the padding against one dummy text token (the captions unpadded)
    assert torch.diff(b.cu_full).tolist() == [t * h * w for t, h, w in grids]
    assert torch.diff(b.cu_cross).tolist() == [t * h * w for t, h, w in grids] + [pad]
    assert torch.diff(b.cu_text).tolist() == [2, 3, 4, 5, 1]
    # temporal: after the permutation each segment is one (video, row, column) in ascending time; padding last
    c = b.coords[b.temporal_perm]
    s = b.token_sample[b.temporal_perm]
    cu = b.cu_temporal.tolist()
    assert len(cu) - 1 == sum(h * w for _, h, w in grids)
    assert b.temporal_perm[b.num_real_tokens:].tolist() == list(range(b.num_real_tokens, 200))
    for a, e in zip(cu[:-1], cu[1:]):
        assert (s[a:e] == s[a]).all() and (c[a:e, 1:] == c[a, 1:]).all()
        assert c[a:e, 0].tolist() == list(range(e - a))
    assert torch.equal(b.temporal_perm[b.temporal_inv], torch.arange(200))
    # frames: per-token frame ids agree with coordinates and samples
    assert torch.equal(b.frame_sample[b.token_frame], b.token_sample)
    assert b.frame_sample.tolist() == [0] * 3 + [1] + [2] * 5 + [3] * 2 + [4]
    # each frame's time counted from its sample's first frame (0 for the padding frame)
    assert b.frame_time.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4, 0, 1, 0]
    sub = pack(videos, _texts(4), [8] * 4, PATCH, 200, times=[torch.tensor([5, 9, 10]), None, None, None])
    assert sub.frame_time.tolist()[:3] == [0, 4, 5] and sub.coords[0, 0] == 5


def _expand(runs):
    runs = runs.tolist()
    return [lq for lq, _, n in runs for _ in range(n)], [lk for _, lk, n in runs for _ in range(n)]


@pytest.mark.parametrize("pad", [0, 29])
def test_runs_describe_the_segments_of_every_kind(pad):
    """The host-side runs (the dense backend's input) say what cu_seqlens say; temporal columns are ordered by
    frame count, one run per distinct count."""
    shapes = SHAPES + [(3, 4, 4), (1, 2, 2), (5, 2, 2)]
    videos = rand_videos(shapes)
    n = sum(token_counts([v.shape[1:] for v in videos], PATCH))
    b = pack(videos, _texts(len(shapes)), [8.0] * len(shapes), PATCH, n + pad)
    for kind in ("spatial", "temporal", "full", "cross"):
        seg = b.segments(kind)
        assert seg.kind == kind and seg.runs is b.runs[kind]
        assert _expand(seg.runs) == (torch.diff(seg.cu_q).tolist(), torch.diff(seg.cu_k).tolist()), kind
    runs = {kind: r.tolist() for kind, r in b.runs.items()}
    assert [(lq, count) for lq, _, count in runs["temporal"]] == [(1, 9 + 1), (2, 10), (3, 24 + 4), (5, 8 + 1)]
    assert len(runs["spatial"]) == len(shapes) - 1 and runs["spatial"][-1] == [1, 1, 1 + 5]  # 1x1 frames merge
    assert runs["cross"][-1] == ([pad, 1, 1] if pad else [5 * 1, 8, 1])


def test_conditioning_frames_leave_the_loss():
    videos = rand_videos(SHAPES[:1])
    b = pack(videos, _texts(1), [8], PATCH, 80, cond_frames=[torch.tensor([True, False, False])])
    assert b.frame_cond.tolist() == [True, False, False, True]  # last: padding frame
    assert int(b.loss_mask.sum()) == 2 * 24


def test_pack_rejects_overflow_with_the_key_to_change():
    with pytest.raises(ValueError, match="data.token_budget"):
        pack(rand_videos(SHAPES), _texts(4), [8] * 4, PATCH, 50)


def test_first_fit_decreasing_covers_every_sample_once():
    counts = [72, 9, 40, 20, 100, 3, 3, 64, 50]
    bins = first_fit_decreasing(counts, 128)
    assert sorted(i for b in bins for i in b) == list(range(len(counts)))
    assert all(sum(counts[i] for i in b) <= 128 for b in bins)
    assert len(bins) == 3  # 361 tokens: FFD reaches the lower bound ceil(361/128)
    with pytest.raises(ValueError, match="token_budget"):
        first_fit_decreasing([200], 128)


def test_first_fit_into_fixed_bins_takes_the_given_order_and_leaves_out_what_does_not_fit():
    counts = [60, 50, 40, 30, 20]
    assert first_fit_decreasing(counts, 100, num_bins=2) == [[0, 2], [1, 3, 4]]
    # item 4 first (as an overdue sample would be): it is packed, and 3 no longer fits anywhere
    assert first_fit_decreasing(counts, 100, num_bins=2, order=[4, 0, 1, 2, 3]) == [[0, 4], [1, 2]]
    assert first_fit_decreasing(counts, 100, num_bins=3, order=[0]) == [[0]]  # empty bins are dropped


# ----------------------------------------------------------------------------------------------------------
# Padding costs nothing: in no self-attention segment, not in max_seqlen, never seen by the kernel
# ----------------------------------------------------------------------------------------------------------

SELF_KINDS = (("spatial", "cu_spatial", "max_spatial"), ("temporal", "cu_temporal", "max_temporal"),
              ("full", "cu_full", "max_full"))


def _one_segment_padding(b):
    """The layout before padding cost nothing: the padding one segment of every kind, counted in max_*."""
    L, pad = b.tokens.shape[0], b.tokens.shape[0] - b.num_real_tokens
    grow = {cu: torch.cat([getattr(b, cu), torch.tensor([L], dtype=torch.int32)]) for _, cu, _ in SELF_KINDS}
    return dataclasses.replace(b, **grow, **{m: max(getattr(b, m), pad) for _, _, m in SELF_KINDS},
                               num_real_tokens=L, runs=None)


def _pair(pad):
    """The same samples packed without and with `pad` tokens of padding."""
    videos = [v.double() for v in rand_videos(SHAPES)]
    n = sum(token_counts([v.shape[1:] for v in videos], PATCH))
    return [pack(videos, [x.double() for x in _texts(4, 16)], [8, 16, 24, 8], PATCH, n + p) for p in (0, pad)]


def test_padding_is_in_no_self_attention_segment_nor_in_max_seqlen():
    tight, padded = _pair(pad=500)  # padding longer than any sample: before, it set every max_*
    n = padded.num_real_tokens
    for kind, cu, m in SELF_KINDS:
        assert torch.equal(getattr(padded, cu), getattr(tight, cu)) and int(getattr(padded, cu)[-1]) == n
        assert getattr(padded, m) == getattr(tight, m) == int(torch.diff(getattr(tight, cu)).max()) >= 1
        seg = padded.segments(kind)
        assert seg.tokens == n and seg.max_q == seg.max_k == getattr(tight, m)
    cross = padded.segments("cross")  # every query still has a key: padding reads one zero text token
    assert cross.tokens is None and torch.diff(cross.cu_q).tolist()[-1] == 500 and cross.max_q == 500
    assert torch.diff(cross.cu_k).tolist()[-1] == 1 and not padded.text[-1].any()
    assert torch.equal(tight.segments("cross").cu_q, tight.cu_full)


def _model(attention):
    return randomize(STDiT(tiny_model_cfg(attention=attention, depth=2), 16)).double()


def _forward(model, b):
    return model(b.tokens, torch.tensor([0.1, 0.5, 0.9, 0.3, 0.0], dtype=torch.float64)[b.frame_sample], b)


def _forward_backward(model, b):
    """Velocity and the parameter grads of a loss on the real tokens (padding out of the loss)."""
    model.zero_grad()
    out = _forward(model, b)
    (out.square().sum(-1) * b.loss_mask).sum().backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["factorized", "full"])
def test_padding_changes_nothing_on_real_tokens(attention):
    model = _model(attention)
    tight, padded = _pair(pad=37)
    n = padded.num_real_tokens
    out, grads = _forward_backward(model, padded)
    out_tight, grads_tight = _forward_backward(model, tight)
    torch.testing.assert_close(out[:n], out_tight, rtol=1e-12, atol=1e-12)  # other L: other matmul blocking
    for k in grads:
        torch.testing.assert_close(grads[k], grads_tight[k], rtol=1e-12, atol=1e-12)
    assert out[n:].isfinite().all()
    # against the old layout of the same L (padding one segment of every kind): the same bits
    out_old, grads_old = _forward_backward(model, _one_segment_padding(padded))
    assert torch.equal(out[:n], out_old[:n])
    assert all(torch.equal(grads[k], grads_old[k]) for k in grads)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_temporal_attention_changes_nothing(causal):
    """auto runs temporal attention on the dense backend (its runs from packing); the reference kernel on every
    kind gives the same outputs and gradients."""
    model = randomize(STDiT(tiny_model_cfg(depth=2, temporal_causal=causal), 16)).double()
    _, b = _pair(pad=37)
    got = _forward_backward(model, b)
    for m in model.modules():
        if isinstance(m, VarlenAttention):
            m.backend = "reference"
    want = _forward_backward(model, b)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    for k in got[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-12, atol=1e-12)


def test_reference_kernel_does_no_work_on_padding(monkeypatch):
    """Score-matrix entries (len_q * len_k summed over segments) the reference kernel computes per forward: the
    padding adds only its cross-attention queries against one text token; before, pad^2 per attention kind."""
    work, rows = [], set()
    inner = attn_mod._reference

    def counting(q, k, v, cu_q, cu_k, causal, scale):
        work.append(int((cu_q.diff() * cu_k.diff()).sum()))
        rows.add(q.shape[0])
        return inner(q, k, v, cu_q, cu_k, causal, scale)

    monkeypatch.setattr(attn_mod, "_reference", counting)
    model, pad = _model("factorized"), 300
    tight, padded = _pair(pad)

    def cost(b):
        work.clear()
        with torch.no_grad():
            _forward(model, b)
        return sum(work)

    depth = len(model.blocks)
    assert cost(padded) - cost(tight) == depth * pad * 1  # cross: pad queries x 1 zero text token
    n = padded.num_real_tokens
    assert rows == {n, n + pad}  # self-attention kernels never see a padding row; cross-attention's queries do
    assert cost(_one_segment_padding(padded)) - cost(tight) == depth * (2 * pad * pad + pad)
