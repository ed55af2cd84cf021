"""Caption encoder over `transformers`: a T5 encoder or CLIP text model, loaded from a local path or built small
with seeded random weights (demo, tests). Returns unpadded token embeddings per caption; nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

KINDS = ("t5", "clip")


def _random_model(kind: str, hidden_size, num_layers, num_heads, ff_size, max_length, vocab_size, pad_id, eos_id):
    import transformers as tf
    if kind == "t5":
        config = tf.T5Config(vocab_size=vocab_size, d_model=hidden_size, d_kv=hidden_size // num_heads, d_ff=ff_size,
                             num_layers=num_layers, num_heads=num_heads, pad_token_id=pad_id, eos_token_id=eos_id,
                             decoder_start_token_id=pad_id)
        return tf.T5EncoderModel(config)
    config = tf.CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=ff_size,
                               num_hidden_layers=num_layers, num_attention_heads=num_heads,
                               max_position_embeddings=max_length, pad_token_id=pad_id, eos_token_id=eos_id,
                               bos_token_id=eos_id)
    return tf.CLIPTextModel(config)


class TextEncoder(nn.Module):
    """Frozen caption encoder: T5 encoder or CLIP text model, from a local path or built with seeded random weights."""

    def __init__(self, kind: str = "t5", path: str | None = None, hidden_size: int = 64, num_layers: int = 2,
                 num_heads: int = 4, ff_size: int = 128, max_length: int = 64, seed: int = 0):
        super().__init__()
        import transformers as tf
        if kind not in KINDS:
            raise ValueError(f"text.kind={kind!r} is unknown; use one of {list(KINDS)}")
        self.kind, self.max_length = kind, max_length
        if path is not None:
            if not Path(path).is_dir():
                raise FileNotFoundError(f"text.path={path} is not a directory holding a transformers model")
            self.tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
            cls = tf.T5EncoderModel if kind == "t5" else tf.CLIPTextModel
            self.model = cls.from_pretrained(path, local_files_only=True)
        else:
            # ByT5's byte tokenizer needs no vocabulary file, so the demo encoder is fully self-contained
            self.tokenizer = tf.ByT5Tokenizer()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = _random_model(kind, hidden_size, num_layers, num_heads, ff_size, max_length,
                                           len(self.tokenizer), self.tokenizer.pad_token_id,
                                           self.tokenizer.eos_token_id)
        self.model.eval().requires_grad_(False)
        self.dim = self.model.config.hidden_size if kind == "clip" else self.model.config.d_model
        self._cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg) -> "TextEncoder":
        return cls(cfg.kind, cfg.path, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.ff_size, cfg.max_length,
                   cfg.seed)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        """One float32 [n_i, dim] tensor of token embeddings per caption, padding removed."""
        todo = sorted({c for c in captions if c not in self._cache})
        if todo:
            tok = self.tokenizer(todo, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            hidden = self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
            for caption, h, m in zip(todo, hidden.float(), tok.attention_mask.bool()):
                self._cache[caption] = h[m].clone()
        return [self._cache[c] for c in captions]

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # cached embeddings live on the old device / dtype
        return super()._apply(fn, *args, **kwargs)
