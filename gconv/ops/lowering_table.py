"""Measured lowering choices for known devices, which `impl="auto"` takes before measuring.

A table is a JSON file, `{"device_kind": ..., "measured": "...", "choices": {KEY: lowering}}`, in the directory
`GCONV_LOWERING_TABLES` names (default: `gconv/ops/lowering_tables/`, where gconv ships the tables it has
measured; none yet). KEY is the key
`gconv.ops.choice` measures under, less the JAX version: a table measured once on a device kind serves later JAX
versions until the choice is measured again. `python bench/lowering_table.py` writes one for the device at hand
from every conv shape of the models it is given. Order of precedence in `autotune.pick`: a run's recorded choices,
this process's, the disk cache (`GCONV_AUTOTUNE_CACHE`), a table, and only then a measurement.
"""
from __future__ import annotations

import functools
import json
import os
import re

__all__ = ["ENV_TABLES", "portable", "lookup", "table_path"]

ENV_TABLES = "GCONV_LOWERING_TABLES"
_SHIPPED = os.path.join(os.path.dirname(__file__), "lowering_tables")


def portable(key: str) -> str:
    """A measuring key (`"forward [backend, device_kind, jax_version, ...]"`) without its JAX version."""
    direction, _, fields = key.partition(" ")
    values = json.loads(fields)
    return f"{direction} {json.dumps(values[:2] + values[3:])}"


def table_path(device_kind: str, directory: str | None = None) -> str:
    """Where the table of `device_kind` lives: `DIRECTORY/<device kind, lower case, non-alphanumerics as _>.json`."""
    name = re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_")
    return os.path.join(directory or os.environ.get(ENV_TABLES) or _SHIPPED, f"{name}.json")


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        return {}
    choices = table.get("choices") if isinstance(table, dict) else None
    if not isinstance(choices, dict):
        raise ValueError(f"{path} is not a lowering table (no 'choices' mapping): write it with "
                         f"bench/lowering_table.py, or remove it.")
    return choices


def lookup(key: str) -> str | None:
    """The table's choice for a measuring key, or None (no table for the key's device kind, or no entry)."""
    device_kind = json.loads(key.partition(" ")[2])[1]
    return _load(table_path(device_kind)).get(portable(key))
