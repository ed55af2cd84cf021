"""Kernels: varlen attention with a ladder of backends (flash_attn, torch_varlen, reference)."""
from stdit.ops.attention import BACKENDS, available_backends, resolve_backend, varlen_attention

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "varlen_attention"]
