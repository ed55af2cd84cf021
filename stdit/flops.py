"""Model FLOPs of a training step (forward + backward = 3x forward), counted on real tokens only, and the
peak bf16 throughput of known GPUs for model-FLOPs utilisation (MFU)."""
from __future__ import annotations

import torch

# dense bf16 tensor-core peak, FLOP/s
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def forward_flops(model_cfg, text_dim: int, grids: list[tuple[int, int, int]], text_lens: list[int]) -> float:
    """Matmul FLOPs of one STDiT forward over videos with token grids (T', H', W') and caption lengths."""
    h, depth = model_cfg.hidden_size, model_cfg.depth
    factorized = model_cfg.attention == "factorized"
    patch_dim = model_cfg.in_channels * model_cfg.patch_size[0] * model_cfg.patch_size[1] * model_cfg.patch_size[2]
    self_attns = 2 if factorized else 1
    per_token = 2 * (self_attns * 4 * h * h + 2 * h * h + 2 * model_cfg.mlp_ratio * h * h)  # qkv+proj, q+proj, MLP
    total = 0.0
    for (t, hh, ww), s in zip(grids, text_lens):
        n = t * hh * ww
        total += depth * (n * per_token + s * 2 * 2 * h * h)                    # linears (text: kv)
        scores = t * (hh * ww) ** 2 + (hh * ww) * t ** 2 if factorized else n ** 2
        total += depth * (4 * h * scores + 4 * h * n * s)                        # QK^T and AV, self + cross
        total += 2 * n * (patch_dim * h * 2) + 2 * s * (text_dim * h + h * h)    # embed/final, caption MLP
    return total


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of this GPU if known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
