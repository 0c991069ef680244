"""Reference decode pipeline: a Hugging Face causal LM with attention offloaded over lamina-net.

The model worker keeps embeddings, projections, MLPs, norms and the LM head;
attention workers keep a head shard of the KV cache and compute attention.
See ``docs/decode.md``. Submodules import torch/transformers; this package
stays light so that ``lamina-net --help`` does not pay for them.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelWorker": "model_worker",
    "DecodeStats": "model_worker",
    "AttentionServer": "attention_shard",
    "partition_heads": "partition",
    "HeadSplitError": "partition",
    "offload_attention": "converter",
    "restore_attention": "converter",
    "ConversionError": "converter",
    "PipelineError": "link",
    "WorkerFailure": "link",
    "run_local_pipeline": "pipeline",
    "LocalCluster": "pipeline",
    "RayCluster": "ray_launcher",
    "run_ray_pipeline": "ray_launcher",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
