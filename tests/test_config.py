import pytest

from stdit.config import ConfigError, load_config


def test_recipe_defaults_chain_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("run:\n  steps: 7\nmodel:\n  depth: 3\n")
    (tmp_path / "child.yaml").write_text("defaults: [base]\nmodel:\n  depth: 5\n")
    cfg = load_config(tmp_path / "child.yaml", ["model.num_heads=2", "run.dir=x"])
    assert (cfg.run.steps, cfg.model.depth, cfg.model.num_heads, cfg.run.dir) == (7, 5, 2, "x")


def test_shipped_recipes_load():
    assert load_config("recipes/tiny.yaml").model.hidden_size == 64
    sizes = {p: load_config(f"recipes/model/{p}.yaml").model for p in ["tiny", "S", "B", "XL", "3B", "7B", "30B"]}
    assert (sizes["XL"].depth, sizes["XL"].hidden_size, sizes["XL"].num_heads) == (28, 1152, 16)
    assert (sizes["30B"].depth, sizes["30B"].hidden_size, sizes["30B"].num_heads) == (48, 6144, 48)


@pytest.mark.parametrize("overrides,key", [
    (["model.num_heads=5"], "model.num_heads"),
    (["model.hidden_sise=64"], "model.hidden_sise"),
    (["nosuchgroup.x=1"], "nosuchgroup"),
    (["data.token_budget=10"], "data.token_budget"),
    (["model.attention=sparse"], "model.attention"),
    (["model.rope_axes=both"], "model.rope_axes"),
    (["model.rope_axes=per_attention", "model.hidden_size=72", "model.num_heads=4"], "model.rope_axes"),
    (["model.pos_embed=learned"], "model.pos_embed"),
    (["diffusion.prediction=noise"], "diffusion.prediction"),
    (["model.caption_time_scale=seconds"], "model.caption_time_scale"),
    (["model.caption_time_gain=0"], "model.caption_time_gain"),
    (["model.attention=full", "model.temporal_causal=true"], "model.temporal_causal"),
    (["model.attention_backend=cudnn"], "model.attention_backend"),
    (["data.frame_counts=[3]", "model.patch_size=[2,2,2]"], "data.frame_counts"),
    (["data.resolutions=[[15,16]]"], "data.resolutions"),
    (["data.round_trips=1.5"], "data.round_trips"),
    (["parallel.zero=4"], "parallel.zero"),
    (["run.steps=abc"], "run.steps"),
])
def test_bad_values_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_missing_recipe_is_a_clear_error():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("recipes/nope.yaml")


@pytest.mark.parametrize("overrides,key", [
    (["text.tokenizer=bpe"], "text.tokenizer"),
    (["text.position_bias_scale=0"], "text.position_bias_scale"),
    (["text.kind=clip", "text.position_bias_scale=16"], "text.position_bias_scale"),
])
def test_bad_text_encoder_values_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_text_encoder_keys_default_to_the_byte_encoder():
    """Configs written before text.tokenizer / text.position_bias_scale existed resolve to the encoder they had."""
    text = load_config(None).text
    assert (text.tokenizer, text.position_bias_scale) == ("byte", 1.0)
