"""Capacity and cost planner for attention-offloaded (Lamina-style) LLM decoding.

Pure Python: no torch, no compiled core. ``lamina-net plan`` (see cli.py)
wraps :func:`make_plan`; docs/plan.md describes the model and its assumptions.
"""
from .devices import DeviceSpec, device_catalog, load_device_file, preset_devices
from .errors import PlanError
from .estimate import Assumptions, Deployment, Estimate, Plan, estimate, make_plan
from .model import MODEL_PRESETS, ModelSpec, load_model, model_from_config

__all__ = [
    "Assumptions", "Deployment", "DeviceSpec", "Estimate", "MODEL_PRESETS", "ModelSpec", "Plan", "PlanError",
    "device_catalog", "estimate", "load_device_file", "load_model", "make_plan", "model_from_config",
    "preset_devices",
]
