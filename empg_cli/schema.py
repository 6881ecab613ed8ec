"""The table schemas of `schemas/*.json` and the column-level check of an Arrow table against them."""

from __future__ import annotations

import difflib
import json
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa

from .errors import BadInput

SCHEMA_VERSION = 1


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The parsed `schemas/<name>.v<SCHEMA_VERSION>.json`."""
    return json.loads(files("empg_cli").joinpath("schemas", f"{name}.v{SCHEMA_VERSION}.json").read_text())


_KEYS = load_schema("rollouts")["keys"]
TRAJ_KEYS: list[str] = _KEYS["trajectory"]
"""Columns identifying a trajectory: run, iteration, group_id, traj_id."""
GROUP_KEYS: list[str] = _KEYS["group"]
"""Columns identifying a group (trajectories of one task at one iteration): run, iteration, group_id."""


def schema_text(name: str) -> str:
    """The schema file as shipped, for `empg schema`."""
    return files("empg_cli").joinpath("schemas", f"{name}.v{SCHEMA_VERSION}.json").read_text()


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t) or pa.types.is_fixed_size_list(t)


def is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_messages(t: pa.DataType) -> bool:
    if not (_is_list(t) and pa.types.is_struct(t.value_type)):
        return False
    struct = t.value_type
    names = {struct.field(i).name: struct.field(i).type for i in range(struct.num_fields)}
    return all(k in names and is_text(names[k]) for k in ("role", "content"))


TYPE_CHECKS: dict[str, Callable[[pa.DataType], bool]] = {
    "string": is_text,
    "id": lambda t: is_text(t) or pa.types.is_integer(t),
    "integer": pa.types.is_integer,
    "int32": pa.types.is_integer,
    "int64": pa.types.is_integer,
    "float64": lambda t: pa.types.is_floating(t) or pa.types.is_integer(t),
    "list<int32>": lambda t: _is_list(t) and pa.types.is_integer(t.value_type),
    "list<float32>": lambda t: _is_list(t) and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)),
    "list<struct<role:string,content:string>>": _is_messages,
}


TRAINER_NAMES = {
    "group_id": ("uid", "group_index", "task_id", "prompt_id"),
    "traj_id": ("traj_uid", "trajectory_index", "trajectory_id", "sample_idx", "rollout_idx"),
    "step": ("turn", "turn_idx", "step_idx"),
    "prompt": ("input", "query", "question"),
    "response": ("completion", "output", "model_response", "answer"),
    "reward": ("score", "rewards", "return"),
}
"""What trainers call our columns (see docs/ingest.md): suggested before difflib's closest name."""


def closest_column(name: str, present: Sequence[str]) -> str | None:
    """The present column most likely meant as `name`: a trainer's usual name for it, else difflib's closest."""
    known = {c["name"] for c in load_schema("rollouts")["columns"]}
    others = [c for c in present if c not in known]
    for alias in TRAINER_NAMES.get(name, ()):
        if alias in others:
            return alias
    close = difflib.get_close_matches(name, others, n=1, cutoff=0.5)
    return close[0] if close else None


def missing_column_hint(name: str, present: Sequence[str]) -> str:
    """"; did you mean 'completion'? (`empg convert --map response=completion`)", or nothing."""
    guess = closest_column(name, present)
    return f"; did you mean '{guess}'? (`empg convert --map {name}={guess}`)" if guess else ""


def check_column_types(schema_: pa.Schema, path: str | Path, name: str) -> None:
    """Every column the schema `name` knows that is present must have a compatible Arrow type."""
    schema = load_schema(name)
    columns = list(schema["columns"])
    if name == "scored":
        columns = load_schema("rollouts")["columns"] + columns
    for col in columns:
        if col["name"] in schema_.names:
            actual = schema_.field(col["name"]).type
            if not TYPE_CHECKS[col["type"]](actual):
                raise BadInput(path, f"has Arrow type {actual}, expected {col['type']} "
                                     f"(see `empg schema {name}`)", column=col["name"])


def check_key_columns(names: Sequence[str], path: str | Path) -> None:
    """The always-required rollout columns (group_id, traj_id, step, reward) are among `names`."""
    for col in load_schema("rollouts")["columns"]:
        if col["required"] is True and col["name"] not in names:
            raise BadInput(path, f"required column '{col['name']}' is missing{missing_column_hint(col['name'], names)}"
                                 "; the rollouts schema is `empg schema rollouts`")


def check_required_columns(schema_: pa.Schema, path: str | Path, text: bool = True) -> tuple[str | None, str | None]:
    """Required rollout columns are present, and (with `text`) an input and an output column; returns the chosen
    (input, output) columns, ids before text, or None where absent and not asked for."""
    schema = load_schema("rollouts")
    check_key_columns(schema_.names, path)
    chosen = []
    for role, candidates in schema["one_of"].items():
        present = [c for c in candidates if c in schema_.names] or [None] * (not text)
        if not present:
            hint = next(filter(None, (missing_column_hint(c, schema_.names) for c in candidates)), "")
            raise BadInput(path, f"no policy {role} column: one of {', '.join(candidates)} is required"
                                 + (hint or " (see `empg schema rollouts`)"))
        chosen.append(present[0])
    return chosen[0], chosen[1]
