"""Activation checkpointing (model.activation_checkpointing): selective (attention kernels) and full (whole blocks)
recompute in backward what `none` keeps, so loss and gradients are the same while autograd keeps less; and a
tensor-parallel run with full recomputation follows the single-process loss curve."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from conftest import free_port, logged_losses, rand_videos, randomize, tiny_model_cfg

from stdit.models.stdit import build_model
from stdit.packing import pack

MODES = ("none", "selective", "full")


def saved_bytes(fn) -> tuple[int, object]:
    """Bytes of the distinct storages autograd keeps for backward while fn runs, and fn's result."""
    seen = {}

    def keep(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def packed_batch(text_dim: int = 16):
    shapes = [(4, 8, 8), (1, 8, 16), (2, 16, 8)]
    g = torch.Generator().manual_seed(1)
    texts = [torch.randn(n, text_dim, generator=g) for n in (5, 3, 7)]
    batch = pack(rand_videos(shapes), texts, [8.0] * 3, [1, 2, 2], 256)
    return dataclasses.replace(batch, tokens=batch.tokens.double(), text=batch.text.double())


@pytest.mark.parametrize("attention, causal", [("factorized", False), ("factorized", True), ("full", False)])
def test_recompute_gives_the_same_loss_and_gradients(attention, causal):
    batch = packed_batch()
    t = torch.rand(batch.frame_sample.shape[0], generator=torch.Generator().manual_seed(2))
    results = {}
    for mode in MODES:
        cfg = tiny_model_cfg(attention=attention, temporal_causal=causal, activation_checkpointing=mode)
        torch.manual_seed(0)
        model = randomize(build_model(cfg, 16)).double()
        kept, pred = saved_bytes(lambda m=model: m(batch.tokens, t.double(), batch))
        loss = (pred[batch.loss_mask] ** 2).mean()
        loss.backward()
        results[mode] = kept, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
    base_kept, base_loss, base_grads = results["none"]
    for mode in ("selective", "full"):
        kept, loss, grads = results[mode]
        assert loss == base_loss, mode
        for name, g in grads.items():
            assert torch.allclose(g, base_grads[name], rtol=1e-12, atol=1e-14), f"{mode}: {name}"
    assert results["full"][0] < results["selective"][0] < base_kept


def test_no_recompute_without_grad():
    """Sampling (no_grad) runs the plain forward: nothing to recompute, same output."""
    batch = packed_batch()
    t = torch.rand(batch.frame_sample.shape[0])
    outs = []
    for mode in MODES:
        torch.manual_seed(0)
        model = randomize(build_model(tiny_model_cfg(activation_checkpointing=mode), 16)).double()
        with torch.no_grad():
            outs.append(model(batch.tokens, t.double(), batch))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


FAST = ["model.hidden_size=32", "model.depth=2", "model.num_heads=4", "data.resolutions=[[8,8],[8,16],[16,8]]",
        "data.frame_counts=[1,2,4]", "data.batch_size=6", "data.micro_batches=0", "data.token_budget=128",
        "data.num_samples=64",
        "text.hidden_size=16", "text.num_layers=1", "text.ff_size=32", "run.samples_at_end=0", "run.log_every=1",
        "optim.warmup_steps=2", "run.steps=3", "checkpoint.every=0"]


def test_full_recompute_under_tensor_parallelism_follows_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "stdit.train", "recipes/tiny.yaml", *FAST, f"run.dir={tmp_path}/one"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    tp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                         f"--master-port={free_port()}", "-m", "stdit.train", "recipes/tiny.yaml", *FAST,
                         f"run.dir={tmp_path}/tp", "parallel.tp=2", "model.activation_checkpointing=full"],
                        capture_output=True, text=True, env=env, timeout=600)
    assert tp.returncode == 0, tp.stderr[-3000:]
    assert logged_losses(tmp_path / "tp") == pytest.approx(logged_losses(tmp_path / "one"), abs=1e-5)
