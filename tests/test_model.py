"""The packing contract: a sample's output does not depend on what it is packed with, in any order."""
import pytest
import torch

from stdit.models.attention import CrossAttention, SelfAttention
from stdit.models.layers import rope_cos_sin
from stdit.models.stdit import STDiT
from stdit.packing import pack, token_counts

from conftest import rand_videos, randomize, tiny_model_cfg

SHAPES = [(3, 8, 12), (1, 6, 6), (4, 4, 8), (2, 10, 4)]
PATCH = (1, 2, 2)
TEXT_DIM = 16


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    videos = [v.double() for v in rand_videos(SHAPES, seed=seed)]
    texts = [torch.randn(2 + 3 * i, TEXT_DIM, generator=g, dtype=torch.float64) for i in range(len(SHAPES))]
    t = [0.1, 0.5, 0.9, 0.3]
    fps = [8.0, 16.0, 24.0, 12.0]
    return videos, texts, t, fps


def _run(model, videos, texts, t, fps, order, pad):
    vs = [videos[i] for i in order]
    n = sum(token_counts([v.shape[1:] for v in vs], PATCH))
    b = pack(vs, [texts[i] for i in order], [fps[i] for i in order], PATCH, n + pad)
    t_frame = torch.tensor([t[i] for i in order] + [0.0], dtype=torch.float64)[b.frame_sample]
    out = model(b.tokens, t_frame, b)
    return {i: out[off:off + c] for i, off, c in zip(order, b.offsets, token_counts([v.shape[1:] for v in vs], PATCH))}


@pytest.mark.parametrize("attention,causal,extra", [
    ("factorized", False, {}), ("factorized", True, {}), ("full", False, {}),
    ("factorized", False, {"time_embed": "relative", "caption_time": True}),  # a sample's own caption per frame
    ("factorized", False, {"caption_time": True, "caption_time_scale": "clip"})])
def test_packed_equals_alone_in_any_order(attention, causal, extra):
    model = randomize(STDiT(tiny_model_cfg(attention=attention, temporal_causal=causal, **extra), TEXT_DIM)).double()
    videos, texts, t, fps = _inputs()
    alone = {i: _run(model, videos, texts, t, fps, [i], pad=5)[i] for i in range(len(SHAPES))}
    assert all(o.abs().max() > 1e-3 for o in alone.values())  # not trivially zero
    for order, pad in [([0, 1, 2, 3], 0), ([3, 1, 0, 2], 7), ([2, 0, 3, 1], 31)]:
        packed = _run(model, videos, texts, t, fps, order, pad)
        for i in range(len(SHAPES)):
            torch.testing.assert_close(packed[i], alone[i], rtol=1e-10, atol=1e-10)


def _attn_setup(kind, causal=False):
    videos, texts, _, fps = _inputs()
    n = sum(token_counts([v.shape[1:] for v in videos], PATCH))
    b = pack(videos, [x[:, :8].contiguous() for x in texts], fps, PATCH, n + 6)
    x = torch.randn(b.tokens.shape[0], 8, dtype=torch.float64)
    rope = rope_cos_sin(b.coords, 4, 10000.0)
    if kind == "cross":
        attn = randomize(CrossAttention(8, 2, backend="reference")).double()
        return b, x, lambda x_, text=b.text: attn(x_, text, b.segments("cross"))
    attn = randomize(SelfAttention(8, 2, backend="reference")).double()
    return b, x, lambda x_: attn(x_, rope, b.segments(kind, causal))


@pytest.mark.parametrize("kind,causal", [("spatial", False), ("temporal", False), ("temporal", True), ("full", False)])
def test_attention_sees_only_its_segment(kind, causal):
    b, x, f = _attn_setup(kind, causal)
    base = f(x)
    s, fr, co = b.token_sample, b.token_frame, b.coords
    for j in [0, 30, 57, int(b.offsets[2]) + 9, int(b.offsets[3]) + 3]:
        x2 = x.clone()
        x2[j] += 1.0
        moved = (f(x2) - base).abs().amax(-1) > 1e-12
        if kind == "spatial":
            may = fr == fr[j]
        elif kind == "temporal":
            may = (s == s[j]) & (co[:, 1:] == co[j, 1:]).all(-1)
            if causal:
                may &= co[:, 0] >= co[j, 0]
        else:
            may = s == s[j]
        assert not (moved & ~may).any(), f"token {j} leaked into tokens {torch.nonzero(moved & ~may).flatten()[:5]}"
        assert moved[j] and (moved & may).sum() > (1 if may.sum() > 1 else 0)


def test_cross_attention_reads_only_its_own_caption():
    b, x, f = _attn_setup("cross")
    base = f(x)
    for i in range(b.num_samples):
        text = b.text.clone()
        lo, hi = b.cu_text[i].item(), b.cu_text[i + 1].item()
        text[lo:hi] += 1.0
        moved = (f(x, text) - base).abs().amax(-1) > 1e-12
        assert torch.equal(moved, b.token_sample == i)


def test_temporal_causal_model_ignores_later_frames():
    model = randomize(STDiT(tiny_model_cfg(temporal_causal=True), TEXT_DIM)).double()
    videos, texts, t, fps = _inputs()
    base = _run(model, videos, texts, t, fps, [0, 2], pad=3)
    videos2 = [v.clone() for v in videos]
    videos2[2][:, 2:] += 1.0  # change frames 2, 3 of sample 2 (8 tokens per frame: 4/2 x 8/2)
    out = _run(model, videos2, texts, t, fps, [0, 2], pad=3)
    torch.testing.assert_close(out[0], base[0], rtol=0, atol=0)
    torch.testing.assert_close(out[2][:2 * 8], base[2][:2 * 8], rtol=0, atol=1e-12)
    assert (out[2][2 * 8:] - base[2][2 * 8:]).abs().max() > 1e-3


def test_zero_init_predicts_zero_and_blocks_are_identity():
    model = STDiT(tiny_model_cfg(), TEXT_DIM)
    videos, texts, t, fps = _inputs()
    out = _run(model.double(), videos, texts, t, fps, [0, 1], pad=0)
    assert all(torch.count_nonzero(o) == 0 for o in out.values())


@pytest.mark.parametrize("attention,causal,extra", [
    ("factorized", False, {}), ("factorized", True, {}), ("full", False, {}),
    ("factorized", False, {"rope_axes": "per_attention", "pos_embed": "sincos", "rope_theta": 100.0,
                           "time_embed": "relative"}),
    ("factorized", False, {"time_embed": "relative", "caption_time": True})])
def test_frame_time_positions(attention, causal, extra):
    """A sample is any subset of a longer video's frames, carrying its time indices: shifting them all by a
    constant changes nothing (RoPE is relative; the absolute embedding is spatial only), but other gaps between
    the same frames change the output."""
    model = randomize(STDiT(tiny_model_cfg(attention=attention, temporal_causal=causal, **extra), TEXT_DIM)).double()
    videos, texts, t, fps = _inputs()
    vs, ts = [videos[0], videos[2]], [texts[0], texts[2]]  # 3 and 4 frames

    def run(times):
        n = sum(token_counts([v.shape[1:] for v in vs], PATCH))
        b = pack(vs, ts, [fps[0], fps[2]], PATCH, n + 3, times=[torch.tensor(x) for x in times])
        t_frame = torch.tensor([t[0], t[2], 0.0], dtype=torch.float64)[b.frame_sample]
        return model(b.tokens, t_frame, b)[:n]

    subset = run([[0, 8, 16], [0, 8, 16, 17]])
    # RoPE angles are fp32 (as on GPU): equal to fp32 round-off
    torch.testing.assert_close(run([[100, 108, 116], [37, 45, 53, 54]]), subset, rtol=1e-4, atol=1e-6)
    contiguous = run([[0, 1, 2], [0, 1, 2, 3]])
    assert (contiguous - subset).abs().max() > 1e-3
    with pytest.raises(ValueError, match="strictly increasing"):
        run([[0, 8, 8], [0, 1, 2, 3]])


def test_caption_time_clip_scale_reads_each_frame_in_its_clip():
    """model.caption_time_scale=clip: a frame's time is its index over the length of the clip it comes from, so
    the first 4 frames of an 8-frame clip, trained as a window, get the features they have in the whole clip;
    a common shift of the time indices still changes nothing."""
    cfg = tiny_model_cfg(caption_time=True, caption_time_scale="clip")
    model = randomize(STDiT(cfg, TEXT_DIM)).double()
    video = rand_videos([(8, 4, 4)])[0].double()
    text = torch.randn(5, TEXT_DIM, dtype=torch.float64)

    def features(v, times=None, lengths=None):
        b = pack([v], [text], [8.0], PATCH, 1000, times=times, lengths=lengths)
        return model.caption_time_features(b)[:v.shape[1]]

    whole = features(video)
    window = features(video[:, :4], lengths=[8])
    torch.testing.assert_close(window, whole[:4])
    assert (features(video[:, :4]) - whole[:4]).abs().max() > 1e-2  # read as a 4-frame clip of its own
    torch.testing.assert_close(features(video[:, :4], [torch.tensor([20, 21, 22, 23])], [30]),
                               features(video[:, :4], [torch.tensor([0, 1, 2, 3])], [30]))
    with pytest.raises(ValueError, match="lengths"):
        features(video[:, :4], [torch.tensor([0, 2, 4, 6])], [6])
