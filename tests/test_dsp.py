"""DSP context parallelism on packed batches (issue 15, item 5): each cp rank holds whole frames; one all-to-all per
block moves the hidden states to whole temporal columns for temporal attention and one moves the update back.

Checked here: the host-side plan moves every token to its place in the temporal order (no processes); a DSP model
equals the unsharded one on a packed batch of several shapes with padding and a frame larger than a rank's share
(outputs and summed gradients, cp=2 and cp=4, causal time too); and the collectives of a forward + backward are
counted: DSP sends <= 30% of Ulysses' bytes, 4 all-to-alls per block against Ulysses' 20."""
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, rand_videos, randomize, tiny_model_cfg

from parallel.context import balanced_split
from stdit.config import Config
from stdit.models.stdit import STDiT
from stdit.packing import pack, token_counts
from stdit.parallelize import cp_padding, dsp_cut

# frames of 24, 9, 40 (an image larger than a quarter of the tokens), 8 and 10 tokens after 1x2x2 patches
SHAPES = [(3, 8, 12), (1, 6, 6), (1, 10, 16), (4, 4, 8), (2, 10, 4)]
TEXT_DIM, HIDDEN, DEPTH = 16, 32, 2


# the worst case for DSP's traffic: one video whose frames every rank shares, so that every column is cut
ONE_VIDEO = [(16, 8, 8)]


def _batch(shapes=SHAPES):
    g = torch.Generator().manual_seed(0)
    videos = rand_videos(shapes)
    texts = [torch.randn(2 + 3 * i, TEXT_DIM, generator=g) for i in range(len(shapes))]
    n = sum(token_counts([v.shape[1:] for v in videos], (1, 2, 2)))
    b = pack(videos, texts, [8.0, 16.0, 24.0, 12.0, 6.0][:len(shapes)], (1, 2, 2), n + (-n) % 4 + 4)
    t = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7][:len(shapes)] + [0.0])[b.frame_sample]
    return b, t


def test_balanced_split_is_contiguous_and_minimal():
    assert balanced_split([24, 24, 24, 9, 40, 8, 8, 8, 8, 10, 10], 2) == [0, 4, 11]  # 81 | 92
    assert balanced_split([40, 1, 1], 2) == [0, 1, 3]        # a segment is never cut: 40 | 2
    assert balanced_split([5], 3) == [0, 1, 1, 1]            # more ranks than segments: empty parts
    cuts = balanced_split(list(range(1, 30)), 4)
    parts = [sum(range(1, 30)[a:b]) for a, b in zip(cuts, cuts[1:])]
    assert max(parts) - min(parts) <= 29 and cuts[0] == 0 and cuts[-1] == 29


@pytest.mark.parametrize("size", [2, 3, 4])
def test_plan_moves_every_token_to_its_temporal_column(size):
    """Emulate the all-to-all with the plans of all ranks: the column layouts together hold every temporal column
    of the batch once, each as one local temporal segment in time order; the frame layouts together hold every
    real token once; samples that one rank holds whole move nothing."""
    b, _ = _batch()
    cuts = [dsp_cut(b, r, size) for r in range(size)]
    ids = torch.arange(b.tokens.shape[0])[:, None]
    sent = [(ids[rows])[v.dsp.to_columns.gather].split(v.dsp.to_columns.send) for rows, v in cuts]
    cu = b.cu_temporal.tolist()
    want = sorted(tuple(b.temporal_perm[a:e].tolist()) for a, e in zip(cu, cu[1:]))
    got_columns, moved = [], 0
    for q, (rows, v) in enumerate(cuts):
        ex, cols = v.dsp.to_columns, v.dsp.columns
        assert [len(sent[p][q]) for p in range(size)] == ex.recv
        moved += sum(n for p, n in enumerate(ex.recv) if p != q)
        got = torch.zeros(ex.length, 1, dtype=torch.long).index_copy(0, ex.scatter, torch.cat([s[q] for s in sent]))
        got = got[:cols.num_real_tokens, 0]
        local = cols.cu_temporal.tolist()
        assert local[-1] == len(got) == sum(ex.recv)
        got_columns += [tuple(got[a:e].tolist()) for a, e in zip(local, local[1:])]
        assert torch.equal(cols.token_frame[:len(got)], b.token_frame[got])
        assert not v.loss_mask[v.num_real_tokens:].any()
    assert sorted(got_columns) == want
    held = torch.cat([rows[:v.num_real_tokens] for rows, v in cuts])
    assert torch.equal(held, torch.arange(b.num_real_tokens))
    # only the samples cut between ranks move (at most size - 1 of them), and not all of their tokens
    cut_samples = {int(b.token_sample[rows[0]]) for rows, v in cuts[1:] if v.num_real_tokens} & \
        {int(b.token_sample[rows[v.num_real_tokens - 1]]) for rows, v in cuts[:-1] if v.num_real_tokens}
    assert moved < sum(math.prod(b.grids[s]) for s in cut_samples) or moved == 0, (moved, cut_samples)
    # the trainer's cp padding (metrics.jsonl: cp_padding_fraction) is what the cut pads: every rank holds the
    # busiest rank's rows
    assert cp_padding(b, size, "dsp") == (b.num_real_tokens, size * max(len(rows) for rows, _ in cuts))
    assert len({len(rows) for rows, _ in cuts}) == 1 and cp_padding(b, size, "ulysses")[1] == b.num_real_tokens


class Counter:
    """Wraps torch.distributed's collectives: calls and bytes sent to other ranks."""

    NAMES = ("all_to_all_single", "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
             "broadcast")

    def __init__(self):
        self.calls, self.bytes, self.saved = {}, 0, {}

    def __enter__(self):
        for name in self.NAMES:
            self.saved[name] = fn = getattr(dist, name)
            setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        def counted(*args, **kw):
            self.calls[name] = self.calls.get(name, 0) + 1
            if name == "all_to_all_single":
                x = kw.get("input", args[1] if len(args) > 1 else None)
                splits = kw.get("input_split_sizes", args[3] if len(args) > 3 else None)
                group = kw.get("group")
                size, rank = dist.get_world_size(group), dist.get_rank(group)
                row = x[0].numel() * x.element_size() if x.shape[0] else 0
                if splits:  # uneven: what leaves this rank
                    self.bytes += sum(n for j, n in enumerate(splits) if j != rank) * row
                else:  # even split of dim 0
                    self.bytes += x.numel() * x.element_size() * (size - 1) // size
            return fn(*args, **kw)
        return counted


def _worker(rank, world, port, causal, backend, out_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from parallel.dims import ParallelDims
    from stdit.parallelize import cp_cut, parallelize_stdit

    cfg = Config()
    cfg.model = tiny_model_cfg(num_heads=4, hidden_size=HIDDEN, depth=DEPTH, temporal_causal=causal,
                               attention_backend=backend)
    dims = ParallelDims(world, cp=world)
    dims.init()
    counts = {}
    for shapes in (SHAPES, ONE_VIDEO):
        torch.manual_seed(0)
        ref = randomize(STDiT(cfg.model, TEXT_DIM), std=0.1)
        batch, t = _batch(shapes)
        w = torch.randn(batch.tokens.shape[0], batch.tokens.shape[1], generator=torch.Generator().manual_seed(1))
        w[batch.num_real_tokens:] = 0  # padding is out of the loss (and DSP holds none of the packed tail)
        out_ref = ref(batch.tokens, t, batch)
        (out_ref * w).sum().backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        for mode in ("dsp", "ulysses"):
            torch.manual_seed(0)  # the same weights
            model = parallelize_stdit(randomize(STDiT(cfg.model, TEXT_DIM), std=0.1), dims, mode)
            rows, view = cp_cut(batch, rank, world, mode, "cpu")
            real = torch.ones(batch.tokens[rows].shape[0], dtype=torch.bool)
            if mode == "dsp":  # the frame layout's padding rows (a repeated row, out of the loss) are not compared
                real = torch.arange(len(real)) < view.num_real_tokens
            with Counter() as c:
                out = model(batch.tokens[rows], t, view)
                (out * w[rows] * real[:, None]).sum().backward()
            counts[f"{mode} {len(shapes)}"] = {"calls": c.calls, "bytes": c.bytes}
            torch.testing.assert_close(out[real], out_ref[rows][real], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{mode}: {m}")
            for name, p in model.named_parameters():
                grad = p.grad.clone()
                dist.all_reduce(grad, group=dims.group("cp"))
                torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=5e-5,
                                           msg=lambda m: f"{mode} {name}: {m}")
    totals = [None] * world
    dist.all_gather_object(totals, counts)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(totals, f)
    dist.barrier()
    dist.destroy_process_group()


# the dense kernel reads each layout's segments as host-side runs of equal lengths: DSP plans them per layout
@pytest.mark.parametrize("cp,causal,backend", [(2, False, "reference"), (4, True, "dense")])
def test_dsp_equals_unsharded_and_sends_under_30_percent_of_ulysses(cp, causal, backend, tmp_path, zygote):
    """The ranks run _worker as torch.multiprocessing.spawn would, forked from tests/zygote.py's warm launcher."""
    out = tmp_path / "counts.json"
    rc, _, err = zygote.call(cp, "test_dsp:_worker", (cp, free_port(), causal, backend, str(out)))
    assert rc == 0, err[-3000:]
    ranks = json.loads(out.read_text())
    for batch in (len(SHAPES), len(ONE_VIDEO)):
        dsp = sum(r[f"dsp {batch}"]["bytes"] for r in ranks)
        ulysses = sum(r[f"ulysses {batch}"]["bytes"] for r in ranks)
        # per rank and block: DSP 2 all-to-alls forward + 2 backward; Ulysses 10 + 10 (q, k, v, out; cross: q, out)
        assert all(r[f"dsp {batch}"]["calls"] == {"all_to_all_single": 4 * DEPTH} for r in ranks), ranks
        assert all(r[f"ulysses {batch}"]["calls"] == {"all_to_all_single": 20 * DEPTH} for r in ranks), ranks
        print(f"cp={cp}, {batch} sample(s): bytes sent per block (all ranks, forward + backward): dsp "
              f"{dsp / DEPTH:.0f}, ulysses {ulysses / DEPTH:.0f}, ratio {dsp / ulysses:.3f}")
        assert dsp <= 0.3 * ulysses, (dsp, ulysses)
    assert sum(r[f"dsp {len(ONE_VIDEO)}"]["bytes"] for r in ranks) > 0  # the worst case does move tokens
