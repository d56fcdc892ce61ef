"""What the ``chunkkv`` backend keeps: read once per process from the environment.

``CHUNKKV_CONFIG`` names a JSON file whose keys are the field names of :class:`ChunkKVSettings`;
each field can also be set (or overridden) by its own variable, ``CHUNKKV_<FIELD>`` in upper
case, e.g. ``CHUNKKV_RATIO=0.1``. SGLang starts one scheduler process per rank, and each reads
the same variables, so every tensor-parallel rank compresses alike.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

from ...ops._checks import check_budget, check_chunking, check_int

CONFIG_VARIABLE = "CHUNKKV_CONFIG"
DEFAULT_RATIO = 0.1


@dataclass(frozen=True)
class ChunkKVSettings:
    """ChunkKV parameters (SPEC.md). Exactly one of ``budget`` (tokens per KV head) and
    ``ratio`` (``L = floor(ratio * T)``); with neither, ``ratio`` is 0.1."""

    budget: int | None = None
    ratio: float | None = None
    chunk_size: int = 10
    window: int = 32
    reuse_layers: int = 1
    share_heads: bool = False

    def __post_init__(self):
        if self.budget is None and self.ratio is None:
            object.__setattr__(self, "ratio", DEFAULT_RATIO)
        check_budget(self.budget, self.ratio)
        check_chunking(self.chunk_size, self.window)
        check_int("reuse_layers", self.reuse_layers, minimum=1)
        if not isinstance(self.share_heads, bool):
            raise TypeError(f"share_heads must be a bool, got {self.share_heads!r}")

    @classmethod
    def from_env(cls, environ=None) -> ChunkKVSettings:
        """The JSON file named by ``CHUNKKV_CONFIG`` (if any), then ``CHUNKKV_<FIELD>``
        variables on top. Setting ``CHUNKKV_BUDGET`` drops a ``ratio`` from the file, and the
        other way round, so one variable is enough to switch modes."""
        environ = os.environ if environ is None else environ
        values = {}
        path = environ.get(CONFIG_VARIABLE)
        if path:
            with open(path) as f:
                values = json.load(f)
            if not isinstance(values, dict):
                raise ValueError(f"{CONFIG_VARIABLE} ({path}) must hold a JSON object")
            unknown = set(values) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"{CONFIG_VARIABLE} ({path}) has unknown keys {sorted(unknown)}")
        from_variables = {
            field.name: _parse(field.name, environ[variable])
            for field in fields(cls)
            if (variable := f"CHUNKKV_{field.name.upper()}") in environ
        }
        for chosen, other in (("budget", "ratio"), ("ratio", "budget")):
            if chosen in from_variables and other not in from_variables:
                values.pop(other, None)
        return cls(**{**values, **from_variables})


def _parse(name: str, raw: str):
    variable = f"CHUNKKV_{name.upper()}"
    try:
        if name == "share_heads":
            if raw.lower() not in ("0", "1", "true", "false"):
                raise ValueError
            return raw.lower() in ("1", "true")
        return float(raw) if name == "ratio" else int(raw)
    except ValueError:
        raise ValueError(f"{variable} has an invalid value {raw!r}") from None
