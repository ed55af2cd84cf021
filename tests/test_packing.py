import pytest
import torch

from stdit.data.binpack import first_fit_decreasing
from stdit.packing import pack, patchify, token_counts, unpack, unpatchify

from conftest import rand_videos

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
    # spatial: one segment per frame, padding its own
    assert torch.diff(b.cu_spatial).tolist() == [h * w for t, h, w in grids for _ in range(t)] + [pad]
    # full / cross: one per video; text segments are the unpadded captions (+1 dummy token for padding)
    assert torch.diff(b.cu_full).tolist() == [t * h * w for t, h, w in grids] + [pad]
    assert torch.diff(b.cu_text).tolist() == [2, 3, 4, 5, 1]
    # temporal: after the permutation each segment is one (video, row, column) in ascending time
    c = b.coords[b.temporal_perm]
    s = b.token_sample[b.temporal_perm]
    cu = b.cu_temporal.tolist()
    assert len(cu) - 1 == sum(h * w for _, h, w in grids) + 1
    for a, e in zip(cu[:-2], cu[1:-1]):
        assert (s[a:e] == s[a]).all() and (c[a:e, 1:] == c[a, 1:]).all()
        assert c[a:e, 0].tolist() == list(range(e - a))
    assert torch.equal(b.temporal_perm[b.temporal_inv], torch.arange(200))
    # frames: per-token frame ids agree with coordinates and samples
    assert torch.equal(b.frame_sample[b.token_frame], b.token_sample)
    assert b.frame_sample.tolist() == [0] * 3 + [1] + [2] * 5 + [3] * 2 + [4]


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
