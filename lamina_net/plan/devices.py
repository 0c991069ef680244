"""Accelerator specs: the built-in presets (devices.json) and user JSON files.

A device file is a JSON object mapping a name to its spec::

    {"mi300x": {"bf16_tflops": 1307, "memory_gb": 192, "memory_bandwidth_gbs": 5300,
                "price_per_hour": 6.0, "nic_gbps": 400}}

Units: dense BF16 TFLOPS, memory in GiB (what nvidia-smi shows as "80GB"),
memory bandwidth in GB/s (1e9 bytes/s, as datasheets quote it), US dollars
per hour, NIC line rate in Gb/s. Names are case-insensitive; a file's entries
replace presets of the same name.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import PlanError

PRESETS_FILE = Path(__file__).with_name("devices.json")

_NUMERIC_FIELDS = ("bf16_tflops", "memory_gb", "memory_bandwidth_gbs", "price_per_hour", "nic_gbps")
_TEXT_FIELDS = ("source",)


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator with its attached NIC and rental price."""

    name: str
    bf16_tflops: float
    memory_gb: float
    memory_bandwidth_gbs: float
    price_per_hour: float
    nic_gbps: float
    source: str = ""

    @property
    def flops_per_s(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 2**30

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gbs * 1e9

    @property
    def nic_bytes_per_s(self) -> float:
        return self.nic_gbps * 1e9 / 8

    @property
    def label(self) -> str:
        """Display name, e.g. ``H100``."""
        return self.name.upper()


def device_from_mapping(name: str, spec: Any, source: str) -> DeviceSpec:
    """Validate one device entry; every numeric field must be a positive finite number."""
    where = f"{source}: device {name!r}"
    if not isinstance(spec, Mapping):
        raise PlanError(f"{where} must be a JSON object of fields")
    unknown = sorted(set(spec) - set(_NUMERIC_FIELDS) - set(_TEXT_FIELDS))
    if unknown:
        raise PlanError(f"{where} has unknown field(s) {', '.join(unknown)} "
                        f"(expected {', '.join(_NUMERIC_FIELDS)}, optional source)")
    missing = [field for field in _NUMERIC_FIELDS if field not in spec]
    if missing:
        raise PlanError(f"{where} is missing {', '.join(missing)}")
    values: dict[str, float] = {}
    for field in _NUMERIC_FIELDS:
        value = spec[field]
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value <= 0):
            raise PlanError(f"{where}: '{field}' must be a positive number, got {value!r}")
        values[field] = float(value)
    return DeviceSpec(name=name.lower(), source=str(spec.get("source", "")), **values)


def parse_devices(data: Any, source: str) -> dict[str, DeviceSpec]:
    """Turn a decoded device file into ``{lower-case name: DeviceSpec}``."""
    if not isinstance(data, Mapping) or not data:
        raise PlanError(f"{source}: expected a non-empty JSON object mapping device names to specs")
    return {str(name).lower(): device_from_mapping(str(name), spec, source) for name, spec in data.items()}


def load_device_file(path: str | Path) -> dict[str, DeviceSpec]:
    """Read and validate a device JSON file."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"cannot read device file {path}: {exc}") from exc
    return parse_devices(data, str(path))


def preset_devices() -> dict[str, DeviceSpec]:
    """The built-in presets shipped in devices.json."""
    return load_device_file(PRESETS_FILE)


def device_catalog(extra_file: str | Path | None = None) -> dict[str, DeviceSpec]:
    """Presets, extended or overridden by ``extra_file`` when given."""
    catalog = preset_devices()
    if extra_file is not None:
        catalog.update(load_device_file(extra_file))
    return catalog


def resolve_device(catalog: Mapping[str, DeviceSpec], name: str, role: str) -> DeviceSpec:
    """Look up ``name`` for ``role`` (compute/attention) with a helpful error."""
    device = catalog.get(name.lower())
    if device is None:
        raise PlanError(f"unknown {role} device {name!r} (known: {', '.join(sorted(catalog))}; "
                        "add your own with --devices FILE)")
    return device
