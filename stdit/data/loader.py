"""Which samples make up each step, independent of the parallel layout, and loading them ahead of training.

The stream: epoch e visits the dataset in a permutation drawn from (seed, e); stream position p is sample
perm_{p // N}[p % N]. A step is planned from the stream in one of two ways:

  data.micro_batches = 0   the next data.batch_size samples, packed first-fit-decreasing into as many
                           micro-batches of data.token_budget as they need (the last one may be part padding).
  data.micro_batches = M   exactly M micro-batches of data.token_budget, filled from a look-ahead buffer of the
                           next data.lookahead samples: overdue samples first, then first-fit-decreasing; what
                           does not fit waits in the buffer for a later step (NaViT-style packing).

The data state before a step is {"next": stream position of the next sample to enter the buffer, "buffer":
the stream positions waiting}. Planning reads only sample shapes (dataset.shape_of), never pixels, so it is the
same on every process and layout, runs ahead of loading, and its state goes into checkpoints: a resume on any
number of ranks continues with exactly the samples an uninterrupted run would have seen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stdit.data.binpack import first_fit_decreasing
from stdit.data.sample import Sample
from stdit.data.synthetic import SyntheticClips


def build_dataset(data_cfg, seed: int):
    """The dataset named by `data.source`: synthetic clips or tar shards (random access either way)."""
    if data_cfg.source == "shards":
        if data_cfg.cached:
            from stdit.data.cache import CachedDataset
            dataset = CachedDataset(data_cfg.shards)
        else:
            from stdit.data.shards import ShardDataset
            dataset = ShardDataset(data_cfg.shards, data_cfg.resolutions, data_cfg.frame_counts,
                                   data_cfg.frame_stride, data_cfg.target_fps, data_cfg.buckets,
                                   data_cfg.allow_upscale, data_cfg.captions)
        if len(dataset) < data_cfg.batch_size:
            raise ValueError(f"data.shards hold {len(dataset)} samples, fewer than data.batch_size="
                             f"{data_cfg.batch_size}")
        return dataset
    if data_cfg.source != "synthetic":
        raise ValueError(f"data.source={data_cfg.source!r} is not available; use synthetic or shards")
    return SyntheticClips(
        num_samples=data_cfg.num_samples,
        resolutions=[tuple(r) for r in data_cfg.resolutions],
        frame_counts=list(data_cfg.frame_counts),
        fps_choices=list(data_cfg.fps_choices),
        seed=seed,
        round_trips=data_cfg.round_trips,
        round_trip_frames=data_cfg.window,
    )


@dataclass
class StepPlan:
    """One step: dataset ids of its samples, their token grids (T', H', W') and counts, and its micro-batches
    (lists of indices into ids)."""

    ids: list[int]
    bins: list[list[int]]
    tokens: list[int]
    grids: list[tuple[int, int, int]]

    @classmethod
    def of(cls, ids: list[int], grids: list[tuple[int, int, int]], budget: int) -> "StepPlan":
        """The plan of samples given directly rather than drawn from a stream (tests, tools): their micro-batches
        packed first-fit-decreasing into bins of `budget` tokens, as data.micro_batches = 0 does."""
        grids = [tuple(g) for g in grids]
        tokens = [math.prod(g) for g in grids]
        return cls(ids=list(ids), bins=first_fit_decreasing(tokens, budget), tokens=tokens, grids=grids)

    def shares(self, dp_size: int) -> list[list[int]]:
        """The micro-batches (indices into bins) each of `dp_size` data-parallel ranks trains on."""
        return assign_microbatches([sum(self.tokens[i] for i in b) for b in self.bins], dp_size)

    def share(self, dp_rank: int, dp_size: int) -> list[int]:
        return self.shares(dp_size)[dp_rank]

    def members(self, dp_rank: int = 0, dp_size: int = 1) -> list[int]:
        """Indices into ids of the samples of that rank's micro-batches, in the order its samples are loaded."""
        return [i for j in self.share(dp_rank, dp_size) for i in self.bins[j]]


def assign_microbatches(tokens: list[int], dp: int) -> list[list[int]]:
    """Deal micro-batches (largest first) to the dp rank with the fewest micro-batches, then fewest tokens."""
    ranks: list[list[int]] = [[] for _ in range(dp)]
    load = [0] * dp
    for i in sorted(range(len(tokens)), key=lambda j: (-tokens[j], j)):
        r = min(range(dp), key=lambda k: (len(ranks[k]), load[k], k))
        ranks[r].append(i)
        load[r] += tokens[i]
    return ranks


class StepSampler:
    """Plans steps from the data stream (see the module docstring) and loads their samples.

    `token_grid(shape)` is the model's token grid (T', H', W') of a sample of dataset shape (T, H, W). `share`
    = (dp rank, dp size): samples() loads only the samples of that rank's micro-batches. With `workers` > 0,
    samples are decoded in that many worker processes, steps ahead of the one training.
    """

    def __init__(self, dataset, data_cfg, seed: int, token_grid, workers: int = 0, share=(0, 1)):
        self.dataset, self.seed, self.token_grid, self.workers = dataset, seed, token_grid, workers
        self.share = share
        self.batch_size, self.budget = data_cfg.batch_size, data_cfg.token_budget
        self.micro_batches, self.lookahead = data_cfg.micro_batches, data_cfg.lookahead
        self._perms: dict[int, torch.Tensor] = {}  # the last two epochs' orders (the buffer may straddle them)
        self._states = {0: {"next": 0, "buffer": []}}  # data state before each planned step
        self._plans: dict[int, StepPlan] = {}
        self._iter, self._iter_step = None, None

    # ---- the stream and its state -------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = torch.randperm(len(self.dataset), generator=g)
        return self._perms[epoch]

    def id_at(self, pos: int) -> int:
        """Dataset id at stream position `pos`."""
        n = len(self.dataset)
        return int(self._permutation(pos // n)[pos % n])

    def resume(self, step: int, state) -> None:
        """Continue so that step `step` starts from data state `state` (a dict as in the module docstring; an
        int is a count of samples consumed, as checkpoints of the fixed-count mode before look-ahead stored)."""
        if isinstance(state, int):
            state = {"next": state, "buffer": []}
        self._states, self._plans = {step: {"next": int(state["next"]), "buffer": list(state["buffer"])}}, {}
        self.close()

    def state(self, step: int) -> dict:
        """The data state before step `step` (what a checkpoint taken after step - 1 stores)."""
        if step < min(self._states):
            raise ValueError(f"step {step} is before the data stream's origin (step {min(self._states)})")
        while step not in self._states:
            self.plan(max(s for s in self._states if s < step))
        return self._states[step]

    def samples_consumed(self, step: int) -> int:
        """Samples handed to training before step `step` (stream position minus what still waits)."""
        s = self.state(step)
        return s["next"] - len(s["buffer"])

    # ---- planning -----------------------------------------------------------------------------------------
    def plan(self, step: int) -> StepPlan:
        """The samples and micro-batches of step `step`; steps are planned in order from the earliest known state."""
        if step in self._plans:
            return self._plans[step]
        state = self.state(step)
        nxt, buffer = state["next"], list(state["buffer"])
        if self.micro_batches == 0:
            chosen = list(range(nxt, nxt + self.batch_size))
            bins = first_fit_decreasing([self._tokens(p) for p in chosen], self.budget)
            nxt += self.batch_size
        else:
            while len(buffer) < self.lookahead:
                buffer.append(nxt)
                nxt += 1
            chosen_bins = self._fill(buffer, nxt)
            taken = {p for b in chosen_bins for p in b}
            buffer = [p for p in buffer if p not in taken]
            chosen = [p for b in chosen_bins for p in b]
            bins, k = [], 0
            for b in chosen_bins:
                bins.append(list(range(k, k + len(b))))
                k += len(b)
        grids = [self._grid(p) for p in chosen]
        plan = StepPlan(ids=[self.id_at(p) for p in chosen], bins=bins, tokens=[math.prod(g) for g in grids],
                        grids=grids)
        self._plans[step] = plan
        self._states[step + 1] = {"next": nxt, "buffer": buffer}
        for old in [s for s in self._plans if s < step - 256]:  # keep some: loading and checkpoints lag planning
            del self._plans[old]
            self._states.pop(old, None)
        return plan

    def _grid(self, pos: int) -> tuple[int, int, int]:
        return tuple(self.token_grid(self.dataset.shape_of(self.id_at(pos))))

    def _tokens(self, pos: int) -> int:
        n = math.prod(self._grid(pos))
        if n > self.budget:
            raise ValueError(f"sample {self.id_at(pos)} has {n} tokens, more than data.token_budget={self.budget}; "
                             "raise data.token_budget or lower data.resolutions / data.frame_counts (data.buckets)")
        return n

    def _fill(self, buffer: list[int], nxt: int) -> list[list[int]]:
        """Fill micro_batches bins of the token budget from the buffer: samples that have waited while a whole
        look-ahead's worth of later samples passed go first (in stream order), then the rest largest first,
        each into the first bin with room. Bins come out in the order filled, samples by stream position."""
        overdue = [p for p in buffer if nxt - p > 2 * self.lookahead]
        rest = sorted((p for p in buffer if nxt - p <= 2 * self.lookahead), key=lambda p: (-self._tokens(p), p))
        order = overdue + rest
        bins = first_fit_decreasing([self._tokens(p) for p in order], self.budget, self.micro_batches,
                                    order=list(range(len(order))))
        return [sorted(order[i] for i in b) for b in bins]

    # ---- loading ------------------------------------------------------------------------------------------
    def ids(self, step: int) -> list[int]:
        return self.plan(step).ids

    def mine(self, step: int) -> list[int]:
        """Dataset ids of this rank's share of step `step`: its micro-batches' samples, in order."""
        plan = self.plan(step)
        return [plan.ids[i] for i in plan.members(*self.share)]

    def samples(self, step: int) -> list[Sample]:
        """This rank's samples of step `step` (see mine()); with workers, consecutive steps are decoded ahead."""
        if self.workers == 0:
            return [self.dataset[i] for i in self.mine(step)]
        if self._iter is None or self._iter_step != step:
            self.close()
            loader = torch.utils.data.DataLoader(
                _ById(self.dataset), batch_sampler=_StepIds(self, step), num_workers=self.workers,
                collate_fn=list, prefetch_factor=2, multiprocessing_context="fork")
            self._iter, self._iter_step = iter(loader), step
        self._iter_step += 1
        return next(self._iter)

    def close(self) -> None:
        """Stop the worker processes (they restart on the next samples())."""
        if self._iter is not None:
            self._iter._shutdown_workers()
        self._iter, self._iter_step = None, None


class _ById(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]


class _StepIds:
    """The loader's batch sampler: the ids of consecutive steps from `start`, planned in the main process."""

    def __init__(self, sampler: StepSampler, start: int):
        self.sampler, self.start = sampler, start

    def __iter__(self):
        step = self.start
        while True:
            yield self.sampler.mine(step)
            step += 1
