"""Varlen attention: the reference backend against dense masked attention, backend resolution, fast kernels on GPU."""
import pytest
import torch
import torch.nn.functional as F

from stdit.ops import BACKENDS, available_backends, resolve_backend, varlen_attention
from stdit.ops import attention as attn_mod

H, D = 3, 8
CUDA = torch.cuda.is_available()


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def qkv(len_q, len_k, dtype=torch.float64, device="cpu", grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    nq, nk = sum(len_q), sum(len_k)
    ts = [torch.randn(n, H, D, generator=g, dtype=dtype) for n in (nq, nk, nk)]
    return [t.to(device).requires_grad_(grad) for t in ts]


def dense(q, k, v, len_q, len_k, causal=False, scale=None):
    """SDPA over the whole flattened sequence with a block-diagonal (and per-block causal) boolean mask."""
    seg_q = torch.repeat_interleave(torch.arange(len(len_q)), torch.tensor(len_q))
    seg_k = torch.repeat_interleave(torch.arange(len(len_k)), torch.tensor(len_k))
    pos_q = torch.cat([torch.arange(n) for n in len_q])
    pos_k = torch.cat([torch.arange(n) for n in len_k])
    mask = seg_q[:, None] == seg_k[None, :]
    if causal:
        mask &= pos_q[:, None] >= pos_k[None, :]
    mask = mask.to(q.device)
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


def ref(q, k, v, len_q, len_k, causal=False, **kw):
    return varlen_attention(q, k, v, cu(len_q).to(q.device), cu(len_k).to(q.device), max(len_q), max(len_k),
                            causal=causal, backend="reference", **kw)


SELF_LENS = [5, 1, 7, 5, 1, 12, 3, 7, 7, 2]  # includes length 1 and repeated lengths (shared groups)
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_dense_mask(dtype, causal):
    q, k, v = qkv(SELF_LENS, SELF_LENS, dtype)
    out = ref(q, k, v, SELF_LENS, SELF_LENS, causal)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, dense(q, k, v, SELF_LENS, SELF_LENS, causal), **TOL[dtype])


def test_reference_custom_scale():
    q, k, v = qkv(SELF_LENS, SELF_LENS)
    torch.testing.assert_close(ref(q, k, v, SELF_LENS, SELF_LENS, scale=0.3),
                               dense(q, k, v, SELF_LENS, SELF_LENS, scale=0.3), **TOL[torch.float64])


def test_reference_cross_attention():
    len_q, len_k = [6, 1, 9, 6, 4], [3, 5, 3, 3, 1]
    q, k, v = qkv(len_q, len_k)
    torch.testing.assert_close(ref(q, k, v, len_q, len_k), dense(q, k, v, len_q, len_k), **TOL[torch.float64])


def test_reference_zero_length_q_segments_are_skipped():
    len_q, len_k = [4, 0, 3, 0], [2, 5, 3, 1]
    q, k, v = qkv(len_q, len_k)
    out = ref(q, k, v, len_q, len_k)
    torch.testing.assert_close(out, dense(q, k, v, len_q, len_k), **TOL[torch.float64])


@pytest.mark.parametrize("causal", [False, True])
def test_reference_gradients_match_dense(causal):
    lens = SELF_LENS
    q, k, v = qkv(lens, lens, grad=True)
    w = torch.randn(q.shape, dtype=q.dtype)  # a random cotangent, so every output element matters
    grads = torch.autograd.grad((ref(q, k, v, lens, lens, causal) * w).sum(), (q, k, v))
    want = torch.autograd.grad((dense(q, k, v, lens, lens, causal) * w).sum(), (q, k, v))
    for g, e in zip(grads, want):
        torch.testing.assert_close(g, e, **TOL[torch.float64])


def test_reference_cross_attention_gradients():
    len_q, len_k = [6, 1, 9, 6], [3, 5, 3, 3]
    q, k, v = qkv(len_q, len_k, grad=True)
    grads = torch.autograd.grad(ref(q, k, v, len_q, len_k).pow(2).sum(), (q, k, v))
    want = torch.autograd.grad(dense(q, k, v, len_q, len_k).pow(2).sum(), (q, k, v))
    for g, e in zip(grads, want):
        torch.testing.assert_close(g, e, **TOL[torch.float64])


@pytest.mark.parametrize("causal", [False, True])
def test_segments_are_isolated(causal):
    lens = SELF_LENS
    q, k, v = qkv(lens, lens)
    out = ref(q, k, v, lens, lens, causal)
    c = cu(lens).tolist()
    other = torch.ones(q.shape[0], dtype=torch.bool)
    other[c[2]:c[3]] = False  # perturb every token outside segment 2
    q2, k2, v2 = (t + 10 * other[:, None, None] * torch.randn_like(t) for t in (q, k, v))
    out2 = ref(q2, k2, v2, lens, lens, causal)
    torch.testing.assert_close(out2[c[2]:c[3]], out[c[2]:c[3]], atol=1e-12, rtol=0)
    assert not torch.allclose(out2[other], out[other])


def test_causal_needs_equal_lengths():
    q, k, v = qkv([3, 4], [4, 3])
    with pytest.raises(ValueError, match="causal"):
        varlen_attention(q, k, v, cu([3, 4]), cu([4, 3]), 4, 4, causal=True, backend="reference")


def test_reference_many_tiny_segments_matches_loop():
    """Temporal attention shape: thousands of length-8 segments plus ragged ones, checked against a per-segment loop."""
    lens = [8] * 500 + [3, 5, 8, 1]
    q, k, v = qkv(lens, lens, torch.float32, grad=True)
    out = ref(q, k, v, lens, lens, causal=True)
    c = cu(lens).tolist()
    loop = torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True)
                      .transpose(0, 1) for a, b in zip(c[:-1], c[1:])])
    torch.testing.assert_close(out, loop, **TOL[torch.float32])
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_resolve_backend_on_cpu():
    assert available_backends("cpu") == ["dense", "reference"]
    assert resolve_backend("auto", "cpu") == "reference"
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "reference"
    assert resolve_backend("auto", "cpu", torch.float32, kind="temporal") == "dense"  # per kind
    assert resolve_backend("auto", "cpu", torch.float32, kind="spatial") == "reference"
    assert resolve_backend("reference", "cpu", kind="temporal") == "reference"  # a named one is what it says
    assert resolve_backend("reference", "cpu") == "reference"
    assert resolve_backend("dense", "cpu") == "dense"
    for name in ("flash_attn", "torch_varlen"):
        with pytest.raises(ValueError, match="model.attention_backend") as e:
            resolve_backend(name, "cpu")
        assert "Available here: ['dense', 'reference']" in str(e.value)
    with pytest.raises(ValueError, match="model.attention_backend") as e:
        resolve_backend("xformers", "cpu")
    assert all(b in str(e.value) for b in BACKENDS)
    with pytest.raises(ValueError, match="model.attention_backend"):
        varlen_attention(*qkv([2], [2]), cu([2]), cu([2]), 2, 2, backend="flash_attn")


def test_fp32_casting_with_a_fake_fast_backend(monkeypatch):
    """The dtype rules, checked on CPU by pretending flash_attn runs here (it records dtypes, computes exactly)."""
    seen = []

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        seen.append((q.dtype, k.dtype, v.dtype, cu_q.dtype))
        return attn_mod._reference(q, k, v, cu_q, cu_k, causal, scale)

    monkeypatch.setitem(attn_mod._KERNELS, "flash_attn", fake)
    monkeypatch.setattr(attn_mod, "_unavailable", lambda name, device: None if name != "torch_varlen" else "no")
    lens = [4, 2, 4]
    q, k, v = qkv(lens, lens, torch.float32)
    args = (cu(lens), cu(lens), 4, 4)
    assert varlen_attention(q, k, v, *args).dtype == torch.float32 and not seen  # auto + fp32 -> reference
    out = varlen_attention(q, k, v, *args, backend="flash_attn")  # named: cast to bf16 and back
    assert out.dtype == torch.float32 and seen.pop() == (torch.bfloat16,) * 3 + (torch.int32,)
    torch.testing.assert_close(out, ref(q, k, v, lens, lens), atol=3e-2, rtol=3e-2)
    with torch.autocast("cpu", dtype=torch.float16):  # auto under autocast: the autocast dtype, fast kernel
        assert varlen_attention(q, k, v, *args).dtype == torch.float32
    assert seen.pop()[0] == torch.float16
    assert varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), *args).dtype == torch.bfloat16
    assert seen.pop()[0] == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------
# dense: runs of equal segments as batched SDPA, against the reference kernel
# ----------------------------------------------------------------------------------------------------------

def dense_backend(q, k, v, len_q, len_k, causal=False, runs=True, **kw):
    """The dense backend, with the runs given host-side (as packing gives them) or read from cu_seqlens."""
    given = attn_mod.length_runs(len_q, len_k) if runs else None
    return varlen_attention(q, k, v, cu(len_q).to(q.device), cu(len_k).to(q.device), max(len_q), max(len_k),
                            causal=causal, backend="dense", runs=given, **kw)


TEMPORAL_LENS = [1] * 6 + [5] * 40 + [9] * 30 + [17] * 12  # columns sorted by frame count, as packing lays them


@pytest.mark.parametrize("lens", [SELF_LENS, TEMPORAL_LENS])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("runs", [True, False])
def test_dense_matches_reference_forward_and_backward(lens, causal, runs):
    q, k, v = qkv(lens, lens, grad=True)
    w = torch.randn(q.shape, dtype=q.dtype)
    out = dense_backend(q, k, v, lens, lens, causal, runs)
    want = ref(q, k, v, lens, lens, causal)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    for g, e in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((want * w).sum(), (q, k, v))):
        torch.testing.assert_close(g, e, **TOL[torch.float64])


def test_dense_cross_attention_and_empty_segments():
    len_q, len_k = [6, 1, 0, 9, 6, 4, 3], [3, 5, 2, 3, 3, 1, 0]  # a query segment without keys gets output 0
    q, k, v = qkv(len_q, len_k, grad=True)
    out = dense_backend(q, k, v, len_q, len_k)
    torch.testing.assert_close(out, ref(q, k, v, len_q, len_k), **TOL[torch.float64])
    assert not out[-3:].any()
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    want = torch.autograd.grad(ref(q, k, v, len_q, len_k).pow(2).sum(), (q, k, v))
    for g, e in zip(grads, want):
        torch.testing.assert_close(g, e, **TOL[torch.float64])
    with pytest.raises(ValueError, match="runs cover"):  # runs that do not describe q, k
        varlen_attention(q, k, v, cu(len_q), cu(len_k), 9, 5, backend="dense", runs=torch.tensor([[6, 3, 1]]))


@pytest.mark.parametrize("causal", [False, True])
def test_dense_under_bf16_autocast_matches_reference(causal):
    lens = TEMPORAL_LENS
    q, k, v = qkv(lens, lens, torch.float32, grad=True)
    w = torch.randn(q.shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dense_backend(q, k, v, lens, lens, causal)
        want = ref(q, k, v, lens, lens, causal)
    assert out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=1e-2, rtol=1e-2)
    exact = dense(q, k, v, lens, lens, causal)  # fp32, no autocast: within bf16 round-off of it
    torch.testing.assert_close(out, exact, atol=3e-2, rtol=3e-2)
    for g, e in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((want * w).sum(), (q, k, v))):
        torch.testing.assert_close(g, e, atol=3e-2, rtol=3e-2)


def test_dense_with_runs_never_reads_the_boundaries():
    """Given the runs, dense reads nothing of cu_seqlens: here they live on the meta device, where any read (a
    device->host copy on GPU) would fail. auto takes dense for temporal attention only, and only with runs."""
    lens = TEMPORAL_LENS
    q, k, v = qkv(lens, lens, torch.float32)
    meta = cu(lens).to("meta")
    runs = attn_mod.length_runs(lens)
    out = varlen_attention(q, k, v, meta, meta, 17, 17, causal=True, runs=runs, kind="temporal")  # auto
    torch.testing.assert_close(out, ref(q, k, v, lens, lens, causal=True), **TOL[torch.float32])
    with pytest.raises(Exception):  # spatial's auto is the reference kernel, which groups on the host
        varlen_attention(q, k, v, meta, meta, 17, 17, runs=runs, kind="spatial")
    assert attn_mod.length_runs([3, 3, 1, 3], [2, 2, 2, 2]).tolist() == [[3, 2, 2], [1, 2, 1], [3, 2, 1]]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("causal", [False, True])
def test_dense_on_gpu_matches_the_varlen_kernels_without_a_sync(causal):
    """Temporal shapes in bf16: dense against every varlen backend here, and no device->host sync with runs."""
    lens = TEMPORAL_LENS
    q, k, v = qkv(lens, lens, torch.float32, "cuda", grad=True)
    want = ref(q, k, v, lens, lens, causal)
    w = torch.randn_like(want)
    want_grads = torch.autograd.grad((want * w).sum(), (q, k, v))
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    c, runs = cu(lens).cuda(), attn_mod.length_runs(lens)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = varlen_attention(qb, kb, vb, c, c, max(lens), max(lens), causal=causal, runs=runs, kind="temporal")
        grads = torch.autograd.grad((out.float() * w).sum(), (qb, kb, vb))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    for g, e in zip(grads, want_grads):
        torch.testing.assert_close(g.float(), e, atol=8e-2, rtol=5e-2)
    for name in [b for b in available_backends("cuda") if b not in ("dense", "reference")]:
        other = varlen_attention(qb, kb, vb, c, c, max(lens), max(lens), causal=causal, backend=name)
        torch.testing.assert_close(out.float(), other.float(), atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_fast_backends_match_reference(causal, cross):
    fast = [b for b in available_backends("cuda") if b != "reference"]
    if not fast:
        pytest.skip("no fast backend available on this GPU (flash-attn not installed, torch without varlen_attn)")
    if causal and cross:
        pytest.skip("causal is only defined for self-attention")
    len_q = [64, 1, 130, 64, 17, 256, 8, 8]
    len_k = [32, 7, 77, 64, 1, 100, 8, 3] if cross else len_q
    q, k, v = qkv(len_q, len_k, torch.float32, "cuda", grad=True)
    want = ref(q, k, v, len_q, len_k, causal)
    w = torch.randn_like(want)
    want_grads = torch.autograd.grad((want * w).sum(), (q, k, v))
    for name in fast:
        qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
        out = varlen_attention(qb, kb, vb, cu(len_q).cuda(), cu(len_k).cuda(), max(len_q), max(len_k),
                               causal=causal, backend=name)
        assert out.dtype == torch.bfloat16, name
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")
        grads = torch.autograd.grad((out.float() * w).sum(), (qb, kb, vb))
        for g, e in zip(grads, want_grads):
            torch.testing.assert_close(g.float(), e, atol=8e-2, rtol=5e-2, msg=lambda m: f"{name} grad: {m}")
        out32 = varlen_attention(q.detach(), k.detach(), v.detach(), cu(len_q).cuda(), cu(len_k).cuda(),
                                 max(len_q), max(len_k), causal=causal, backend=name)  # fp32 in: cast and back
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32, want.detach(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_on_gpu():
    fast = [b for b in available_backends("cuda") if b not in ("dense", "reference")]
    assert resolve_backend("auto", "cuda", torch.float32) == "reference"
    assert resolve_backend("auto", "cuda", torch.bfloat16) == (fast[0] if fast else "reference")
    assert resolve_backend("auto", "cuda", torch.bfloat16, kind="temporal") == "dense"


def test_backend_keys_are_checked_by_name():
    from stdit.config import ConfigError, load_config
    for key in ("model.attention_backend", "model.temporal_attention_backend"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}=cudnn"])
        assert load_config(None, [f"{key}=dense"]) is not None
