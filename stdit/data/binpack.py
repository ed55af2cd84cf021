"""The one bin packer behind every step's micro-batches (StepPlan.of and both modes of StepSampler)."""
from __future__ import annotations


def first_fit_decreasing(sizes: list[int], capacity: int, num_bins: int | None = None,
                         order: list[int] | None = None) -> list[list[int]]:
    """Pack items (indices into `sizes`) into bins of `capacity`: each item, in `order`, goes into the first bin
    with room. Returns the non-empty bins in the order opened, each sorted by index.

    `order` defaults to largest first, ties by index, so every process packs the same bins from the same sizes.
    With `num_bins` None, bins open as needed and every item is packed; with `num_bins` = M, at most M bins and
    items that find no room are left out (the look-ahead sampler keeps them for a later step). An item larger
    than `capacity` fits no bin in either mode and raises.
    """
    if order is None:
        order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = [[] for _ in range(num_bins or 0)]
    room = [capacity] * len(bins)
    for i in order:
        if sizes[i] > capacity:
            raise ValueError(f"an item of size {sizes[i]} is larger than the bin capacity {capacity} "
                             "(data.token_budget)")
        b = next((b for b, r in enumerate(room) if sizes[i] <= r), None)
        if b is None and num_bins is None:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        if b is not None:
            bins[b].append(i)
            room[b] -= sizes[i]
    return [sorted(b) for b in bins if b]
