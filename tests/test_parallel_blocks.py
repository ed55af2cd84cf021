"""Multi-process (gloo, CPU) checks of the parallel building blocks against the unsharded model:
megatron-core tensor-parallel layers, Ulysses context parallelism, and both together."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, rand_videos, randomize, tiny_model_cfg

from stdit.config import Config, ConfigError, validate_layout
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
    from stdit.parallelize import cp_slice, parallelize_stdit

    cfg = Config()
    cfg.model = tiny_model_cfg(attention=attention, num_heads=4, hidden_size=32)
    cfg.parallel.tp, cfg.parallel.cp = tp, cp
    cfg.data.token_budget = 256
    validate_layout(cfg, world)
    dims = ParallelDims(world, tp=tp, cp=cp)
    dims.init()
    torch.manual_seed(0)
    ref = randomize(STDiT(cfg.model, TEXT_DIM), std=0.1)
    torch.manual_seed(0)  # the same full weights; every rank keeps its shard
    model = parallelize_stdit(randomize(STDiT(cfg.model, TEXT_DIM), std=0.1), dims)
    batch, t = _batch()
    w = torch.randn(batch.tokens.shape[0], batch.tokens.shape[1], generator=torch.Generator().manual_seed(1))

    out_ref = ref(batch.tokens, t, batch)
    (out_ref * w).sum().backward()

    cp_rank = dims.rank("cp")
    local = cp_slice(batch, cp_rank, cp)
    L = batch.tokens.shape[0] // cp
    out = model(local.tokens, t, local)
    (out * w[cp_rank * L:(cp_rank + 1) * L]).sum().backward()

    # outputs: the local slice equals the reference
    torch.testing.assert_close(out, out_ref[cp_rank * L:(cp_rank + 1) * L], rtol=1e-5, atol=1e-5)
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
        torch.testing.assert_close(grad, r, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked == len(ref_params)
    dist.barrier()  # no rank tears gloo down while a peer still talks to it (seen: SIGABRT)
    dist.destroy_process_group()


@pytest.mark.parametrize("tp,cp,attention", [(1, 2, "full"), (2, 2, "factorized")])
def test_sharded_model_matches_unsharded(tp, cp, attention):
    world = tp * cp
    mp.spawn(_worker, args=(world, free_port(), tp, cp, attention), nprocs=world, join=True)


@pytest.mark.parametrize("overrides,keys", [
    (dict(tp=3), "parallel.tp"),
    (dict(tp=2, cp=4), "model.num_heads"),
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
