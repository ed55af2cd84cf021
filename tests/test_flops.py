import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from stdit.flops import forward_flops
from stdit.grid import token_grid
from stdit.models.stdit import STDiT
from stdit.packing import pack, token_counts

from conftest import rand_videos, tiny_model_cfg

SHAPES = [(3, 8, 12), (1, 6, 6), (4, 4, 8)]


def _math_sdpa(q, k, v, is_causal=False, scale=None, **_):
    """Attention as two explicit matmuls, which FlopCounterMode counts (it does not count CPU SDPA kernels)."""
    s = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    if is_causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("attention", ["factorized", "full"])
def test_flop_formula_matches_counted_matmuls(attention, monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _math_sdpa)
    cfg = tiny_model_cfg(attention=attention, hidden_size=48, num_heads=4)
    model = STDiT(cfg, 16)
    videos = rand_videos(SHAPES)
    texts = [torch.randn(3 + 2 * i, 16) for i in range(len(SHAPES))]
    n = sum(token_counts([v.shape[1:] for v in videos], (1, 2, 2)))
    b = pack(videos, texts, [8.0] * 3, (1, 2, 2), n)  # no padding: the formula counts real tokens
    t = torch.full((b.frame_sample.shape[0],), 0.5)
    with FlopCounterMode(display=False) as counter:
        model(b.tokens, t, b)
    counted = counter.get_total_flops()
    expected = forward_flops(cfg, 16, [token_grid(v.shape[1:], (1, 2, 2)) for v in videos], [x.shape[0] for x in texts])
    # the timestep/fps embedders and adaLN-single are per frame and left out of the formula: within 5%
    assert abs(expected - counted) <= 0.05 * counted, (expected, counted)
