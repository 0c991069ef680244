"""The one exception type that ``lamina-net plan`` reports as a clean error."""
from __future__ import annotations


class PlanError(ValueError):
    """Bad planner input (unknown preset, malformed file, impossible split).

    The CLI prints its message and exits non-zero instead of a traceback.
    """
