"""Caption encoder: seeded random T5 / CLIP, unpadded, batch-invariant, cached, loadable from a local path."""
from types import SimpleNamespace

import pytest
import torch

from stdit.models.text import TextEncoder

SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, ff_size=64)
CAPS = ["a red square moving left on a blue background", "", "a cyan circle on a black background", "x"]


def small(kind, seed=1, **kw):
    return TextEncoder(kind, seed=seed, **{**SMALL, **kw})


@pytest.fixture(scope="module", params=["t5", "clip"])
def kind_and_encoder(request):
    return request.param, small(request.param)


def test_seeded_and_leaves_global_rng_alone(kind_and_encoder):
    kind, enc = kind_and_encoder
    state = torch.get_rng_state()
    again = small(kind)
    assert torch.equal(state, torch.get_rng_state())
    for a, b in zip(again.encode(CAPS), enc.encode(CAPS)):
        assert torch.equal(a, b)
    other = small(kind, seed=2)
    assert not torch.allclose(other.encode(CAPS[:1])[0], enc.encode(CAPS[:1])[0])


def test_unpadded_lengths_and_dims(kind_and_encoder):
    _, enc = kind_and_encoder
    assert enc.dim == 32 and not enc.model.training
    assert not any(p.requires_grad for p in enc.parameters())
    out = enc.encode(CAPS)
    counts = [len(enc.tokenizer(c).input_ids) for c in CAPS]
    assert counts == [len(c.encode()) + 1 for c in CAPS]  # ByT5: one token per byte + EOS
    assert [tuple(o.shape) for o in out] == [(n, 32) for n in counts]
    assert all(o.dtype == torch.float32 and o.device == enc.device for o in out)
    assert out[1].shape[0] >= 1  # "" (the unconditional caption) still has its EOS token


def test_truncation(kind_and_encoder):
    kind, _ = kind_and_encoder
    enc = small(kind, max_length=8)
    (long,) = enc.encode(["a very long caption indeed"])
    assert long.shape == (8, 32)


def test_batch_equals_one_by_one_and_cache_is_safe(kind_and_encoder):
    kind, _ = kind_and_encoder
    batch = small(kind).encode(CAPS)
    single = small(kind)
    for c, b in zip(CAPS, batch):  # bit for bit: a caption's embedding never depends on its company
        assert torch.equal(single.encode([c])[0], b)
    # cached: repeated captions in one call, and a mutated result must not leak into later calls
    first = single.encode([CAPS[0], CAPS[0]])
    assert torch.equal(first[0], first[1]) and first[0].data_ptr() != first[1].data_ptr()
    first[0].zero_()
    torch.testing.assert_close(single.encode([CAPS[0]])[0], batch[0], rtol=1e-5, atol=1e-5)


def test_a_step_of_captions_is_one_batched_forward(kind_and_encoder):
    """New captions go through the encoder BATCH at a time, padded and masked: each embedding equals the caption
    encoded alone without padding (to round-off) and, bit for bit, the same caption in any other company."""
    kind, _ = kind_and_encoder
    caps = [f"a {c} {s} moving {d}" for c, s, d in zip(["red", "blue", "green", "cyan", "white"] * 3,
                                                      ["square", "circle", "triangle"] * 5, ["left", "up"] * 8)]
    caps = list(dict.fromkeys(caps + CAPS))  # 16 distinct captions of several lengths, "" among them
    enc = small(kind)
    calls = []
    enc.model.register_forward_hook(lambda m, args, kw, out: calls.append(kw["input_ids"].shape), with_kwargs=True)
    got = enc.encode(caps + caps[:3])  # repeats in one call are encoded once
    assert len(calls) == -(-len(caps) // enc.BATCH) and all(c == (enc.BATCH, enc.max_length) for c in calls)
    alone = small(kind)
    for c, e in zip(caps + caps[:3], got):
        assert torch.equal(alone.encode([c])[0], e), c  # another company: the caption alone in its batch
        tok = alone.tokenizer([c], truncation=True, max_length=alone.max_length, return_tensors="pt")
        unpadded = alone.model(**tok).last_hidden_state[0]
        torch.testing.assert_close(e, unpadded, rtol=1e-5, atol=1e-5)


def test_cache_is_bounded():
    enc = small("t5", cache_elements=32 * 20)
    ref = small("t5").encode(CAPS)
    for _ in range(2):
        for c, r in zip(CAPS, enc.encode(CAPS)):
            torch.testing.assert_close(enc.encode([c])[0], r, rtol=1e-5, atol=1e-5)
    assert enc._cached_elements <= 32 * 20 and sum(v.numel() for v in enc._cache.values()) == enc._cached_elements
    torch.testing.assert_close(enc.encode(CAPS)[0], ref[0], rtol=1e-5, atol=1e-5)


def test_train_mode_keeps_the_encoder_deterministic():
    enc = small("t5")
    ref = enc.encode(["abc"])[0]
    enc.train()
    assert not enc.model.training
    enc._cache.clear()
    assert torch.equal(enc.encode(["abc"])[0], ref)


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_save_and_load_from_path(kind, tmp_path):
    enc = small(kind)
    enc.model.save_pretrained(tmp_path / "enc")
    enc.tokenizer.save_pretrained(tmp_path / "enc")
    loaded = TextEncoder.from_config(SimpleNamespace(kind=kind, path=str(tmp_path / "enc"), hidden_size=999,
                                                     num_layers=9, num_heads=9, ff_size=9, max_length=64, seed=5))
    assert loaded.dim == 32  # from the checkpoint, not the (ignored) size arguments
    for a, b in zip(loaded.encode(CAPS), enc.encode(CAPS)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    other = "clip" if kind == "t5" else "t5"
    with pytest.raises(ValueError, match="text.kind"):
        TextEncoder(other, path=str(tmp_path / "enc"))


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="text.path"):
        TextEncoder("t5", path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"text\.kind.*'t5', 'clip'"):
        TextEncoder("bert")


def test_word_tokenizer_gives_each_synthetic_word_its_own_token():
    """Captions that differ in one word differ in exactly that token; no synthetic caption word is unknown."""
    from stdit.data.synthetic import COLOURS, DIRECTIONS, SHAPES, SyntheticClips
    from stdit.models.text import WORD_VOCAB, build_tokenizer
    tok = build_tokenizer("word")
    data = SyntheticClips(300, [[8, 8]], [1, 4], [8.0], round_trips=0.5)
    words = {w for i in range(300) for w in data[i].caption.split()}
    words |= set(COLOURS) | set(SHAPES) | set(DIRECTIONS)
    assert words <= set(WORD_VOCAB)
    assert WORD_VOCAB[:3] == ("[PAD]", "[EOS]", "[UNK]") and len(set(WORD_VOCAB)) == len(WORD_VOCAB)
    ids = lambda c: tok(c).input_ids  # noqa: E731
    base = ids("a red square moving left on a blue background")
    assert base[-1] == tok.eos_token_id and tok.unk_token_id not in base and len(base) == 10
    for other in ("a red square moving left on a green background", "a yellow square moving left on a blue "
                  "background", "a red circle moving left on a blue background",
                  "a red square moving up on a blue background"):
        diff = [i for i, (x, y) in enumerate(zip(base, ids(other))) if x != y]
        assert len(ids(other)) == len(base) and len(diff) == 1
    assert ids("") == [tok.eos_token_id]  # the unconditional caption keeps one token
    assert ids("A RED zebra") == [WORD_VOCAB.index("a"), WORD_VOCAB.index("red"), tok.unk_token_id, tok.eos_token_id]
    with pytest.raises(ValueError, match="text.tokenizer"):
        build_tokenizer("bpe")


def test_a_new_word_leaves_the_word_encoder_unchanged(monkeypatch):
    """Appending a word to the vocabulary must not change a trained run's frozen encoder (its random weights)."""
    import stdit.models.text as text
    caption = "a red square moving left and back on a blue background"
    before = small("t5", tokenizer="word").encode([caption])[0]
    monkeypatch.setattr(text, "WORD_VOCAB", text.WORD_VOCAB + ("sideways",))
    after = small("t5", tokenizer="word")
    assert torch.equal(after.encode([caption])[0], before)
    assert after.tokenizer("sideways").input_ids[0] == len(text.WORD_VOCAB) - 1


def test_word_encoder_is_seeded_and_separates_colours():
    enc = small("t5", tokenizer="word")
    a, b = "a red square moving left on a blue background", "a red square moving left on a green background"
    ea, eb = enc.encode([a, b])
    assert ea.shape == eb.shape == (10, 32)
    for x, y in zip(small("t5", tokenizer="word").encode([a, b]), (ea, eb)):
        assert torch.equal(x, y)
    assert not torch.allclose(small("t5", seed=2, tokenizer="word").encode([a])[0], ea)
    # the colour word's own token differs a lot (not a few shared bytes in a long caption)
    cos = torch.nn.functional.cosine_similarity(ea[7], eb[7], dim=0)
    assert cos < 0.9


def test_config_without_tokenizer_builds_the_byte_encoder(tmp_path):
    """A checkpoint's config.yaml from before text.tokenizer existed loads with the byte tokenizer: the same
    text encoder as before."""
    from stdit.config import load_config, save_config
    path = tmp_path / "config.yaml"
    save_config(load_config(None, ["text.hidden_size=32", "text.num_layers=1", "text.num_heads=2",
                                   "text.ff_size=64"]), path)
    path.write_text("\n".join(x for x in path.read_text().splitlines() if "tokenizer:" not in x) + "\n")
    cfg = load_config(path)
    assert cfg.text.tokenizer == "byte"
    for x, y in zip(TextEncoder.from_config(cfg.text).encode(CAPS), small("t5", seed=0).encode(CAPS)):
        assert torch.equal(x, y)


def test_position_bias_scale_makes_a_words_role_visible():
    """At transformers' init a random T5 is nearly a bag of words: 'blue' naming the object or the background
    embeds the same. A larger relative position bias mixes each token with its neighbours, so the role shows
    (what the demo's STDiT needs to tell object from background colour); the word itself still shows too."""
    cos = torch.nn.functional.cosine_similarity
    fg_blue, bg_blue = "a blue square moving left on a red background", "a red square moving left on a blue background"
    roles = {}
    for scale in (1.0, 16.0):
        enc = TextEncoder("t5", tokenizer="word", position_bias_scale=scale)
        a, b = enc.encode([fg_blue, bg_blue])
        roles[scale] = (cos(a[1], b[7], dim=0).item(), cos(a[1], b[1], dim=0).item())  # blue@fg~blue@bg, blue~red
    assert roles[1.0][0] > 0.99 and roles[16.0][0] < 0.8 and roles[16.0][1] < 0.8
    with pytest.raises(ValueError, match="position_bias_scale"):
        TextEncoder("clip", position_bias_scale=2.0)
