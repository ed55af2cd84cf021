"""`stdit plan` against measurements of a real tiny run on CPU, and against the formulas recomputed here for the
XL / 7B / 30B recipes.

What is compared on the tiny recipe (one CPU process, fp32):
- model state: bytes of the trainer's parameters, gradients, Adam moments and EMA after a real training step,
  against weights + gradients + optimizer + ema of the estimate (agree to 0.1%);
- activations: bytes of the distinct storages autograd keeps for backward during the model's forward over one
  micro-batch packed from the recipe's own data (saved-tensor hooks), against the estimated activations, for each
  recomputation mode and both attention kinds (within 10%); and one block's under bf16 autocast, as on the GPU.
  Peak RSS is not compared: glibc keeps freed memory and backward's transient gradient buffers are not part of the
  activation formula."""
import json
import math

import pytest
import torch
from test_recompute import saved_bytes

from parallel.dims import ParallelDims
from stdit.cli import main
from stdit.config import ConfigError, load_config, validate_layout
from stdit.data.loader import build_dataset
from stdit.flops import forward_flops
from stdit.models.stdit import build_model
from stdit.models.text import TextEncoder
from stdit.packing import pack
from stdit.estimate import HEADROOM, Estimator, block_activations, kernel_backends

GIB = 2 ** 30


def stdit_plan(capsys, *args: str) -> tuple[int, str, str]:
    """`stdit plan ARGS` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(["plan", *args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def plan_json(capsys, *args: str) -> dict:
    code, out, err = stdit_plan(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


# ----------------------------------------------------------------------------------------------------------
# Tiny recipe: the estimate against a real run
# ----------------------------------------------------------------------------------------------------------

def test_tiny_state_matches_the_trainer(tmp_path):
    from stdit.train import Trainer
    cfg = load_config("recipes/tiny.yaml", [f"run.dir={tmp_path}", "run.samples_at_end=0"])
    trainer = Trainer(cfg)
    trainer.train_step()
    params = list(trainer.engine.module.parameters())

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)
    measured = {"weights": nbytes(params), "gradients": nbytes(p.grad for p in params if p.grad is not None),
                "optimizer": nbytes(v for s in trainer.engine.optimizer.state.values() for v in s.values()
                                    if torch.is_tensor(v) and v.dim() > 0),
                "ema": nbytes(trainer.engine.ema.shadow)}
    est = Estimator(cfg, "cpu").memory(ParallelDims(1))
    assert est["rank_params"] == sum(p.numel() for p in params)
    for part, value in measured.items():
        assert est["parts"][part] == pytest.approx(value, rel=1e-3), part
    text = TextEncoder.from_config(cfg.text)
    assert est["parts"]["frozen encoders"] == 4 * sum(p.numel() for p in text.parameters())


@pytest.mark.parametrize("mode, attention", [("none", "factorized"), ("selective", "factorized"),
                                             ("full", "factorized"), ("none", "full"), ("selective", "full")])
def test_tiny_activations_match_what_autograd_keeps(mode, attention):
    cfg = load_config("recipes/tiny.yaml", [f"model.activation_checkpointing={mode}", f"model.attention={attention}",
                                            "model.hidden_size=128", "model.depth=3"])
    batch, text_dim = recipe_batch(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, text_dim)
    t = torch.rand(batch.frame_sample.shape[0])
    kept, _ = saved_bytes(lambda: model(batch.tokens, t, batch))
    planned = Estimator(cfg, "cpu").memory(ParallelDims(1))["parts"]["activations"]
    assert planned == pytest.approx(kept, rel=0.10), f"planned {planned / 2**20:.1f} MiB, kept {kept / 2**20:.1f} MiB"


def recipe_batch(cfg):
    """One micro-batch packed from the recipe's own samples and captions, and the text width."""
    text = TextEncoder.from_config(cfg.text)
    dataset = build_dataset(cfg.data, cfg.run.seed)
    videos, captions, fps, tokens = [], [], [], 0
    for i in range(64):  # fill one micro-batch with the recipe's own samples
        s = dataset[i]
        n = math.prod(d // p for d, p in zip(s.video.shape[1:], cfg.model.patch_size))
        if tokens + n <= cfg.data.token_budget:
            videos, captions, fps, tokens = videos + [s.video], captions + [s.caption], fps + [s.fps], tokens + n
    assert tokens > 0.9 * cfg.data.token_budget
    return pack(videos, text.encode(captions), fps, cfg.model.patch_size, cfg.data.token_budget), text.dim


@pytest.mark.parametrize("mode, attention", [("none", "factorized"), ("selective", "factorized"),
                                             ("full", "factorized"), ("none", "full"), ("selective", "full")])
def test_block_activations_match_what_autograd_keeps_under_bf16_autocast(mode, attention):
    """One block's forward under CPU bf16 autocast (the GPU's compute dtype; CPU autocast keeps LayerNorm in bf16,
    which block_activations' bf16 precision models): bytes of the distinct storages autograd keeps, without the
    block's bf16 weight copies (per parameter, not per token) and the inputs all blocks share, against the
    estimate (within 10%)."""
    cfg = load_config("recipes/tiny.yaml", [f"model.activation_checkpointing={mode}", f"model.attention={attention}",
                                            "model.hidden_size=128", "model.depth=1"])
    batch, text_dim = recipe_batch(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, text_dim)
    block = model.blocks[0]
    weights = {tuple(p.shape) for p in block.parameters()}
    seen = {}

    def keep(t):
        if tuple(t.shape) not in weights and t.untyped_storage().data_ptr() not in shared:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, _, frame_mod, text, rope = model.embed(batch.tokens, torch.rand(batch.frame_sample.shape[0]), batch)
        # per-frame modulation and RoPE tables: every block's inputs, kept once per model (not per block)
        shared = {t.untyped_storage().data_ptr() for t in (frame_mod, *(t for cs in rope.values() for t in cs))}
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            block(x, frame_mod, text, rope, batch)
    kept = sum(seen.values())
    backend, temporal = kernel_backends(cfg.model, "cpu")
    per_token, per_text = block_activations(cfg, 1, backend, mode, "bf16", temporal)
    h, L, S = cfg.model.hidden_size, batch.tokens.shape[0], batch.text.shape[0]
    planned = (per_token * L + per_text * S) * h
    assert planned == pytest.approx(kept, rel=0.10), \
        f"planned {planned / (L * h):.1f}, kept {kept / (L * h):.1f} bytes per token and hidden unit"


# ----------------------------------------------------------------------------------------------------------
# Scale recipes: the printed figures against the formulas, recomputed here
# ----------------------------------------------------------------------------------------------------------

def stdit_params(h, depth, heads, r, patch_dim, text_dim, factorized=True):
    """Closed-form parameter count of STDiT (qk-norm, fps conditioning): per block and outside the blocks."""
    d = h // heads
    attn = 4 * h * h + 4 * h + 2 * d                       # qkv, proj, q/k RMSNorm
    cross = 4 * h * h + 4 * h + 2 * d                      # q, kv, proj, q/k RMSNorm
    mlp = 2 * r * h * h + r * h + h
    block = (2 if factorized else 1) * attn + cross + mlp + (9 if factorized else 6) * h
    scalar = 256 * h + h + h * h + h                       # sinusoid -> MLP (timestep, fps)
    mod = 9 if factorized else 6
    outside = (patch_dim * h + h) + 2 * scalar + (h * mod * h + mod * h) + (text_dim * h + h + h * h + h) \
        + (h * patch_dim + patch_dim + 2 * h)
    return block, outside


def split_block_params(h, heads, r, tp):
    """One block's parameters on one tensor-parallel rank (column Linears split, row Linears' biases whole)."""
    d = h // heads
    attn = (3 * h * h + 3 * h) / tp + h * h / tp + h + 2 * d
    cross = (h * h + h) / tp + (2 * h * h + 2 * h) / tp + h * h / tp + h + 2 * d
    mlp = (r * h * h + r * h) / tp + r * h * h / tp + h
    return 2 * attn + cross + mlp + 9 * h


def expected_memory(cfg, lay: ParallelDims, outside_params: int) -> float:
    """ZeRO paper state (bf16 weights and grads, 12 bytes of fp32 master + Adam) + fp32 EMA + Korthikanti-style
    activations of the factorized block under CUDA bf16 autocast, flash attention for spatial and cross, dense for
    temporal: 44 + (84 + 4 (r - 4)) / tp bytes per token and hidden unit per block (selective 44 + (78 + ...) / tp;
    full 2 kept + one block recomputed), in bytes."""
    m, h = cfg.model, cfg.model.hidden_size
    blocks = math.ceil(m.depth / lay.pp)
    block = split_block_params(h, m.num_heads, m.mlp_ratio, lay.tp)
    psi = blocks * block + (outside_params if lay.pp == 1 else 0)
    if lay.pp > 1:  # the busiest stage: embedders on the first, the final layer on the last
        final = h * 16 + 16 + 2 * h  # linear to 4 channels x patch 1x2x2, and its modulation table
        psi = blocks * block + max(outside_params - final, final)
    n = lay.dp * lay.cp
    state = 2 * psi / (n if lay.zero >= 3 else 1) + 2 * psi / (n if lay.zero >= 2 else 1) \
        + 12 * psi / (n if lay.zero >= 1 else 1) + 4 * psi / (n if lay.zero >= 3 else 1)
    r = m.mlp_ratio
    # bytes per token and hidden unit: bf16 tensors (2) + fp32 copies of LayerNorm inputs (+2 each, 3 LayerNorms)
    # and of QK-norm inputs (4 each: spatial q, k; temporal q, k; cross q; per text token k)
    replicated = 2 * (6 + 6 + 1 + 6) + 3 * 2
    none_tok = replicated + (2 * (6 + 3) + 2 * (6 + 4) + 2 * (3 + 2) + 2 * 2 * r + 5 * 4) / lay.tp
    sel_tok = replicated + (2 * (6 + 2) + 2 * (6 + 3) + 2 * (3 + 1) + 2 * 2 * r + 5 * 4) / lay.tp
    none_text = 2 + (2 * (3 + 1) + 4) / lay.tp
    per_tok, per_text = {"none": (none_tok, none_text), "selective": (sel_tok, none_text),
                         "full": (2, 0)}[m.activation_checkpointing]
    tokens = cfg.data.token_budget / lay.cp
    if lay.cp > 1 and m.attention == "factorized":  # DSP: whole frames per rank, up to a frame less one token more
        tokens = min(cfg.data.token_budget, math.ceil(tokens) + max(g[1] * g[2] for g in latent_grids(cfg)) - 1)
    mean = sum(math.prod(g) for g in latent_grids(cfg)) / len(latent_grids(cfg))
    text = max(1.0, cfg.data.token_budget / mean) * cfg.text.max_length / lay.cp
    act = lay.pp * blocks * (per_tok * tokens + per_text * text) * h
    act += 5 * tokens * h * 2 + tokens * (h // m.num_heads + 2 * m.num_heads / lay.tp) * 4
    if m.activation_checkpointing == "full":
        act += (none_tok * tokens + none_text * text) * h
    return state + act


def latent_grids(cfg) -> list[tuple[int, int, int]]:
    """Token grids of the recipe's pixel buckets: the 4x temporal, 8x8 spatial autoencoder, then 1x2x2 patches."""
    return [((t - 1) // 4 + 1, hh // 16, ww // 16) for t in cfg.data.frame_counts for hh, ww in cfg.data.resolutions]


T5_XXL_ENCODER = 4_762_310_656  # google/t5-v1_1-xxl's encoder: 24 gated-GELU layers of width 4096, 32128 tokens


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """What `stdit plan` reads of the scale recipes' required encoders: T5 v1.1 XXL's config.json (its published
    values) and an autoencoder's config.yaml (recipes/vae/model/B.yaml); no weights."""
    import transformers as tf
    from omegaconf import OmegaConf
    root = tmp_path_factory.mktemp("encoders")
    tf.T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False).save_pretrained(root / "t5-v1_1-xxl")
    (root / "vae").mkdir()
    vae = OmegaConf.merge(OmegaConf.load("recipes/vae/model/B.yaml"), {"run": {"stage": "vae"}})
    (root / "vae" / "config.yaml").write_text(OmegaConf.to_yaml(vae))
    return [f"text.path={root / 't5-v1_1-xxl'}", f"model.vae={root / 'vae'}"]


@pytest.mark.parametrize("recipe, gpus", [("XL", 64), ("7B", 64), ("30B", 128)])
def test_scale_recipes_plan_by_the_formulas(recipe, gpus, encoders, capsys):
    path = f"recipes/scale/{recipe}.yaml"
    cfg = load_config(path, encoders)
    m = cfg.model
    got = plan_json(capsys, path, *encoders, "--gpus", str(gpus), "--gpu-mem", "80", "--suggest")
    text_dim = 4096
    block, outside = stdit_params(m.hidden_size, m.depth, m.num_heads, m.mlp_ratio, 16, text_dim)
    assert got["params"] == m.depth * block + outside
    # the real encoders: T5-XXL's encoder and the autoencoder, counted but not on the GPU (cached latents)
    from stdit.config import vae_config_of
    from stdit.models.vae import VideoVAE
    with torch.device("meta"):
        vae = sum(p.numel() for p in VideoVAE(vae_config_of(cfg.model.vae)).parameters())
    assert got["frozen_params"] == T5_XXL_ENCODER + vae and got["frozen_on_gpu_params"] == 0
    assert got["memory"]["frozen encoders"] == 0
    # FLOPs: 3x the forward (checked against counted matmuls in test_flops) over the recipe's shapes, per step
    grids = latent_grids(cfg)
    tokens = [math.prod(g) for g in grids]
    fwd = sum(forward_flops(m, text_dim, [g], [cfg.text.max_length]) for g in grids)
    assert got["flops"]["per_token"] == pytest.approx(3 * fwd / sum(tokens), rel=1e-9)
    d = cfg.data  # a step is micro_batches x token_budget tokens where set (padding counted), else batch_size clips
    step_tokens = d.micro_batches * d.token_budget if d.micro_batches else d.batch_size * sum(tokens) / len(grids)
    assert got["flops"]["per_step"] == pytest.approx(3 * fwd / sum(tokens) * step_tokens, rel=1e-9)
    frozen = 0  # cached latents: no encoder on the GPU
    # the recipe's own layout, part by part, then every suggested layout's total
    p = cfg.parallel
    lay = ParallelDims(gpus, p.tp, p.pp, p.cp, p.zero)
    assert got["layout"] == lay.describe()
    assert got["total"] == pytest.approx(expected_memory(cfg, lay, outside) + frozen, rel=1e-6)
    assert got["total"] <= HEADROOM * 80 * GIB, f"{recipe}: its own layout should fit an 80 GiB GPU"
    assert got["suggestions"], f"{recipe}: no layout suggested"
    for s in got["suggestions"]:
        tp, pp, cp, dp, zero = (int(x.lstrip("tpcdzero")) for x in s["layout"].split("."))
        lay = ParallelDims(tp * pp * cp * dp, tp, pp, cp, zero)
        assert tp * pp * cp * dp == gpus and m.num_heads % (tp * cp) == 0
        assert s["total"] == pytest.approx(expected_memory(cfg, lay, outside) + frozen, rel=1e-6), s["layout"]
        assert s["total"] <= HEADROOM * 80 * GIB


def test_plan_prints_a_readable_report_and_refuses_bad_input(encoders, capsys):
    code, out, err = stdit_plan(capsys, "recipes/scale/XL.yaml", *encoders, "--gpus", "16", "--gpu-mem", "80",
                                "--suggest")
    assert code == 0, err
    for words in ("parameters", "model FLOPs", "memory per GPU:", "optimizer", "activations", "fits in 80 GiB",
                  "layouts of 16 GPUs that fit in 80 GiB", "parallel.tp=1 parallel.pp=1 parallel.cp=1 parallel.zero=1"):
        assert words in out, words
    for args, message in ((["--gpus", "6"], "does not divide the world size 6"),
                          (["--gpus", "8", "--suggest"], "--gpu-mem"),
                          (["--gpus", "8", "model.activation_checkpointing=some"], "model.activation_checkpointing")):
        code, out, err = stdit_plan(capsys, "recipes/scale/7B.yaml", *encoders, *args)
        assert code == 2 and message in err, err
    code, out, err = stdit_plan(capsys, "recipes/scale/7B.yaml", "--gpus", "8")  # the encoders are required
    assert code == 2 and "text.path and model.vae: data.cached=true" in err, err


def test_suggest_skips_layouts_the_trainer_refuses(capsys):
    """--suggest lists only layouts config.validate_layout (the trainer's check) accepts: 3 packed micro-batches per
    step do not divide over 2 or 4 data-parallel ranks, so on 4 GPUs only dp = 1 layouts are offered."""
    overrides = ["data.micro_batches=3", "parallel.tp=2", "parallel.cp=2"]
    got = plan_json(capsys, "recipes/tiny.yaml", *overrides, "--gpus", "4", "--gpu-mem", "1000", "--suggest",
                    "--device", "cpu")
    assert got["layout"] == "tp2.pp1.cp2.dp1.zero0"
    assert got["suggestions"] and all(".dp1." in s["layout"] for s in got["suggestions"]), got["suggestions"]
    refused = load_config("recipes/tiny.yaml", ["data.micro_batches=3"])  # tp1.pp1.cp1: dp = 4
    with pytest.raises(ConfigError, match="data.micro_batches=3"):
        validate_layout(refused, 4)
    assert "tp1.pp1.cp1.dp4" not in {s["layout"].rsplit(".", 1)[0] for s in got["suggestions"]}
