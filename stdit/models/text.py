"""Caption encoder over `transformers`: a T5 encoder or CLIP text model, loaded from a local path or built small
with seeded random weights (demo, tests). Returns unpadded token embeddings per caption; nothing is downloaded.

The random encoder's tokenizer (`text.tokenizer`): `byte` (ByT5's, one token per UTF-8 byte: any text) or `word`
(one token per word of the synthetic world's captions, stdit/data/synthetic.py). With random weights a word is
only as distinguishable as its tokens: bytes spread a colour over several tokens shared with other words, and the
demo's STDiT never learned to follow captions through them (issue 13); one random embedding per word it does."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

KINDS = ("t5", "clip")
TOKENIZERS = ("byte", "word")
# The word tokenizer's vocabulary: specials, then every word of the synthetic captions (stdit/data/synthetic.py).
# Frozen: a word's id (hence its embedding) must never change, or a trained checkpoint's text encoder would; add
# new words at the end only (tests/test_text.py checks that every synthetic caption word is here). The random
# model has VOCAB_ROWS embedding rows while the vocabulary fits in them, so its weights (every random draw) stay
# the same when a word is added.
WORD_VOCAB = ("[PAD]", "[EOS]", "[UNK]",
              "a", "an", "on", "background", "moving",
              "red", "green", "blue", "yellow", "cyan", "magenta", "white", "black", "orange", "purple",
              "square", "circle", "triangle", "diamond",
              "left", "right", "up", "down",
              "and", "back")
VOCAB_ROWS = 64
# checkpoint model types each kind's model class loads correctly (a mismatch would give garbage embeddings)
_MODEL_TYPES = {"t5": ("t5", "mt5"), "clip": ("clip", "clip_text_model")}


def build_tokenizer(name: str = "byte"):
    """The random encoder's tokenizer: `byte` (ByT5) or `word` (WORD_VOCAB; other words are [UNK]). Every caption
    ends with an EOS token, so the empty caption (classifier-free guidance) still has one token."""
    import transformers as tf
    if name == "byte":
        return tf.ByT5Tokenizer()
    if name != "word":
        raise ValueError(f"text.tokenizer={name!r} is unknown; use one of {list(TOKENIZERS)}")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    vocab = {w: i for i, w in enumerate(WORD_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", vocab["[EOS]"])])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def _random_model(kind: str, hidden_size, num_layers, num_heads, ff_size, max_length, tokenizer,
                  position_bias_scale: float = 1.0):
    """A small model with the current torch RNG's weights, its ids matching `tokenizer`. T5's relative position
    bias is multiplied by `position_bias_scale` (see TextEncoder)."""
    import transformers as tf
    vocab, pad, eos = max(len(tokenizer), VOCAB_ROWS), tokenizer.pad_token_id, tokenizer.eos_token_id
    if kind == "t5":
        config = tf.T5Config(vocab_size=vocab, d_model=hidden_size, d_kv=hidden_size // num_heads, d_ff=ff_size,
                             num_layers=num_layers, num_heads=num_heads, pad_token_id=pad, eos_token_id=eos,
                             decoder_start_token_id=pad)
        model = tf.T5EncoderModel(config)
        if position_bias_scale != 1.0:
            with torch.no_grad():
                for block in model.encoder.block:
                    attention = block.layer[0].SelfAttention
                    if attention.has_relative_attention_bias:
                        attention.relative_attention_bias.weight.mul_(position_bias_scale)
        return model
    # ByT5 has no BOS token; CLIP needs a position for every token, EOS included
    config = tf.CLIPTextConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=ff_size,
                               num_hidden_layers=num_layers, num_attention_heads=num_heads,
                               max_position_embeddings=max_length, pad_token_id=pad, eos_token_id=eos,
                               bos_token_id=None)
    return tf.CLIPTextModel(config)


class TextEncoder(nn.Module):
    """Frozen caption encoder: T5 encoder or CLIP text model, from a local path or built with seeded random weights."""

    BATCH = 8  # captions per encoder forward (a fixed shape: see _embed)

    def __init__(self, kind: str = "t5", path: str | None = None, hidden_size: int = 64, num_layers: int = 2,
                 num_heads: int = 4, ff_size: int = 128, max_length: int = 64, seed: int = 0,
                 cache_elements: int = 2 ** 25, tokenizer: str = "byte", position_bias_scale: float = 1.0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"text.kind={kind!r} is unknown; use one of {list(KINDS)}")
        if position_bias_scale != 1.0 and kind != "t5" and path is None:  # a loaded model keeps its own bias
            raise ValueError("text.position_bias_scale scales the random T5 encoder's relative position bias; "
                             "it needs text.kind=t5")
        if max_length < 1:
            raise ValueError(f"text.max_length must be >= 1, got {max_length}")
        import transformers as tf
        self.kind, self.max_length = kind, max_length
        model_cls = tf.T5EncoderModel if kind == "t5" else tf.CLIPTextModel
        if path is not None:
            if not Path(path).is_dir():
                raise FileNotFoundError(f"text.path={path} is not a directory holding a transformers model")
            model_type = tf.AutoConfig.from_pretrained(path, local_files_only=True).model_type
            if model_type not in _MODEL_TYPES[kind]:
                raise ValueError(f"text.path={path} holds a {model_type!r} model, which text.kind={kind!r} "
                                 f"cannot load; expected one of {list(_MODEL_TYPES[kind])}")
            self.tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = model_cls.from_pretrained(path, local_files_only=True)
            if kind == "clip":  # learned positions: longer inputs would index past the table
                self.max_length = min(max_length, self.model.config.max_position_embeddings)
        else:
            if hidden_size % num_heads:
                raise ValueError(f"text.hidden_size={hidden_size} must be divisible by text.num_heads={num_heads}")
            # neither tokenizer needs a vocabulary file, so the demo encoder is fully self-contained
            self.tokenizer = build_tokenizer(tokenizer)
            with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
                torch.manual_seed(seed)
                self.model = _random_model(kind, hidden_size, num_layers, num_heads, ff_size, max_length,
                                           self.tokenizer, position_bias_scale)
        if self.tokenizer.pad_token is None:  # padding is masked out anyway; any token will do
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.eval().requires_grad_(False)
        self.dim = self.model.config.hidden_size  # T5Config maps hidden_size to d_model
        # caption -> embedding, least recently used first; bounded by elements so real, mostly unique captions
        # cannot fill the accelerator's memory
        self._cache: dict[str, torch.Tensor] = {}
        self._cached_elements, self.cache_elements = 0, cache_elements

    @classmethod
    def from_config(cls, cfg) -> "TextEncoder":
        """Build from a config section with kind, path, hidden_size, num_layers, num_heads, ff_size, max_length, seed
        and optionally tokenizer (default byte) and position_bias_scale (default 1)."""
        return cls(cfg.kind, cfg.path, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.ff_size, cfg.max_length,
                   cfg.seed, tokenizer=getattr(cfg, "tokenizer", "byte"),
                   position_bias_scale=getattr(cfg, "position_bias_scale", 1.0))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "TextEncoder":
        """The encoder stays in eval mode (no dropout) whatever a parent module asks for: it is frozen."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def _embed(self, captions: list[str]) -> list[torch.Tensor]:
        """Forward passes of one fixed shape [BATCH, max_length]: captions padded to max_length (the attention mask
        hides the padding, which is dropped from the result), a short batch filled with empty captions. The same
        shape runs the same kernels for every row, so a caption's embedding never depends on its company (padding
        to the longest caption of a batch would change its floating-point result slightly, and a resumed run,
        whose cache starts empty, would drift from an uninterrupted one)."""
        out = []
        for i in range(0, len(captions), self.BATCH):
            chunk = captions[i:i + self.BATCH]
            tok = self.tokenizer(chunk + [""] * (self.BATCH - len(chunk)), padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
            out += [h[m] for h, m in zip(hidden.float(), tok.attention_mask.bool())][:len(chunk)]
        return out

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        """One float32 [n_i, dim] tensor of token embeddings per caption, padding removed, on the module's device.

        Results are cached per caption; callers get their own copies, so mutating them cannot corrupt the cache.
        """
        found = {}
        for c in dict.fromkeys(captions):
            if c in self._cache:
                found[c] = self._cache[c] = self._cache.pop(c)  # move to the most recently used end
        # the new captions in batched forward passes of one fixed shape (see _embed); for throughput at scale,
        # cache the embeddings once (`stdit data cache`)
        new = sorted(c for c in dict.fromkeys(captions) if c not in found)
        for c, emb in zip(new, self._embed(new)):
            found[c] = emb
            self._remember(c, emb)
        return [found[c].clone() for c in captions]

    def _remember(self, caption: str, emb: torch.Tensor) -> None:
        self._cache[caption] = emb
        self._cached_elements += emb.numel()
        while self._cached_elements > self.cache_elements and self._cache:
            self._cached_elements -= self._cache.pop(next(iter(self._cache))).numel()

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # cached embeddings live on the old device / dtype
        self._cached_elements = 0
        return super()._apply(fn, *args, **kwargs)
