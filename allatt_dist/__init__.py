"""allatt-dist: layer-wise head pruning of All-attention Transformers on Ray Train + DeepSpeed."""

__version__ = "0.1.0"
