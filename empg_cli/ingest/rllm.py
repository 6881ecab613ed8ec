"""rLLM's episode logs (`rllm.episode_logging.log_episodes=true`): `EPISODE_LOG_DIR/episodes/{mode}_step_{s}_epoch_{e}/
episode_hash{task_hash}_id{episode_id}.json`, one Episode a file.

rLLM's `EpisodeLogger` writes `training_step`, `epoch`, `episode_id` = `{task_id}:{rollout_idx}` and
`trajectories[]`, each with its `uid`, `reward` and `steps[]`; a step holds `chat_completions` (the conversation,
the model's answer last), `model_response` and its own `reward`. Group = task_id, trajectory = the trajectory's
uid, step = index in `steps`; iteration = `training_step`, else the folder's step. The reward is the
trajectory's. Given a folder, the `train_step_*` episodes are read (`val_step_*` ones are validation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import polars as pl

from ..errors import BadInput
from .common import Converted, MessageLists, Options, need, number_in, preferred_files, read_json, rollouts_frame

FIDELITY = "messages"
PATTERN = "episode_*.json"


def _prompt(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages the model answered: the conversation without the model's own answer when it ends with it."""
    return chat[:-1] if chat and chat[-1].get("role") == "assistant" else chat


def read_file(path: Path, rows: dict[str, list]) -> None:
    episode = read_json(path)
    episode_id = str(episode.get("episode_id", episode.get("id", "")))
    if ":" not in episode_id:
        raise BadInput(path, f"line 1: episode id {episode_id!r} is not `{{task_id}}:{{rollout_idx}}`")
    task_id = episode_id.rsplit(":", 1)[0]
    iteration = episode.get("training_step")
    if iteration is None:
        iteration = number_in(path, r"_step_(\d+)_epoch_\d+/[^/]+$")
    for trajectory in need(episode, "trajectories", path, 1):
        uid = need(trajectory, "uid", path, 1, "trajectories[].")
        steps = need(trajectory, "steps", path, 1, "trajectories[].")
        responses = [s.get("model_response") if isinstance(s, dict) else None for s in steps]
        chats = [s.get("chat_completions") if isinstance(s, dict) else None for s in steps]
        if None in responses or None in chats:  # name the first step's first missing field
            for step in steps:
                need(step, "model_response", path, 1, "trajectories[].steps[].")
                need(step, "chat_completions", path, 1, "trajectories[].steps[].")
        rows["response"] += responses
        rows["messages"].add([_prompt(chat) for chat in chats])
        rows["step_reward"] += [s.get("reward") for s in steps]
        rows["iteration"] += [iteration] * len(steps)
        rows["group_id"] += [task_id] * len(steps)
        rows["traj_id"] += [str(uid)] * len(steps)
        rows["step"] += range(len(steps))
        rows["reward"] += [trajectory.get("reward")] * len(steps)


def read(sources: Sequence[Path], options: Options) -> Converted:
    rows: dict[str, Any] = {k: [] for k in ("iteration", "group_id", "traj_id", "step", "response", "reward",
                                            "step_reward")}
    rows["messages"] = MessageLists()
    for path in preferred_files(sources, PATTERN, lambda f: f.parent.name.startswith("train_")):
        read_file(path, rows)
    extra = pl.DataFrame({"step_reward": pl.Series(rows.pop("step_reward"), dtype=pl.Float64)})
    rows["messages"] = rows["messages"].series()
    return Converted(rollouts_frame(rows, extra, options.run), FIDELITY)
