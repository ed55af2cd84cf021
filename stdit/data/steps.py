"""A step's plan and loaded samples -> this dp rank's packed micro-batches, ready for forward/backward.

Everything random here (conditioning masks, timesteps, noise, caption dropout) is drawn from (seed, step,
sample id) alone, so neither the micro-batch split nor the parallel layout changes what a sample sees.
"""
from __future__ import annotations

import math

import torch

from stdit.data.loader import StepPlan
from stdit.data.sample import Sample
from stdit.diffusion.masks import draw_frames, draw_mask
from stdit.diffusion.rectified_flow import SampleDraw, draw
from stdit.flops import forward_flops
from stdit.packing import PackedBatch, pack


class StepBuilder:
    """Builds the micro-batches of each step. `cfg` is the run's Config; `text_encoder` has .dim and
    .encode(list of captions) -> list of unpadded [n_i, dim] embeddings."""

    def __init__(self, cfg, text_encoder):
        self.cfg, self.text_encoder = cfg, text_encoder

    def build(self, step: int, plan: StepPlan, samples: list[Sample], dp_rank: int = 0, dp_size: int = 1
              ) -> tuple[list[tuple[PackedBatch, list[SampleDraw]]], int, dict]:
        """(micro-batches of this rank as (packed batch, draws), loss tokens of the whole step, statistics).

        `samples` are this rank's share of `plan`, in order (StepPlan.members). The loss-token count is of the
        whole step, from the plan alone, so every rank divides by the same number. Ranks with fewer micro-batches
        than the most loaded one get fillers with nothing in the loss (ZeRO reduces per backward, so every rank
        must run the same number). `model_flops` counts this rank's samples (the trainer sums it over dp).
        """
        cfg = self.cfg
        patch, budget, seed = cfg.model.patch_size, cfg.data.token_budget, cfg.run.seed
        every = plan.shares(dp_size)
        shares = every[dp_rank]
        order = [i for j in shares for i in plan.bins[j]]
        if [s.sample_id for s in samples] != [plan.ids[i] for i in order]:
            raise RuntimeError(f"step {step}: the loaded samples are not this rank's share of the step's plan")
        conds = [draw_mask(cfg.data.masks, seed, step, sid, g[0])[1] for sid, g in zip(plan.ids, plan.grids)]
        loss_tokens = sum(math.prod(g) - int(c.sum()) * g[1] * g[2] for g, c in zip(plan.grids, conds))
        token_dim = cfg.model.in_channels * math.prod(patch)
        draws = [draw(seed, step, plan.ids[i], plan.tokens[i], token_dim, cfg.diffusion) for i in order]
        texts = self._texts(samples, draws)
        clips = [self._frames(step, s, plan.grids[i][0]) for s, i in zip(samples, order)]
        where = {i: k for k, i in enumerate(order)}  # plan index -> position in this rank's lists
        micro = []
        for j in shares:
            ks = [where[i] for i in plan.bins[j]]
            batch = pack([clips[k][0] for k in ks], [texts[k] for k in ks], [samples[k].fps for k in ks],
                         patch, budget, sample_ids=[samples[k].sample_id for k in ks],
                         cond_frames=[conds[i] for i in plan.bins[j]], times=[clips[k][1] for k in ks],
                         lengths=[samples[k].video.shape[1] // patch[0] for k in ks])
            micro.append((batch, [draws[k] for k in ks]))
        micro += [self._filler()] * (max(map(len, every)) - len(micro))
        real = sum(plan.tokens)
        flops = 3 * forward_flops(cfg.model, self.text_encoder.dim, [plan.grids[i] for i in order],
                                  [int(x.shape[0]) for x in texts])
        stats = {"tokens": real, "samples": len(plan.ids), "micro_batches": len(plan.bins), "model_flops": flops,
                 "padding_fraction": 1.0 - real / (len(plan.bins) * budget), "loss_tokens": loss_tokens}
        return micro, loss_tokens, stats

    def _frames(self, step: int, sample: Sample, frames: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(video, token-frame time indices or None): a clip longer than the plan's `frames` token frames trains
        on a subset of them drawn for this step (data.window; stdit/diffusion/masks.py draw_frames)."""
        pt = self.cfg.model.patch_size[0]
        total = sample.video.shape[1] // pt
        if total == frames:
            return sample.video, None
        d = self.cfg.data
        times = draw_frames(self.cfg.run.seed, step, sample.sample_id, total, frames, d.max_span)
        model_frames = (times[:, None] * pt + torch.arange(pt)).flatten()
        return sample.video[:, model_frames], times

    def _texts(self, samples: list[Sample], draws: list[SampleDraw]) -> list[torch.Tensor]:
        """Caption embeddings: the cached one (`Sample.text`) where the data carries it, else encoded here; a
        dropped caption is the empty caption's embedding either way."""
        encoded = self.text_encoder.encode(["" if d.drop_caption or s.text is not None else s.caption
                                            for s, d in zip(samples, draws)])
        return [s.text.to(t.device) if s.text is not None and not d.drop_caption else t
                for s, d, t in zip(samples, draws, encoded)]

    def _filler(self) -> tuple[PackedBatch, list[SampleDraw]]:
        """A micro-batch of one patch-sized conditioning sample: it runs forward/backward and adds no loss."""
        patch, budget = self.cfg.model.patch_size, self.cfg.data.token_budget
        one = torch.zeros(self.cfg.model.in_channels, *patch)
        batch = pack([one], [torch.zeros(1, self.text_encoder.dim)], [8.0], patch, budget, sample_ids=[-1],
                     cond_frames=[torch.ones(1, dtype=torch.bool)])
        return batch, [SampleDraw(t=0.0, noise=torch.zeros(1, batch.tokens.shape[1]), drop_caption=False)]
