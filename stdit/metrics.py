"""Run-directory logging: one JSON object per logged step in metrics.jsonl, plus TensorBoard events."""
from __future__ import annotations

import json
from pathlib import Path

import torch


class MetricsLogger:
    """Appends metrics to RUN_DIR/metrics.jsonl and writes the same scalars to TensorBoard (RUN_DIR/tb)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, step)

    def video(self, tag: str, frames_uint8: torch.Tensor, step: int) -> None:
        """Frames [T, H, W, 3] uint8 shown as a strip of images."""
        if self.enabled:
            self.tb.add_images(tag, frames_uint8, step, dataformats="NHWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
