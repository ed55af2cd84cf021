"""Tiny randomly initialised transformers models, built and saved in a test's folder, for the plumbing of
captioning and prompt expansion (never their quality): a byte-level BPE tokenizer trained by `tokenizers` on a few
sentences, a chat template, a LLaVA vision-language model (CLIP vision tower, Qwen2 language model) and a Qwen2
causal LM. Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

CORPUS = ["a red circle moving left on a blue background", "describe this video in detail, as one paragraph",
          "a text-to-video model was trained on captions like these", "rewrite the prompt below as one caption",
          "the main subjects and how they look, what moves and how, the setting, colours and lighting"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
            "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]


def tokenizer():
    """A fast tokenizer with the special tokens and chat template the models use; eos <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = TEMPLATE
    return hf


def _text_config(tok) -> dict:
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])


def _generation(model, tok) -> None:
    """At least 3 new tokens, never a special one but the end: the decoded text is never empty."""
    g = model.generation_config
    g.eos_token_id, g.pad_token_id = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    g.min_new_tokens = 3
    g.suppress_tokens = [tok.convert_tokens_to_ids(t) for t in SPECIAL if t != "<|im_end|>"]


def tiny_vlm(path: Path, seed: int = 0) -> Path:
    """A LLaVA model (16x16 images, 4 tokens each) and its processor saved in `path`."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    tok = tokenizer()
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, chat_template=TEMPLATE,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(text_config=dict(model_type="qwen2", **_text_config(tok)),
                         vision_config=dict(model_type="clip_vision_model", image_size=16, patch_size=8,
                                            hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2),
                         image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _generation(model, tok)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_lm(path: Path, seed: int = 0) -> Path:
    """A Qwen2 causal LM and its tokenizer (with chat template) saved in `path`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tok = tokenizer()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**_text_config(tok)))
    _generation(model, tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
