"""What parallelism needs to know about STDiT, and `parallelize_stdit(model, dims)` applying it from outside.

The generic mechanisms live in parallel/ (tensor, context and pipeline parallelism); this module holds the
model-specific knowledge they take: which Linear is column- or row-parallel, which modules call an attention
kernel, how the model is cut into pipeline stages and what travels between them, how parameter names of the
parallel model map to the plain one, and how a packed batch is cut for a context-parallel rank (Ulysses: a
contiguous slice; DSP: whole frames, and the plan that moves them to whole temporal columns and back).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from parallel.context import Exchange, apply_cp, balanced_split, exchange_plan, local_tokens
from parallel.dims import ParallelDims
from parallel.pipeline import build_pipeline
from parallel.tensor import apply_tp
from stdit.models.layers import rope_tables
from stdit.models.stdit import STDiT, STDiTBlock
from stdit.ops.attention import length_runs
from stdit.packing import PackedBatch, to_device

# Which Linear of a block is column- or row-parallel.
TP_STYLES = {
    "spatial_attn.qkv": "column", "spatial_attn.proj": "row",
    "temporal_attn.qkv": "column", "temporal_attn.proj": "row",
    "cross_attn.q": "column", "cross_attn.kv": "column", "cross_attn.proj": "row",
    "mlp.fc1": "column", "mlp.fc2": "row",
}
# Replicated weights applied per head (QK-norm): under TP each rank sees its heads only, so their grads are summed.
TP_HEAD_SHARED = ("q_norm.weight", "k_norm.weight")
# The modules that call the attention kernel, wrapped by context parallelism (value: is it cross-attention).
ATTENTION_KERNELS = {"spatial_attn.attn": False, "temporal_attn.attn": False, "cross_attn.attn": True}


def cp_mode(cfg) -> str:
    """The context parallelism a config runs: parallel.cp_mode for factorized attention; full attention's
    segments (whole videos) cannot be held whole by a rank, so it always runs Ulysses."""
    return cfg.parallel.cp_mode if cfg.model.attention == "factorized" else "ulysses"


def parallelize_stdit(model: STDiT, dims: ParallelDims, mode: str = "dsp") -> nn.Module:
    """Tensor, context and pipeline parallelism applied to the plain model, in that order. With a pipeline the
    result is a PipelineModule holding this rank's stage; its inputs are `model_inputs(...)`. `mode`: context
    parallelism (`cp_mode(cfg)`); dsp applies to factorized attention only, full attention always gets Ulysses."""
    apply_tp(model, TP_STYLES, TP_HEAD_SHARED)
    dsp = mode == "dsp" and model.cfg.attention == "factorized" and dims.cp > 1
    if dsp:
        apply_dsp(model, dims.group("cp"))
    else:
        apply_cp(model, ATTENTION_KERNELS, dims.group("cp"))
    if dims.pp == 1:
        return model
    layers = [EmbedStage(model, dsp)]
    layers += [BlockStage(b, model.head_dim, model.cfg, dsp) for b in model.blocks]
    layers += [FinalStage(model.final_layer)]
    return build_pipeline(layers, dims, partition_method="type:BlockStage")


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """torch.compile each block's computation (model.compile), with dynamic shapes so packed batches of any
    segment mix reuse its graphs. The attention kernels (and Ulysses' all-to-alls around them; DSP's exchanges
    disable compilation themselves) stay outside: opaque to the compiler anyway, and their host-side segment
    bookkeeping must not be traced. Compiling `_forward` (not the module) keeps parameter names and works under
    every activation checkpointing mode."""
    for name, module in model.named_modules():
        if any(name.endswith(k) for k in ATTENTION_KERNELS):
            module.forward = torch.compiler.disable(module.forward)
    for module in model.modules():
        if isinstance(module, STDiTBlock):
            module._forward = torch.compile(module._forward, dynamic=True, backend=backend)
    return model


def model_inputs(x_t: torch.Tensor, t_frame: torch.Tensor, batch: PackedBatch, pipelined: bool) -> tuple:
    """A micro-batch's positional inputs: (x_t, t, batch) for the model, or the first stage's tensor tuple."""
    return stage_inputs(x_t, t_frame, batch) if pipelined else (x_t, t_frame, batch)


def cp_slice(batch: PackedBatch, rank: int, size: int) -> PackedBatch:
    """A context-parallel rank's view: per-token fields cut to its contiguous slice; segment boundaries and
    num_real_tokens stay global (the kernels see whole segments, and the padding tail, after Ulysses' all-to-all)."""
    if size == 1:
        return batch
    s = local_tokens(batch.tokens.shape[0], rank, size)
    return dataclasses.replace(batch, tokens=batch.tokens[s], coords=batch.coords[s],
                               token_sample=batch.token_sample[s], token_frame=batch.token_frame[s],
                               loss_mask=batch.loss_mask[s])


def cp_cut(batch: PackedBatch, rank: int, size: int, mode: str, device) -> tuple:
    """(rows, view): which rows of the packed batch's per-token tensors (x_t, target) this cp rank holds, and its
    view of the batch, both on `device` (cp = 1: all rows, view None: the batch itself). Planned from the host
    batch: nothing here waits for the device."""
    if size == 1:
        return slice(None), None
    if mode == "ulysses":
        return local_tokens(batch.tokens.shape[0], rank, size), cp_slice(batch, rank, size).to(device)
    rows, view = dsp_cut(batch, rank, size)
    return to_device(rows, device), view.to(device)


# ----------------------------------------------------------------------------------------------------------
# DSP on packed batches. A rank holds whole frames (a contiguous run of them, balanced by tokens over the cp
# ranks, padded to a common length): spatial attention, cross-attention, the MLP and modulation run there without
# communication. Around each block's temporal sub-block one all-to-all moves the hidden states to whole temporal
# columns (a contiguous run of the temporal order, also balanced) and one moves the update back. Everything about
# the two layouts is planned here, on the host, when the batch is cut.
# ----------------------------------------------------------------------------------------------------------


def _partial(**fields) -> PackedBatch:
    """A PackedBatch holding just `fields` (the rest None): what a block or stage reads."""
    return PackedBatch(**{**{f.name: None for f in dataclasses.fields(PackedBatch)}, **fields})


@dataclasses.dataclass
class ColumnPlan:
    """A cp rank's temporal-column layout and the exchanges between it and the frame layout."""

    to_columns: Exchange     # frame layout -> column layout (x)
    to_frames: Exchange      # column layout -> frame layout (the update)
    columns: PackedBatch     # the column layout: token_frame, coords, temporal segments, num_real_tokens
    rope_cache: dict = dataclasses.field(default_factory=dict)

    @torch.compiler.disable
    def rope(self, head_dim: int, theta: float, per_attention: bool):
        """The column layout's temporal RoPE angles, computed once per micro-batch (and stage)."""
        key = (head_dim, theta, per_attention)
        if key not in self.rope_cache:
            self.rope_cache[key] = rope_tables(self.columns.coords, head_dim, theta, per_attention)["temporal"]
        return self.rope_cache[key]

    def to(self, device) -> "ColumnPlan":
        return ColumnPlan(self.to_columns.to(device), self.to_frames.to(device), self.columns.to(device))


@dataclasses.dataclass
class DSPBatch(PackedBatch):
    """A cp rank's frame-layout view under DSP; `dsp` says how to reach its column layout."""

    dsp: ColumnPlan | None = None

    def to(self, device) -> "DSPBatch":
        moved = {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return DSPBatch(**{**moved, "dsp": self.dsp.to(device)})


def _cu(lengths: list[int]) -> torch.Tensor:
    """int32 offsets of consecutive segments of `lengths` rows (varlen cu_seqlens)."""
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)


def _pad_to(rows: torch.Tensor, length: int, last: int) -> torch.Tensor:
    """`rows` padded to `length` by repeating its last row (`last` if it is empty): padding rows are real rows'
    copies, in no attention segment and out of the loss, so they need no values of their own."""
    fill = rows[-1:] if len(rows) else torch.tensor([last])
    return torch.cat([rows, fill.expand(length - len(rows))])


def _column_ranks(batch: PackedBatch, f_cut: list[int], size: int) -> torch.Tensor:
    """Each temporal column's rank in the column layout. A sample whose frames one rank holds keeps its columns
    there (none of its tokens move); the columns of a sample cut between ranks are dealt out in proportion to the
    frames each of them holds, so the column layout is as balanced as the frame layout."""
    cu_t = batch.cu_temporal.long().cpu()
    col_len, first = cu_t.diff(), batch.temporal_perm.cpu()[cu_t[:-1]]  # a column's first token: its sample's frame 0
    sample = batch.token_sample.cpu()[first]
    place = first - torch.tensor(batch.offsets)[sample]  # row * W + column
    area = torch.tensor([h * w for _, h, w in batch.grids])[sample]
    # frames of the column's sample held by ranks before rank j + 1, j = 0..size-1
    before = (torch.tensor(f_cut[1:])[None] - batch.token_frame.cpu()[first][:, None]).clamp(min=0)
    before = torch.minimum(before, col_len[:, None])
    return (area[:, None] * before <= (place * col_len)[:, None]).sum(1)


def dsp_frame_cut(batch: PackedBatch, size: int) -> list[int]:
    """The frame indices where each cp rank's whole frames start, and the end: contiguous, balanced by tokens."""
    return balanced_split(batch.cu_spatial.long().cpu().diff().tolist(), size)


def cp_padding(batch: PackedBatch, size: int, mode: str) -> tuple[int, int]:
    """(real tokens, token rows over all cp ranks) of the batch's cut: DSP pads every rank's frames to the
    busiest rank's tokens (Ulysses' even slices add nothing to the packing's padding)."""
    if size == 1 or mode == "ulysses":
        return batch.num_real_tokens, batch.num_real_tokens
    starts = batch.cu_spatial.long().cpu()[dsp_frame_cut(batch, size)]
    return batch.num_real_tokens, size * int(starts.diff().max())


def dsp_cut(batch: PackedBatch, rank: int, size: int) -> tuple[torch.Tensor, DSPBatch]:
    """DSP's cut of a packed batch (host tensors) for cp rank `rank`: the rows it holds in the frame layout
    (padding rows repeat a real row, out of the loss) and its view, with the ColumnPlan."""
    n, cu_s, cu_t = batch.num_real_tokens, batch.cu_spatial.long().cpu(), batch.cu_temporal.long().cpu()
    perm, frame_sample = batch.temporal_perm[:n].cpu(), batch.frame_sample.cpu()
    # frame layout: whole frames, contiguous in the packed order, balanced by tokens
    frame_len = cu_s.diff()
    f_cut = dsp_frame_cut(batch, size)
    starts = cu_s[f_cut]
    f0, f1, held = f_cut[rank], f_cut[rank + 1], int(starts[rank + 1] - starts[rank])
    rows = _pad_to(torch.arange(int(starts[rank]), int(starts[rank + 1])), int(starts.diff().max()), n - 1)
    # cross-attention: one query segment per sample present (the padding rows join the last) against its text
    samples, which = torch.unique_consecutive(frame_sample[f0:f1], return_inverse=True)
    if f1 == f0:
        samples, which = frame_sample[max(f0 - 1, 0)].reshape(1), torch.zeros(0, dtype=torch.long)
    q_len = torch.zeros(len(samples), dtype=torch.long).index_add_(0, which, frame_len[f0:f1])
    q_len[-1] += len(rows) - held
    cu_text = batch.cu_text.long().cpu()[int(samples[0]):int(samples[-1]) + 2]
    t_len = cu_text.diff()
    # column layout: whole (sample, row, column) columns; a rank's columns ordered by length, then temporal order
    col_rank, col_len = _column_ranks(batch, f_cut, size), cu_t.diff()
    order = torch.argsort((col_rank * (int(col_len.max()) + 1) + col_len) * len(col_len) + torch.arange(len(col_len)))
    ends = col_len[order].cumsum(0)
    load = torch.bincount(col_rank, weights=col_len, minlength=size).long()
    col_start = torch.empty_like(col_len).index_copy_(0, order, ends - col_len[order])
    col_start -= (load.cumsum(0) - load)[col_rank]  # where each column starts in its rank's layout
    # the exchange: the token at temporal position j is at (rank, row) of the frame layout and goes to (rank, row)
    # of the column layout
    j = torch.arange(n)
    col = torch.searchsorted(cu_t[1:], j, right=True)
    src, dst, dst_row = torch.searchsorted(starts[1:], perm, right=True), col_rank[col], col_start[col] + j - cu_t[col]
    to_columns = exchange_plan(src, perm - starts[src], dst, dst_row, rank, size, int(load.max()))
    mine = order[col_rank[order] == rank]
    col_rows = _pad_to(perm[j[dst == rank][torch.argsort(dst_row[dst == rank])]], int(load.max()), int(perm[-1]))
    columns = _partial(token_frame=batch.token_frame[col_rows], coords=batch.coords[col_rows],
                       cu_temporal=_cu(col_len[mine].tolist()), max_temporal=max(col_len[mine].tolist(), default=0),
                       num_real_tokens=int(load[rank]), runs={"temporal": length_runs(col_len[mine].tolist())})
    loss_mask = batch.loss_mask[rows] & (torch.arange(len(rows)) < held).to(batch.loss_mask.device)
    local = frame_len[f0:f1].tolist()
    view = DSPBatch(**{**vars(batch), "tokens": batch.tokens[rows], "coords": batch.coords[rows],
                       "token_sample": batch.token_sample[rows], "token_frame": batch.token_frame[rows],
                       "loss_mask": loss_mask, "text": batch.text[int(cu_text[0]):int(cu_text[-1])],
                       "cu_spatial": _cu(local), "cu_text": (cu_text - cu_text[0]).int(),
                       "cu_cross": _cu(q_len.tolist()),
                       "cu_temporal": None, "cu_full": None, "temporal_perm": None, "temporal_inv": None,
                       "max_spatial": max(local, default=0), "max_temporal": None, "max_full": None,
                       "max_text": int(t_len.max()), "max_cross": int(q_len.max()), "num_real_tokens": held,
                       "runs": {"spatial": length_runs(local), "cross": length_runs(q_len.tolist(), t_len.tolist())},
                       "dsp": ColumnPlan(to_columns, to_columns.reverse(len(rows)), columns)})
    return rows, view


class TemporalColumns:
    """DSP around a block's temporal sub-block (set as its `temporal_branch`; holds no parameters): x moves to the
    column layout, the sub-block runs there on whole temporal segments, its update moves back."""

    def __init__(self, branch, group, head_dim: int, cfg):
        self.branch, self.group = branch, group
        self.rope_args = (head_dim, cfg.rope_theta, cfg.rope_axes == "per_attention")

    def __call__(self, x, frame_mod, rope, batch: DSPBatch):
        plan = batch.dsp
        update = self.branch(plan.to_columns(x, self.group), frame_mod, plan.rope(*self.rope_args), plan.columns)
        return plan.to_frames(update, self.group)


def apply_dsp(model: STDiT, group) -> STDiT:
    """DSP on every factorized block: its temporal sub-block runs on whole temporal columns (see dsp_cut)."""
    for block in model.blocks:
        block.temporal_branch = TemporalColumns(block.temporal_branch, group, model.head_dim, model.cfg)
    return model


def plain_name(name: str, depth: int, pipelined: bool) -> str:
    """Parameter name of the parallel model -> the plain model's: TP wraps megatron layers in `.inner`;
    PipelineModule numbers its layers ('3.block.mlp.fc1.weight' -> 'blocks.2.mlp.fc1.weight')."""
    name = name.replace(".inner.", ".")
    if not pipelined:
        return name
    idx, _, rest = name.partition(".")
    idx = int(idx)
    if 1 <= idx <= depth:
        return f"blocks.{idx - 1}.{rest.removeprefix('block.')}"
    return rest


# ----------------------------------------------------------------------------------------------------------
# Pipeline stages. Between stages travels one tuple of tensors: the hidden tokens, the per-frame conditioning
# and caption embeddings (they need gradients back to stage 0), and the packed metadata as integer tensors
# (segment boundaries, permutation, this rank's token frames and coordinates; under DSP its frame layout's and
# the column plan's), its numbers in one last tensor.
# ----------------------------------------------------------------------------------------------------------

META = ("token_frame", "coords", "cu_spatial", "cu_temporal", "cu_full", "cu_text", "cu_cross", "temporal_perm",
        "temporal_inv")
MAXES = ("max_spatial", "max_temporal", "max_full", "max_text", "max_cross", "num_real_tokens")
DSP_META = ("token_frame", "coords", "cu_spatial", "cu_text", "cu_cross")
DSP_MAXES = ("max_spatial", "max_text", "max_cross", "num_real_tokens")


def _meta(batch: PackedBatch) -> tuple[list, list]:
    """(tensors, numbers) of a view that travel between stages."""
    if not isinstance(batch, DSPBatch):
        return [getattr(batch, k) for k in META], [getattr(batch, k) for k in MAXES]
    plan, cols = batch.dsp, batch.dsp.columns
    tensors = [getattr(batch, k) for k in DSP_META]
    tensors += [plan.to_columns.gather, plan.to_columns.scatter, cols.token_frame, cols.coords, cols.cu_temporal]
    ex = plan.to_columns
    numbers = [getattr(batch, k) for k in DSP_MAXES] + [cols.max_temporal, cols.num_real_tokens, ex.length,
                                                         plan.to_frames.length, *ex.send, *ex.recv]
    return tensors, numbers


def _view(meta: tuple, dsp: bool) -> PackedBatch:
    """A PackedBatch (DSP: a DSPBatch) holding just what blocks and the final layer read."""
    tensors, maxes = meta[:-1], meta[-1]
    if not hasattr(maxes, "host"):  # one wait per micro-batch and stage, not one per block
        maxes.host = maxes.tolist()
    if not dsp:
        return _partial(**dict(zip(META, tensors)), **dict(zip(MAXES, maxes.host)))
    frames = dict(zip(DSP_META, tensors), **dict(zip(DSP_MAXES, maxes.host)))
    gather, scatter, token_frame, coords, cu_col = tensors[len(DSP_META):]
    max_col, held, length, back, *counts = maxes.host[len(DSP_MAXES):]
    send, recv = counts[:len(counts) // 2], counts[len(counts) // 2:]
    ex = Exchange(gather, scatter, send, recv, length)
    columns = _partial(token_frame=token_frame, coords=coords, cu_temporal=cu_col, max_temporal=max_col,
                       num_real_tokens=held)
    return DSPBatch(**{**vars(_partial(**frames)), "dsp": ColumnPlan(ex, ex.reverse(back), columns)})


def stage_inputs(x_t, t_frame, batch: PackedBatch) -> tuple:
    """The first stage's input tuple for one micro-batch (batch already cut to this cp rank's tokens)."""
    tensors, host = _meta(batch)
    maxes = to_device(torch.tensor(host), x_t.device)
    maxes.host = host  # this stage's blocks read the numbers from here; later stages wait for them once
    return (x_t, t_frame, batch.fps, batch.frame_sample, batch.frame_time, batch.text, batch.caption,
            batch.clip_length, *tensors, maxes)


def _cached_view(meta: tuple, dsp: bool) -> PackedBatch:
    """The view of a micro-batch's metadata, built once per stage (its blocks get the same tensors)."""
    maxes = meta[-1]
    if not hasattr(maxes, "batch_view"):
        maxes.batch_view = _view(meta, dsp)
    return maxes.batch_view


class EmbedStage(nn.Module):
    """Stage 0: token, timestep/fps and caption embeddings (the plain model's modules, under the same names)."""

    def __init__(self, model: STDiT, dsp: bool = False):
        super().__init__()
        self.cfg, self.num_mod, self.head_dim, self.dsp = model.cfg, model.num_mod, model.head_dim, dsp
        for name in ("x_embedder", "t_embedder", "fps_embedder", "time_embedder", "caption_time", "t_block",
                     "y_embedder"):
            setattr(self, name, getattr(model, name))

    def forward(self, inputs):
        x_t, t_frame, fps, frame_sample, frame_time, text, caption, clip_length, *meta = inputs
        view = dataclasses.replace(_cached_view(tuple(meta), self.dsp), fps=fps, frame_sample=frame_sample,
                                   frame_time=frame_time, text=text, caption=caption, clip_length=clip_length)
        x, t_emb, frame_mod, text_emb, _ = STDiT.embed(self, x_t, t_frame, view)  # the plain model's code
        return (x, t_emb, frame_mod, text_emb, *meta)


class BlockStage(nn.Module):
    """One STDiT block; RoPE angles are computed from the integer coordinates once per stage and micro-batch."""

    def __init__(self, block, head_dim: int, cfg, dsp: bool = False):
        super().__init__()
        self.block, self.head_dim, self.cfg, self.dsp = block, head_dim, cfg, dsp

    def forward(self, inputs):
        x, t_emb, frame_mod, text_emb, *meta = inputs
        view = _cached_view(tuple(meta), self.dsp)
        if not hasattr(meta[-1], "rope_angles"):
            meta[-1].rope_angles = rope_tables(view.coords, self.head_dim, self.cfg.rope_theta,
                                               self.cfg.rope_axes == "per_attention")
        return (self.block(x, frame_mod, text_emb, meta[-1].rope_angles, view), t_emb, frame_mod, text_emb, *meta)


class FinalStage(nn.Module):
    """Last stage: the final layer; the loss is the pipeline's loss_fn."""

    def __init__(self, final_layer):
        super().__init__()
        self.final_layer = final_layer

    def forward(self, inputs):
        x, t_emb, _, _, token_frame, *_ = inputs
        return self.final_layer(x, t_emb, token_frame)
