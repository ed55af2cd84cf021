"""Multi-process (gloo, CPU) checks of the parallel building blocks against the unsharded model:
megatron-core tensor-parallel layers, context parallelism (Ulysses for full attention, DSP for factorized; both
modes alone in test_dsp.py), and both together."""
import os

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, rand_videos, randomize, tiny_model_cfg

from stdit.config import Config, ConfigError, load_config, validate_layout
from stdit.models.stdit import STDiT
from stdit.packing import pack, token_counts

SHAPES = [(3, 8, 12), (1, 6, 6), (4, 4, 8), (2, 10, 4)]
TEXT_DIM = 16


def _batch():
    g = torch.Generator().manual_seed(0)
    videos = rand_videos(SHAPES)
    texts = [torch.randn(2 + 3 * i, TEXT_DIM, generator=g) for i in range(len(SHAPES))]
    n = sum(token_counts([v.shape[1:] for v in videos], (1, 2, 2)))
    b = pack(videos, texts, [8.0, 16.0, 24.0, 12.0], (1, 2, 2), n + (-n) % 4 + 4)
    t = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.0])[b.frame_sample]
    return b, t


def _worker(rank, world, port, tp, cp, attention):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from parallel.dims import ParallelDims
    from stdit.parallelize import cp_cut, cp_mode, parallelize_stdit

    cfg = Config()
    cfg.model = tiny_model_cfg(attention=attention, num_heads=4, hidden_size=32, caption_time=True,
                               caption_time_scale="clip")  # whole captions and clip lengths on every cp rank
    cfg.parallel.tp, cfg.parallel.cp = tp, cp
    cfg.data.token_budget = 256
    validate_layout(cfg, world)
    dims = ParallelDims(world, tp=tp, cp=cp)
    dims.init()
    torch.manual_seed(0)
    ref = randomize(STDiT(cfg.model, TEXT_DIM), std=0.1)
    torch.manual_seed(0)  # the same full weights; every rank keeps its shard
    model = parallelize_stdit(randomize(STDiT(cfg.model, TEXT_DIM), std=0.1), dims, cp_mode(cfg))
    batch, t = _batch()
    w = torch.randn(batch.tokens.shape[0], batch.tokens.shape[1], generator=torch.Generator().manual_seed(1))
    w[batch.num_real_tokens:] = 0  # the padding is out of the loss (DSP holds none of it)

    out_ref = ref(batch.tokens, t, batch)
    (out_ref * w).sum().backward()

    rows, local = cp_cut(batch, dims.rank("cp"), cp, cp_mode(cfg), "cpu")
    real = torch.ones(batch.tokens[rows].shape[0], dtype=torch.bool)
    if cp_mode(cfg) == "dsp":  # DSP pads a rank's frames with copies of a row, out of the loss: not compared
        real = torch.arange(len(real)) < local.num_real_tokens
    out = model(batch.tokens[rows], t, local)
    (out * w[rows] * real[:, None]).sum().backward()

    # outputs: the local rows equal the reference
    torch.testing.assert_close(out[real], out_ref[rows][real], rtol=1e-5, atol=1e-5)
    # gradients: summed over the cp group; a tensor-parallel shard equals its slice of the reference grad
    ref_params = dict(ref.named_parameters())
    tp_rank = dims.rank("tp")
    checked = 0
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=dims.group("cp"))
        r = ref_params[name.replace(".inner.", ".").replace(".attn.inner", ".attn")].grad
        if getattr(p, "tensor_model_parallel", False):
            dim = p.partition_dim
            size = r.shape[dim] // tp
            r = r.narrow(dim, tp_rank * size, size)
        # fp32 sums in another order: the absolute tolerance scales with the gradient's largest entry
        atol = 1e-5 * max(1.0, float(r.abs().max()))
        torch.testing.assert_close(grad, r, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked == len(ref_params)
    dist.barrier()  # no rank tears gloo down while a peer still talks to it (seen: SIGABRT)
    dist.destroy_process_group()


@pytest.mark.parametrize("tp,cp,attention", [(1, 2, "full"), (2, 2, "factorized")])
def test_sharded_model_matches_unsharded(tp, cp, attention, zygote):
    """The ranks run _worker as torch.multiprocessing.spawn would, forked from tests/zygote.py's warm launcher."""
    world = tp * cp
    rc, _, err = zygote.call(world, "test_parallel_blocks:_worker", (world, free_port(), tp, cp, attention))
    assert rc == 0, err[-3000:]


@pytest.mark.parametrize("overrides,keys", [
    (dict(tp=3), "parallel.tp"),
    (dict(tp=2, cp=4, cp_mode="ulysses"), "model.num_heads"),  # Ulysses splits heads over tp x cp; DSP does not
    (dict(pp=2, zero=2), "parallel.zero"),
    (dict(pp=5), "parallel.pp"),
])
def test_layouts_that_do_not_divide_fail_naming_keys(overrides, keys):
    cfg = Config()
    cfg.model.num_heads, cfg.model.depth = 4, 4
    for k, v in overrides.items():
        setattr(cfg.parallel, k, v)
    with pytest.raises(ConfigError, match=keys.replace(".", r"\.")):
        validate_layout(cfg, world_size=8 if "tp" in overrides and overrides.get("cp") else 4)


def test_cp_mode_is_checked_and_dsp_does_not_split_heads():
    with pytest.raises(ConfigError, match=r"parallel\.cp_mode"):
        load_config("recipes/tiny.yaml", ["parallel.cp_mode=ring"])
    cfg = Config()
    cfg.model.num_heads, cfg.model.depth, cfg.parallel.tp, cfg.parallel.cp = 4, 4, 2, 4
    assert validate_layout(cfg, world_size=8).cp == 4  # DSP: heads divide by tp only
    cfg.model.attention = "full"  # full attention always runs Ulysses
    with pytest.raises(ConfigError, match=r"model\.num_heads.*Ulysses"):
        validate_layout(cfg, world_size=8)
