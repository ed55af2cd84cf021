"""Prompt expansion: a user's short prompt rewritten into a caption in the style of the training captions, by a
local instruct language model (transformers AutoTokenizer + AutoModelForCausalLM from a folder, local files only;
its chat template), before generating.

The model is shown a few training captions as examples of the style (style_examples: drawn with the seed from
the run's data: the caption manifest data.captions, the shards' captions, or the synthetic world's), and asked
to rewrite the prompt as one such caption, keeping what it says. Greedy decoding by default, so the same prompt
gives the same expansion; with a temperature > 0 the draw is seeded by (seed, prompt). `stdit prompt expand`,
`stdit generate --expand-prompt MODEL` (the record is stored beside the video as VIDEO.prompt.json) and `stdit
eval --expand-prompt MODEL` (short and expanded prompts side by side) use it.
"""
from __future__ import annotations

import json
import random
import sys
import zlib
from pathlib import Path

INSTRUCTION = ("A text-to-video model was trained on captions like these:\n{examples}\n\nRewrite the prompt below "
               "as one caption in the same style and length. Keep everything the prompt says and add only details "
               "that fit it. Answer with the caption alone.\n\nPrompt: {prompt}")


def style_examples(data_cfg, k: int = 4, seed: int = 0) -> list[str]:
    """k captions of the training data (fewer if it has fewer distinct ones), drawn with `seed`."""
    rng = random.Random(f"examples/{seed}")
    if data_cfg.source == "shards" and data_cfg.captions and Path(data_cfg.captions).is_file():
        rows = [json.loads(line) for line in Path(data_cfg.captions).read_text(encoding="utf-8").splitlines()]
        pool = sorted({r["caption"] for r in rows if "error" not in r and r["caption"].strip()})
        return rng.sample(pool, min(k, len(pool)))
    if data_cfg.source == "shards":
        from stdit.data.shards import expand, read_member, tar_index
        try:
            shards = expand(data_cfg.shards)
        except FileNotFoundError as e:  # generating on a machine without the training data
            print(f"prompt expansion: no style examples ({e})", file=sys.stderr)
            return []
        members = [(shard, parts["txt"]) for shard in shards for parts in tar_index(shard, []).values()
                   if "txt" in parts]
        picked = []
        for shard, where in rng.sample(members, len(members)):  # a shuffled walk, stopping at k distinct captions
            text = read_member(shard, where).decode("utf-8", "replace").strip()
            if text and text not in picked:
                picked.append(text)
            if len(picked) == k:
                break
        return picked
    from stdit.data.synthetic import SyntheticClips
    data = SyntheticClips(data_cfg.num_samples, data_cfg.resolutions, [1], data_cfg.fps_choices, seed=f"style{seed}")
    picked = []
    for i in rng.sample(range(len(data)), min(len(data), 8 * k)):
        if data[i].caption not in picked:
            picked.append(data[i].caption)
        if len(picked) == k:
            break
    return picked


class PromptExpander:
    """A local instruct causal LM that rewrites short prompts in the style of `examples`."""

    def __init__(self, path: str | Path, examples: list[str], device: str = "auto", max_new_tokens: int = 160,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from stdit.device import resolve_device
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--expand-prompt {path}: not a local transformers model folder (no config.json); "
                                    "download the model beforehand (nothing is fetched at run time)")
        if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"prompt expansion needs max_new_tokens >= 1, temperature >= 0 and top_p in (0, 1]; got "
                             f"{max_new_tokens}, {temperature}, {top_p}")
        self.device = resolve_device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        except (ValueError, KeyError, ImportError) as e:  # not a causal LM transformers knows
            why = " ".join(str(e).split())[:300]
            raise ValueError(f"--expand-prompt {path} cannot be loaded as a causal language model "
                             f"({type(e).__name__}: {why}); see README, Models for captioning and prompt "
                             "expansion") from None
        if not self.tokenizer.chat_template:
            raise ValueError(f"--expand-prompt {path}: its tokenizer has no chat template; use an instruct "
                             "(chat) model")
        self.model.to(self.device).eval()
        self.examples = list(examples)
        self.settings = {"model": str(path.resolve()), "model_type": self.model.config.model_type,
                         "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}

    def message(self, prompt: str) -> str:
        """What the model is asked for `prompt`."""
        examples = "\n".join(f"- {e}" for e in self.examples) or "- (no captions found in the data)"
        return INSTRUCTION.format(examples=examples, prompt=prompt)

    def expand(self, prompt: str) -> str:
        """The prompt rewritten (the prompt itself, with a warning, if the model writes nothing)."""
        import torch
        s = self.settings
        inputs = self.tokenizer.apply_chat_template([{"role": "user", "content": self.message(prompt)}],
                                                    add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True).to(self.device)
        sampling = {"do_sample": True, "temperature": s["temperature"], "top_p": s["top_p"]} \
            if s["temperature"] > 0 else {"do_sample": False}
        torch.manual_seed(s["seed"] * 1_000_003 + zlib.crc32(prompt.encode()))
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=s["max_new_tokens"],
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                                      **sampling)
        text = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        text = " ".join(text.strip().strip('"').split())
        if not text:
            print(f"prompt expansion: the model wrote nothing for {prompt!r}; using the prompt as it is",
                  file=sys.stderr)
            return prompt
        return text

    def record(self, prompt: str, expanded: str) -> dict:
        """What is stored beside a video: both prompts, the model and its settings, the style examples."""
        return {"prompt": prompt, "expanded": expanded, **self.settings, "examples": self.examples}

    def close(self) -> None:
        """Free the model (and its GPU memory) once the prompts are expanded."""
        import torch
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
