"""Hugging Face checkpoints and transformers models on qmoe.

* :func:`convert` -- a checkpoint folder (config.json + safetensors shards)
  into a qmoe file: every MoE layer's experts quantized, its router, routing
  description and shared-expert tensors beside them
  (``python -m qmoe.hf convert`` / ``qmoe convert``).
* :func:`quantize_model` -- swap the experts of a loaded transformers model
  for qmoe layers, in place.
* :func:`from_pretrained` -- a transformers model whose experts come from a
  converted qmoe file (the float experts are never built).

Families: Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss, DeepSeek-V3, OLMoE,
Granite-MoE, Phi-3.5-MoE. :func:`convert` needs only NumPy; the other two
need torch and transformers, imported when called.
"""

from __future__ import annotations

from ._convert import convert
from ._families import FAMILIES
from ._model import quantize_model
from ._pretrained import from_pretrained

__all__ = ["convert", "quantize_model", "from_pretrained", "FAMILIES"]
