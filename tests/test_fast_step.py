"""The step without host waits (issue 15, item 6): the foreach EMA and optimizer on the CPU; on a GPU, a step's
micro-batches queue without a single synchronisation (skipped without CUDA)."""
import pytest
import torch

from parallel.engine import EMA
from stdit.config import DiffusionConfig, load_config
from stdit.diffusion.rectified_flow import draw, noise_of
from stdit.train import Trainer, build_optimizer

from test_train import FAST


def test_foreach_ema_equals_the_per_parameter_formula():
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    ema = EMA(model)
    loop = [p.detach().float().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        decay = min(0.999, (1 + step) / (10 + step))
        ema.update(decay)
        for s, p in zip(loop, model.parameters()):  # the per-parameter loop it replaced
            s.mul_(decay).add_(p.detach().float(), alpha=1 - decay)
    for a, b in zip(ema.shadow, loop):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ema.shadow[0], next(model.parameters()))  # it averaged, not copied


def test_optimizer_is_foreach_on_cpu():
    cfg = load_config("recipes/tiny.yaml", FAST)
    opt = build_optimizer(torch.nn.Linear(3, 3), cfg.optim)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


def test_noise_draws_where_the_batch_is():
    """On the CPU the noise is draw()'s generator continued (the values training always used); written into a
    slice it leaves the rest alone."""
    d = draw(0, 3, 17, 6, 4, DiffusionConfig())
    out = torch.zeros(8, 4)
    noise_of(d, out[1:7])
    assert torch.equal(out[1:7], noise_of(d)) and not out[0].any() and not out[7].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_micro_batch_loop_never_waits_for_the_gpu(tmp_path):
    from stdit.ops.attention import available_backends
    fast = [b for b in available_backends("cuda") if b != "reference"]
    if not fast:
        pytest.skip("no fast attention backend here (the reference kernel groups segments on the host)")
    cfg = load_config("recipes/tiny.yaml", FAST + [f"run.dir={tmp_path}", "run.device=cuda", "run.steps=3",
                                                   f"model.attention_backend={fast[0]}", "data.batch_size=8",
                                                   "data.micro_batches=0"])
    trainer = Trainer(cfg)
    trainer.train_step()  # first step: lazy initialisation (optimizer state, kernels, allocator)
    for step in (1, 2):
        samples, plan = trainer.global_batch(step)
        micro, trainer.loss_tokens, _ = trainer.steps.build(step, plan, samples)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            items = [trainer.device_item(batch, draws) for batch, draws in micro]
            loss = trainer.engine.train_batch(items, trainer.loss)
            trainer.engine.ema.update(0.9)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        trainer.engine.step()
        assert torch.isfinite(loss)
    assert trainer.engine.optimizer.defaults["fused"] is True
    metrics = trainer.train_step()  # and the whole step, its waits included, still works
    assert metrics["loss"] > 0
