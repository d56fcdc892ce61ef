"""What the ``chunkkv`` backend keeps: read once per process from the environment.

``CHUNKKV_CONFIG`` names a JSON file whose keys are the field names of :class:`ChunkKVSettings`;
each field can also be set (or overridden) by its own variable, ``CHUNKKV_<FIELD>`` in upper
case, e.g. ``CHUNKKV_RATIO=0.1``. SGLang starts one scheduler process per rank, and each reads
the same variables, so every tensor-parallel rank compresses alike.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from ...ops._checks import check_budget, check_int
from ...policies import ChunkKV, Policy, chunk_policy, make_policy

CONFIG_VARIABLE = "CHUNKKV_CONFIG"
DEFAULT_RATIO = 0.1
# sparse: the chunks selected at prefill are read in place; dynamic: every decode step picks
# its own chunks from per-chunk key bounds with that step's query (DESIGN.md, SGLang).
MODES = ("sparse", "dynamic")


@dataclass(frozen=True)
class ChunkKVSettings:
    """ChunkKV parameters (SPEC.md). Exactly one of ``budget`` (tokens per KV head) and
    ``ratio`` (``L = floor(ratio * T)``); with neither, ``ratio`` is 0.1.

    ``policy`` names a registered selection policy (``triton_chunkkv.policies.POLICIES``);
    ``chunk_size``, ``window``, ``share_heads`` and ``pool_kernel`` configure ``chunkkv``, and
    ``policy_options`` (a JSON object, e.g. ``{"sink_tokens": 4}``) any policy's own options.
    ``record_selections`` keeps the retained sets of that many recent requests for
    ``get_server_info()`` (0: only counts). ``mode`` is ``"sparse"`` (prefill-time selection,
    read in place) or ``"dynamic"`` (the full cache plus per-chunk key bounds; each decode step
    reads the chunks its own query scores highest, as many as the budget allows; the policy
    gives only its ``chunk_size`` and ``window``).
    """

    budget: int | None = None
    ratio: float | None = None
    chunk_size: int = 10
    window: int = 32
    reuse_layers: int = 1
    share_heads: bool = False
    pool_kernel: int = 1
    policy: str = "chunkkv"
    policy_options: dict = field(default_factory=dict)
    record_selections: int = 0
    mode: str = "sparse"

    def __post_init__(self):
        if self.budget is None and self.ratio is None:
            object.__setattr__(self, "ratio", DEFAULT_RATIO)
        check_budget(self.budget, self.ratio)
        check_int("reuse_layers", self.reuse_layers, minimum=1)
        check_int("record_selections", self.record_selections, minimum=0)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.policy_options, dict):
            raise TypeError(f"policy_options must be a JSON object, got {self.policy_options!r}")
        self.make_policy()  # checks every policy option

    def make_policy(self) -> Policy:
        chunk_options = dict(
            chunk_size=self.chunk_size,
            window=self.window,
            share_heads=self.share_heads,
            pool_kernel=self.pool_kernel,
        )
        if self.policy == "chunkkv":
            return ChunkKV(**chunk_options, **self.policy_options)
        return chunk_policy(make_policy(self.policy, **self.policy_options), **chunk_options)

    def as_dict(self) -> dict:
        return asdict(self)

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
            setting.name: _parse(setting.name, environ[variable])
            for setting in fields(cls)
            if (variable := f"CHUNKKV_{setting.name.upper()}") in environ
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
        if name in ("policy", "mode"):
            return raw
        if name == "policy_options":
            return json.loads(raw)
        return float(raw) if name == "ratio" else int(raw)
    except ValueError:
        raise ValueError(f"{variable} has an invalid value {raw!r}") from None
