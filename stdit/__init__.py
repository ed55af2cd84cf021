"""stdit: distributed training of Spatial-Temporal Video Diffusion Transformers."""

__version__ = "0.1.0"
