"""OpenPipe ART's trajectory logs (parquet format v2): `trajectories/{split}/{step:04d}.parquet`.

One row per trajectory: `group_index`, `trajectory_index`, `reward`, and `messages`, a list of
{role, content, tool_calls, tool_call_id, trainable}. The model's turns are the assistant messages marked
`trainable`, in order; each is one step, its prompt the messages before it, its response its content (its tool
calls as JSON when it has no content). The split folder and the file's step number give the iteration's rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import polars as pl

from ..errors import BadInput
from .common import MESSAGE, Converted, Options, each_file, number_in, rollouts_frame

FIDELITY = "messages"
PATTERN = "*.parquet"
FIELDS = ("group_index", "trajectory_index", "reward", "messages")


def _content(message: dict[str, Any]) -> str:
    """A message's text; a tool call without text becomes its JSON."""
    if message.get("content"):
        return message["content"]
    calls = message.get("tool_calls")
    return json.dumps(calls, ensure_ascii=False) if calls else ""


def read_file(path: Path, options: Options) -> pl.DataFrame:
    raw = pl.read_parquet(path)
    for name in FIELDS:
        if name not in raw.columns:
            raise BadInput(path, f"has no column '{name}' (ART's trajectory parquet has {', '.join(FIELDS)})")
    iteration = number_in(path, r"(\d+)\.parquet$")
    split = path.parent.name
    rows: dict[str, list] = {k: [] for k in ("group_id", "traj_id", "step", "messages", "response", "reward", "_row")}
    for i, (group, trajectory, reward, messages) in enumerate(raw.select(FIELDS).iter_rows()):
        if messages is None:
            raise BadInput(path, "is null", column="messages", row=i)
        history = [{"role": m["role"], "content": _content(m)} for m in messages]
        step = 0
        for k, message in enumerate(messages):
            if message["role"] == "assistant" and message.get("trainable"):
                rows["group_id"].append(f"{split}/{group}")
                rows["traj_id"].append(str(trajectory))
                rows["step"].append(step)
                rows["messages"].append(history[:k])
                rows["response"].append(history[k]["content"])
                rows["reward"].append(reward)
                rows["_row"].append(i)
                step += 1
    extra = raw.drop(*FIELDS)[rows.pop("_row")]
    rows["messages"] = pl.Series(rows["messages"], dtype=MESSAGE)
    return rollouts_frame({"iteration": [iteration] * len(rows["step"]), **rows}, extra, options.run)


def read(sources: Sequence[Path], options: Options) -> Converted:
    return Converted(each_file(sources, PATTERN, read_file, options), FIDELITY)
