import copy
import math

import pytest
import torch

from stdit.config import Config, DiffusionConfig
from stdit.data.loader import StepPlan
from stdit.data.sample import Sample
from stdit.data.steps import StepBuilder
from stdit.diffusion.rectified_flow import draw, flow_loss_sum, noise_of, noisy_inputs, timestep_shift
from stdit.grid import token_grid
from stdit.models.stdit import STDiT
from stdit.packing import pack, patchify

from conftest import rand_videos, randomize, tiny_model_cfg


def test_draws_depend_only_on_seed_step_and_sample():
    cfg = DiffusionConfig()
    a, b = draw(0, 3, 17, 20, 12, cfg), draw(0, 3, 17, 20, 12, cfg)
    assert a.t == b.t and torch.equal(noise_of(a), noise_of(b)) and a.drop_caption == b.drop_caption
    for other in [draw(1, 3, 17, 20, 12, cfg), draw(0, 4, 17, 20, 12, cfg), draw(0, 3, 18, 20, 12, cfg)]:
        assert not torch.equal(noise_of(a), noise_of(other))
    ts = torch.tensor([draw(0, 0, i, 20, 1, cfg).t for i in range(2000)])
    assert 0 < ts.min() and ts.max() < 1 and abs(ts.median() - 0.5) < 0.05
    drops = sum(draw(0, 0, i, 20, 1, cfg).drop_caption for i in range(2000))
    assert 150 < drops < 250  # caption_dropout 0.1


def test_timestep_shift_grows_with_tokens():
    cfg = DiffusionConfig(shift_base_tokens=256, max_shift=4.0)
    assert timestep_shift(64, cfg) == 1.0 and timestep_shift(1024, cfg) == 2.0 and timestep_shift(10**6, cfg) == 4.0
    big = torch.tensor([draw(0, 0, i, 4096, 1, cfg).t for i in range(500)])
    small = torch.tensor([draw(0, 0, i, 64, 1, cfg).t for i in range(500)])
    assert big.mean() > small.mean() + 0.1


def test_conditioning_frames_stay_clean_with_timestep_zero():
    (v,) = rand_videos([(3, 4, 4)])
    b = pack([v], [torch.ones(1, 4)], [8.0], (1, 2, 2), 16, cond_frames=[torch.tensor([True, False, False])])
    d = draw(0, 0, 0, 12, 12, DiffusionConfig())
    x_t, t_frame, target = noisy_inputs(b, [d])
    assert t_frame[0] == 0 and t_frame[1] == t_frame[2] == d.t
    assert torch.equal(x_t[:4], b.tokens[:4]) and not torch.equal(x_t[4:12], b.tokens[4:12])
    torch.testing.assert_close(target[:12], noise_of(d) - b.tokens[:12])


class _TextStub:
    """Deterministic caption embeddings without a transformer (keeps this test about the split)."""

    dim = 8

    def encode(self, captions):
        return [torch.full((1 + len(c) % 5, 8), float(len(c) % 7) / 7) for c in captions]


def _forward_backward(model, samples, step, cfg):
    """The trainer's loop on one process: each micro-batch adds sum(loss) / (loss tokens of the step)."""
    plan = StepPlan.of([s.sample_id for s in samples],
                       [token_grid(s.video.shape[1:], cfg.model.patch_size) for s in samples], cfg.data.token_budget)
    micro, loss_tokens, stats = StepBuilder(cfg, _TextStub()).build(step, plan, [samples[i] for i in plan.members()])
    loss = 0.0
    for batch, draws in micro:
        x_t, t_frame, target = noisy_inputs(batch, draws)
        loss_sum = flow_loss_sum(model(x_t, t_frame, batch), target, batch.loss_mask) / loss_tokens
        loss_sum.backward()
        loss += loss_sum.item()
    return {"loss": loss, **stats}


def test_micro_batch_split_leaves_loss_and_grads_unchanged():
    cfg = Config()
    cfg.model = tiny_model_cfg()
    shapes = [(4, 8, 8), (1, 12, 8), (8, 8, 12), (2, 4, 4), (4, 12, 12), (1, 8, 8)]
    samples = [Sample(i * 7, v, f"caption {i}" * (i + 1), 8.0) for i, v in enumerate(rand_videos(shapes))]
    base = randomize(STDiT(cfg.model, _TextStub.dim), std=0.05)
    results = []
    for budget in [1000, 400, 200]:  # 1, 2 and 3 micro-batches
        model = copy.deepcopy(base)
        cfg.data.token_budget = budget
        stats = _forward_backward(model, samples, step=5, cfg=cfg)
        results.append((stats, {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert [r[0]["micro_batches"] for r in results] == [1, 2, 3]
    ref_stats, ref_grads = results[0]
    assert ref_stats["loss"] > 0
    for stats, grads in results[1:]:
        assert abs(stats["loss"] - ref_stats["loss"]) <= 1e-5 * ref_stats["loss"]
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_conditioned_sampling_keeps_the_given_frames_and_uses_them():
    """Image-to-video / continuation: given token frames come out exactly as given, with or without guidance,
    and the generated frames depend on them (the model attends to the condition)."""
    from stdit.diffusion.sampler import sample_videos
    cfg = Config()
    cfg.model = tiny_model_cfg()
    model = randomize(STDiT(cfg.model, _TextStub.dim), std=0.05).eval()
    shape = (4, 8, 8)
    clean_a, clean_b = rand_videos([shape, shape], seed=3)
    first, first_two = torch.tensor([True, False, False, False]), torch.tensor([True, True, False, False])
    for scale in (1.0, 3.0):
        run = lambda conds: sample_videos(model, _TextStub(), ["a", "b"], [shape, shape], cfg.model,  # noqa: E731
                                          cfg.diffusion, steps=3, cfg_scale=scale, conditions=conds)
        plain = run(None)
        given = run([(clean_a, first), (clean_b, first_two)])
        assert torch.equal(given[0][:, :1], clean_a[:, :1]) and torch.equal(given[1][:, :2], clean_b[:, :2])
        assert not torch.allclose(given[0][:, 1:], plain[0][:, 1:], atol=1e-4)
        again = run([(clean_b, first), None])  # another first frame changes the rest; no condition: as plain
        assert not torch.allclose(again[0][:, 1:], given[0][:, 1:], atol=1e-4)
        torch.testing.assert_close(again[1], plain[1])


def test_samples_with_given_frames_take_their_own_guidance_scale():
    """diffusion.cfg_scale_given: a sample with given frames is guided by it, one without by cfg_scale, in the same
    call (packed samples are independent)."""
    from stdit.config import ConfigError, validate
    from stdit.diffusion.sampler import sample_videos
    cfg = Config()
    cfg.model = tiny_model_cfg()
    model = randomize(STDiT(cfg.model, _TextStub.dim), std=0.05).eval()
    shape = (4, 8, 8)
    clean = rand_videos([shape], seed=3)[0]
    given = [(clean, torch.tensor([True, False, False, False])), None]

    def run(scale, given_scale):
        d = copy.deepcopy(cfg.diffusion)
        d.cfg_scale_given = given_scale
        return sample_videos(model, _TextStub(), ["a", "b"], [shape, shape], cfg.model, d, steps=3,
                             cfg_scale=scale, conditions=given)
    mixed, plain, guided = run(3.0, 1.0), run(1.0, None), run(3.0, None)
    torch.testing.assert_close(mixed[0], plain[0])   # given frames: scale 1
    torch.testing.assert_close(mixed[1], guided[1])  # none: scale 3
    assert not torch.allclose(guided[0], plain[0], atol=1e-4)
    cfg.diffusion.cfg_scale_given = 0.5
    with pytest.raises(ConfigError, match="diffusion.cfg_scale_given"):
        validate(cfg)


def test_condition_of_an_image_or_clip_through_the_causal_autoencoder(tmp_path):
    import numpy as np
    from PIL import Image

    from stdit.config import load_config
    from stdit.generate import condition_of
    from stdit.models.vae import VideoVAE
    from test_data_shard import _write
    vae = VideoVAE(load_config("recipes/vae/tiny.yaml").vae).eval()
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "a.png")
    video, mask = condition_of(tmp_path / "a.png", 1, (9, 16, 16), (1, 2, 2), vae)
    assert video.shape == (4, 3, 2, 2) and mask.tolist() == [True, False, False]
    _write(tmp_path / "c.mp4", "libx264", 7, (16, 16), 8)
    video, mask = condition_of(tmp_path / "c.mp4", 5, (9, 16, 16), (1, 2, 2), vae)
    assert mask.tolist() == [True, True, False]
    from stdit.data.shards import decode, fit_to_bucket
    given = fit_to_bucket(decode((tmp_path / "c.mp4").read_bytes(), "mp4", 5)[0], [(16, 16)])
    with torch.no_grad():  # the given latent frames are those of the given pixel frames alone
        torch.testing.assert_close(video[:, :2], vae.encode(given[None], tiled=True)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fewer than --cond-frames=8"):
        condition_of(tmp_path / "c.mp4", 8, (9, 16, 16), (1, 2, 2), vae)


class _Oracle(torch.nn.Module):
    """The exact velocity field of a point mass at known clean videos: v(x_t, t) = (x_t - x0) / t, which is the
    training target noise - x0 for every x_t = (1 - t) x0 + t noise. Guided or not, both copies get it."""

    def __init__(self, clean, patch):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # the sampler reads the device from a parameter
        self.x0 = torch.cat([patchify(v, patch) for v in clean])
        self.times = []

    def forward(self, x, t_frame, batch):
        t_tok = t_frame[batch.token_frame[:x.shape[0]]][:, None]
        self.times.append(t_frame[:-1].clone())
        return (x - self.x0.repeat(x.shape[0] // self.x0.shape[0], 1)) / t_tok


def test_sampler_with_an_oracle_velocity_recovers_the_clean_videos():
    """Sampling integrates the training convention (x_t = (1 - t) x0 + t noise, target noise - x0, per-sample
    timestep shift by token count): with the exact velocity every sample lands on its x0, at any guidance scale,
    and the model sees the same shifted timesteps training draws from."""
    from stdit.data.synthetic import SyntheticClips
    from stdit.diffusion.rectified_flow import shift_t
    from stdit.diffusion.sampler import sample_videos
    cfg = Config()
    clean = [SyntheticClips(1, [[8, 8]], [4], [8.0])[0].video,  # 64 tokens: shift 1
             SyntheticClips(1, [[24, 24]], [8], [8.0])[0].video]  # 1152 tokens: shift ~2.1
    shapes = [tuple(v.shape[1:]) for v in clean]
    shifts = [timestep_shift(math.prod(token_grid(s, cfg.model.patch_size)), cfg.diffusion) for s in shapes]
    # the training target is that velocity at x_t
    b = pack(clean, [torch.zeros(1, 8)] * 2, [8.0] * 2, cfg.model.patch_size, sum(v[0].numel() // 4 for v in clean))
    d = [draw(0, 0, i, v[0].numel() // 4, 12, cfg.diffusion) for i, v in enumerate(clean)]
    x_t, t_frame, target = noisy_inputs(b, d)
    t_tok = t_frame[b.token_frame][:, None]
    torch.testing.assert_close((x_t - b.tokens) / t_tok, target, rtol=1e-4, atol=1e-4)
    for scale in (1.0, 4.0):
        oracle = _Oracle(clean, cfg.model.patch_size)
        out = sample_videos(oracle, _TextStub(), ["a", "b"], shapes, cfg.model, cfg.diffusion, steps=5,
                            cfg_scale=scale)
        for o, c in zip(out, clean):
            torch.testing.assert_close(o, c, rtol=0, atol=1e-5)
        grid = torch.linspace(1, 0, 6)[:5]
        first_frames = [0, shapes[0][0]]  # a frame of each sample
        for k, t in enumerate(oracle.times):
            for f, s in zip(first_frames, shifts):
                assert abs(t[f].item() - float(shift_t(grid[k], s))) < 1e-6


class _OracleX0(_Oracle):
    """The same point mass for a network that predicts the clean tokens (`diffusion.prediction=x0`)."""

    def forward(self, x, t_frame, batch):
        self.times.append(t_frame[:-1].clone())
        return self.x0.repeat(x.shape[0] // self.x0.shape[0], 1)


def test_x0_prediction_trains_on_the_velocity_error_and_samples_to_the_clean_videos():
    """With diffusion.prediction=x0 the target is the clean tokens weighted by 1 / t^2, so the loss equals the
    velocity error of the velocity the output stands for; the sampler integrates that velocity, and the exact x0
    lands every sample on its clean video at any guidance scale."""
    from stdit.data.synthetic import SyntheticClips
    from stdit.diffusion.rectified_flow import prediction_target, velocity_of
    from stdit.diffusion.sampler import sample_videos
    cfg = Config()
    cfg.diffusion.prediction = "x0"
    clean = [SyntheticClips(1, [[8, 8]], [4], [8.0])[0].video, SyntheticClips(1, [[16, 16]], [8], [8.0])[0].video]
    shapes = [tuple(v.shape[1:]) for v in clean]
    tokens = [v[0].numel() // 4 for v in clean]
    b = pack(clean, [torch.zeros(1, 8)] * 2, [8.0] * 2, cfg.model.patch_size, sum(tokens) + 8)  # + padding
    d = [draw(0, 3, i, n, 12, cfg.diffusion) for i, n in enumerate(tokens)]
    x_t, t_frame, velocity = noisy_inputs(b, d)
    target, weight = prediction_target(b, velocity, t_frame, cfg.diffusion)
    torch.testing.assert_close(target, b.tokens)
    out = b.tokens + 0.1 * torch.randn(b.tokens.shape, generator=torch.Generator().manual_seed(0))  # a wrong guess
    t_tok = t_frame[b.token_frame]
    v = velocity_of(out, x_t, t_tok, cfg.diffusion)
    real = b.loss_mask.bool()
    torch.testing.assert_close(flow_loss_sum(out, target, b.loss_mask * weight),
                               flow_loss_sum(v, velocity, b.loss_mask.float()), rtol=1e-4, atol=0)
    assert real.sum() == sum(tokens) and torch.isfinite(v).all()
    for scale in (1.0, 4.0):
        oracle = _OracleX0(clean, cfg.model.patch_size)
        outs = sample_videos(oracle, _TextStub(), ["a", "b"], shapes, cfg.model, cfg.diffusion, steps=5,
                             cfg_scale=scale)
        for o, c in zip(outs, clean):
            torch.testing.assert_close(o, c, rtol=0, atol=1e-5)
    cfg.diffusion.prediction = "noise"
    with pytest.raises(ValueError, match="use velocity or x0"):
        prediction_target(b, velocity, t_frame, cfg.diffusion)
