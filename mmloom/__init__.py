"""mmloom: curated interleaved multimodal datasets and multimodal diffusion training."""

__version__ = "0.1.0"
