"""Model definitions and weight loaders.

Torch-free entry: `common.models.config` (ModelConfig, load_model_config). Torch modules:
`llama` (the decoder), `layers`, `loader` (load_model, resolve_dtype) and one file per
weight format (`weights_safetensors`, `weights_gguf`, `weights_dummy`). This package
imports none of them, so importing the config stays torch-free.
"""
