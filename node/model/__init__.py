"""Numpy inference for llama-architecture GGUF models, sliceable into block-range stages."""
