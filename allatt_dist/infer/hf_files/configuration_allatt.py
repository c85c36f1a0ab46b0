"""Configuration of an All-attention / Transformer-XL language model exported by allatt-dist."""

from __future__ import annotations

from transformers import PretrainedConfig


class AllAttConfig(PretrainedConfig):
    """The switches of the exported model (allatt-dist's docs/model.md names each). Layers may keep
    different numbers of heads (`heads_per_layer`; 0 is a layer without attention)."""

    model_type = "allatt"

    vocab_size: int = 2
    hidden_dim: int = 16
    head_dim: int = 4
    heads_per_layer: list[int] | None = None
    num_persistent: int = 0  # persistent key/value vectors per head (All-attention); 0 for none
    ffn_dim: int = 0  # feed-forward width (Transformer-XL); 0 for none
    seq_len: int = 8  # the segment length trained with
    mem_len: int = 8  # memory positions a segment attends beyond itself
    same_length: bool = True  # every query sees at most mem_len positions back
    adaptive_cutoffs: list[int] | None = None  # adaptive input/softmax clusters; None: a tied full softmax
    adaptive_div: int = 4
    adaptive_proj: bool = False  # d x d projections before the shortlist, biases on the tail clusters
    final_norm: bool = True
    persistent_content_bias: bool = True  # persistent keys scored with (q + u), else with the bare q
    zero_memory_start: bool = False  # the first segment attends over mem_len zero vectors
    positions: str = "sinusoid"  # or "learned": a table of `position_rows` relative distances
    position_rows: int = 16
    attn_out_bias: bool = False  # a bias on the attention output projection
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False  # the weights are tied inside the model, not by transformers
