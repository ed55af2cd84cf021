"""Which samples make up each step's global batch, independent of the parallel layout.

The position in the data is one number, the count of samples consumed; epoch e visits the dataset in a
permutation drawn from (seed, e). Step s's global batch is samples [s * B, (s + 1) * B) of that stream, or,
after a resume at step s0 from position n0 (which a checkpoint stores in samples, so a changed batch size or
number of ranks continues at the right sample), [n0 + (s - s0) * B, n0 + (s - s0 + 1) * B).
"""
from __future__ import annotations

import torch

from stdit.data.sample import Sample
from stdit.data.synthetic import SyntheticClips


def build_dataset(data_cfg, seed: int):
    """The dataset named by `data.source`: synthetic clips or tar shards (random access either way)."""
    if data_cfg.source == "shards":
        from stdit.data.shards import ShardDataset
        dataset = ShardDataset(data_cfg.shards, data_cfg.resolutions, data_cfg.frame_counts)
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
    )


class GlobalBatches:
    """Deterministic global batches: an epoch-wise permutation of the dataset, cut into batches of `batch_size`."""

    def __init__(self, dataset, batch_size: int, seed: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self._perm_epoch, self._perm = -1, None
        self.origin_step, self.origin_samples = 0, 0

    def resume(self, step: int, samples_seen: int) -> None:
        """Continue so that step `step` starts at sample `samples_seen` of the stream."""
        self.origin_step, self.origin_samples = step, samples_seen

    def position(self, step: int) -> int:
        """Samples consumed before step `step`."""
        return self.origin_samples + (step - self.origin_step) * self.batch_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.dataset), generator=g), epoch
        return self._perm

    def ids(self, step: int) -> list[int]:
        """Dataset indices of step `step`'s global batch."""
        n = len(self.dataset)
        out = []
        for pos in range(self.position(step), self.position(step) + self.batch_size):
            out.append(int(self._permutation(pos // n)[pos % n]))
        return out

    def samples(self, step: int) -> list[Sample]:
        return [self.dataset[i] for i in self.ids(step)]
