"""empg convert: each trainer's layout, written as the trainer writes it, converted and checked field by field;
detection without --from; broken sources give one error line naming file and line, exit 2, no output."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from empg_cli.cli import main
from empg_cli.errors import BadInput
from empg_cli.ingest import common, convert, convert_file, prime_rl
from empg_cli.ingest.common import Options
from reference import prime_steps_ref
from ingest_layouts import (prime_episode, prime_node, prime_trace, verl_rows, write_areal, write_art, write_prime,
                            write_rllm, write_trl, write_verl)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def metadata(path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"empg"])


def test_verl_legacy_dump_regroups_reordered_rows_by_identical_input(tmp_path, capsys):
    rng = np.random.default_rng(0)
    dump = tmp_path / "rollout_data"
    written = {step: verl_rows(rng, step, prompts=3, n=4) for step in (1, 2)}
    for step, rows in written.items():
        write_verl(dump, step, rows)
    code, out, err = run_cli(capsys, "convert", dump)                 # detected, default output beside the folder
    assert code == 0, err
    path = tmp_path / "rollout_data.rollouts.parquet"
    assert "verl" in out and "text" in out and "24" in out
    assert metadata(path)["source"] == {"format": "verl", "fidelity": "text", "paths": ["rollout_data"]}
    frame = pl.read_parquet(path)
    source = [r for step in (1, 2) for r in written[step]]           # file order: 1.jsonl then 2.jsonl
    assert frame["prompt"].to_list() == [r["input"] for r in source]
    assert frame["response"].to_list() == [r["output"] for r in source]
    assert frame["reward"].to_list() == [r["score"] for r in source]
    assert frame["iteration"].to_list() == [r["step"] for r in source]
    assert frame["gts"].to_list() == [r["gts"] for r in source] and frame["acc"].to_list() == [r["acc"] for r in source]
    assert frame["step"].to_list() == [0] * len(source)
    for it in (1, 2):
        part = frame.filter(pl.col("iteration") == it)
        by_group = part.group_by("group_id").agg(pl.col("prompt").n_unique(), pl.col("traj_id").n_unique(), pl.len())
        assert by_group.height == 3 and (by_group["prompt"] == 1).all() and (by_group["traj_id"] == 4).all()
    assert run_cli(capsys, "validate", path)[0] == 0


def test_verl_v1_uid_gives_group_trajectory_and_turn(tmp_path):
    rng = np.random.default_rng(1)
    rows = verl_rows(rng, 7, prompts=2, n=3, v1=True, turns=3)
    write_verl(tmp_path / "dump", 7, rows)
    frame = convert(tmp_path / "dump")
    expected = [r["uid"].rsplit("_", 2) for r in rows]
    assert frame.select("group_id", "traj_id").rows() == [(g, t) for g, t, _ in expected]
    assert frame["step"].to_list() == [int(i) for _, _, i in expected]
    assert frame["iteration"].to_list() == [7] * len(rows)
    assert "uid" not in frame.columns and frame["pred"].to_list() == [r["pred"] for r in rows]


def test_trl_completions_blocks_weighted_nansum_and_advantage(tmp_path, capsys):
    rng = np.random.default_rng(2)
    for step, text in ((5, False), (10, True)):                       # some TRL versions log step as text
        write_trl(tmp_path / "out", step, prompts=3, n=4, rng=rng, step_as_text=text)
    code, out, err = run_cli(capsys, "convert", tmp_path / "out", "--group-size", 4, "--reward-weights", "2,0.5",
                             "-o", tmp_path / "trl.parquet")
    assert code == 0, err
    frame = pl.read_parquet(tmp_path / "trl.parquet")
    source = pl.concat([pl.read_parquet(p).with_columns(pl.col("step").cast(pl.Int64))
                        for p in sorted((tmp_path / "out" / "completions").glob("*.parquet"))])
    assert frame["iteration"].to_list() == source["step"].to_list()
    assert frame["prompt"].to_list() == source["prompt"].to_list()
    assert frame["response"].to_list() == source["completion"].to_list()
    for row, src in zip(frame.iter_rows(named=True), source.iter_rows(named=True)):
        acc = src["accuracy_reward"] or 0.0            # pandas writes TRL's NaN as a Parquet null
        assert row["reward"] == pytest.approx(2 * acc + 0.5 * src["format_reward"], abs=1e-12)
    assert frame["advantage"].to_list() == source["advantage"].to_list()
    assert frame["n_tool_calls"].to_list() == source["n_tool_calls"].to_list()     # an extra: kept, not summed
    assert frame["accuracy_reward"].to_list() == source["accuracy_reward"].to_list()
    assert frame.filter(pl.col("iteration") == 5)["group_id"].to_list() == [str(i // 4) for i in range(12)]
    assert frame.filter(pl.col("iteration") == 5)["traj_id"].to_list() == [str(i % 4) for i in range(12)]
    # --estimator column works on the carried advantage once it is equal per trajectory (one step each: it is)
    assert run_cli(capsys, "validate", tmp_path / "trl.parquet")[0] == 0


def test_trl_without_group_size_says_how_big_the_groups_look(tmp_path, capsys):
    write_trl(tmp_path / "out", 1, prompts=2, n=8, rng=np.random.default_rng(3))
    code, _, err = run_cli(capsys, "convert", tmp_path / "out", "-o", tmp_path / "x.parquet")
    assert code == 2 and "--group-size" in err and "runs of 8" in err
    assert not (tmp_path / "x.parquet").exists()


def _prime_layout(tmp_path):
    root = tmp_path / "outputs"
    episodes = [prime_episode("e0", "task-a", 3, [prime_trace([([1, 2, 3], [10, 11]), ([4, 5], [12])],
                                                               {"correct": (1.0, 1.0), "format": (0.5, 0.2)},
                                                               lead=[99])]),
                prime_episode("e1", "task-a", 3, [prime_trace([([1, 2, 3], [13])], {"correct": (0.0, 1.0)})])]
    write_prime(root, 3, episodes, subset="effective")
    write_prime(root, 3, episodes[:1] + [prime_episode("e9", "task-b", 3, [])], subset="all")  # effective wins
    write_prime(root, 3, [prime_episode("v0", "task-z", 3, [prime_trace([([8], [9])], {"c": (1.0, 1.0)})])],
                split="eval")
    return root


def test_prime_rl_traces_give_exact_ids(tmp_path):
    summary = convert_file(_prime_layout(tmp_path) / "rollouts", tmp_path / "p.parquet")
    assert (summary.format, summary.fidelity, summary.rows, summary.trajectories) == ("prime-rl", "ids", 3, 2)
    frame = pl.read_parquet(tmp_path / "p.parquet")
    assert frame["prompt_ids"].to_list() == [[1, 2, 3, 99], [1, 2, 3, 99, 10, 11, 4, 5, 99], [1, 2, 3]]
    assert frame["response_ids"].to_list() == [[10, 11], [12], [13]]
    assert frame["step"].to_list() == [0, 1, 0] and frame["iteration"].to_list() == [3, 3, 3]
    assert frame["group_id"].to_list() == ["task-a"] * 3 and frame["traj_id"].n_unique() == 2
    assert frame["reward"].to_list() == pytest.approx([1.0 + 0.5 * 0.2, 1.1, 0.0])
    assert frame["logprobs"].to_list() == [[-0.5, -0.5], [-0.5], [-0.5]]


def test_prime_rl_branches_each_sampled_node_prompted_by_its_own_path(tmp_path):
    """Compaction starts a new root, a subagent branches off an earlier node: every sampled node is a step, in node
    order, its prompt its own root path; a non-trainable agent's trace (a judge) is not a trajectory."""
    nodes = [prime_node(None, [1, 2]), prime_node(0, [99, 20, 21], 2), prime_node(1, [5]), prime_node(2, [99, 22], 1),
             prime_node(None, [8, 8]), prime_node(4, [99, 23], 1), prime_node(1, [6]), prime_node(6, [99, 24], 1)]
    judge = prime_trace([([1], [2])], {"c": (1.0, 1.0)})
    judge["agent"]["trainable"] = False
    episode = prime_episode("e", "g", 0, [{"nodes": nodes, "rewards": {"solved": {"score": 1.0, "weight": 0.5},
                                                                        "skipped": None}}, judge])
    frame = convert(write_prime(tmp_path, 0, [episode]))
    assert frame["prompt_ids"].to_list() == [[1, 2, 99], [1, 2, 99, 20, 21, 5, 99], [8, 8, 99],
                                             [1, 2, 99, 20, 21, 6, 99]]
    assert frame["response_ids"].to_list() == [[20, 21], [22], [23], [24]]
    assert frame["step"].to_list() == [0, 1, 2, 3] and frame["reward"].to_list() == [0.5] * 4


def test_art_trainable_assistant_messages_are_the_steps(tmp_path):
    def msg(role, content, trainable=None, tool_calls=None):
        return {"role": role, "content": content, "tool_calls": tool_calls, "tool_call_id": None,
                "trainable": trainable}
    trajectories = [
        {"group_index": 0, "trajectory_index": 0, "reward": 1.0,
         "messages": [msg("system", "be brief"), msg("user", "2+2?"), msg("assistant", "4", True),
                      msg("user", "and 3+3?"), msg("assistant", None, True, '[{"name": "add"}]'),
                      msg("tool", "6"), msg("assistant", "6", True)]},
        {"group_index": 0, "trajectory_index": 1, "reward": 0.0,
         "messages": [msg("user", "2+2?"), msg("assistant", "an old reply", False), msg("assistant", "5", True)]}]
    write_art(tmp_path / "proj", "train", 12, trajectories)
    frame = convert(tmp_path / "proj")
    assert frame["response"].to_list() == ["4", '[{"name": "add"}]', "6", "5"]     # a tool call: its JSON
    assert frame["step"].to_list() == [0, 1, 2, 0] and frame["traj_id"].to_list() == ["0", "0", "0", "1"]
    assert frame["iteration"].to_list() == [12] * 4 and frame["reward"].to_list() == [1.0, 1.0, 1.0, 0.0]
    assert [len(m) for m in frame["messages"].to_list()] == [2, 4, 6, 2]
    assert frame["messages"][3].to_list()[1] == {"role": "assistant", "content": "an old reply"}
    assert frame["group_id"].unique().to_list() == ["train/0"]


def test_rllm_episodes_steps_in_order_with_the_trajectory_reward(tmp_path):
    def step(question, answer, reward):
        return {"chat_completions": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "model_response": answer, "reward": reward}
    for rollout, reward in ((0, 1.0), (1, 0.0)):
        write_rllm(tmp_path / "ckpt", 4, "task7", rollout,
                   [{"uid": f"u{rollout}", "reward": reward, "steps": [step("q1", f"a{rollout}", 0.0),
                                                                       step("q2", f"b{rollout}", reward)]}])
    write_rllm(tmp_path / "ckpt", 4, "task7", 0, [{"uid": "v", "reward": 1.0, "steps": [step("q", "a", 1.0)]}],
               mode="val")                                                     # validation: not read
    summary = convert_file(tmp_path / "ckpt", tmp_path / "r.parquet")
    assert (summary.format, summary.fidelity, summary.groups, summary.trajectories) == ("rllm", "messages", 1, 2)
    frame = pl.read_parquet(tmp_path / "r.parquet")
    assert frame["traj_id"].to_list() == ["u0", "u0", "u1", "u1"] and frame["step"].to_list() == [0, 1, 0, 1]
    assert frame["messages"][1].to_list() == [{"role": "user", "content": "q2"}]
    assert frame["response"].to_list() == ["a0", "b0", "a1", "b1"] and frame["iteration"].to_list() == [4] * 4
    assert frame["reward"].to_list() == [1.0, 1.0, 0.0, 0.0] and frame["step_reward"].to_list() == [0.0, 1.0, 0.0, 0.0]


def test_areal_version_folders_and_task_files(tmp_path):
    write_areal(tmp_path / "run", 2, 7, [{"reward": 1.0, "prompt": "<|user|>hi", "completion": "yo<|end|>"},
                                         {"reward": 0.0, "prompt": "<|user|>hi", "completion": "no<|end|>"}])
    write_areal(tmp_path / "run", 10, 7, [{"reward": 0.5, "prompt": "<|user|>hi", "completion": "ok<|end|>"}])
    write_areal(tmp_path / "run", 10, 8, [{"reward": 1.0, "prompt": "p", "completion": "c"}], folder="eval-rollout")
    frame = convert(tmp_path / "run")                                  # eval-rollout/ is evaluation: not read
    assert frame.select("iteration", "group_id", "traj_id", "response", "reward").rows() == [
        (2, "7", "0", "yo<|end|>", 1.0), (2, "7", "1", "no<|end|>", 0.0), (10, "7", "0", "ok<|end|>", 0.5)]
    assert frame["prompt_len"].to_list() == [8, 8, 8] and frame["prompt"].to_list() == ["<|user|>hi"] * 3


def test_generic_table_with_map(tmp_path):
    pl.DataFrame({"task": ["a", "a", "b"], "sample": [0, 1, 0], "turn": [0, 0, 0], "question": ["q", "q", "r"],
                  "completion": ["x", "y", "z"], "score": [1.0, 0.0, 1.0], "note": ["n1", "n2", "n3"]}
                 ).write_csv(tmp_path / "log.csv")
    frame = convert(tmp_path / "log.csv", map=["group_id=task", "traj_id=sample", "step=turn", "prompt=question",
                                              "response=completion", "reward=score"])
    assert frame.columns[:7] == ["run", "group_id", "traj_id", "step", "prompt", "response", "reward"]
    assert frame["traj_id"].to_list() == ["0", "1", "0"] and frame["note"].to_list() == ["n1", "n2", "n3"]


def test_unknown_layout_lists_the_formats(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.jsonl").write_text('{"foo": 1}\n')
    code, _, err = run_cli(capsys, "convert", tmp_path / "x")
    assert code == 2 and err.count("\n") == 1 and "cannot tell" in err and "foo" in err
    assert all(name in err for name in ("verl", "trl", "prime-rl", "art", "rllm", "areal", "--map"))


@pytest.mark.parametrize("case", ["truncated", "mask", "id_type", "trl_rows", "missing"])
def test_broken_sources_one_error_line_exit_2_no_output(tmp_path, capsys, case):
    if case == "truncated":
        path = write_verl(tmp_path / "d", 1, verl_rows(np.random.default_rng(0), 1, 2, 2))
        path.write_text(path.read_text()[:-25])                      # the trainer died mid-line
        args, expect = [tmp_path / "d", "--from", "verl"], f"{path}: line 4 is not valid JSON"
    elif case == "mask":
        trace = prime_trace([([1, 2], [3, 4])], {"c": (1.0, 1.0)})
        trace["nodes"][-1]["mask"] = [True]                            # 2 token_ids
        path = write_prime(tmp_path, 0, [prime_episode("e", "g", 0, [prime_trace([([1], [2])], {})]),
                                         prime_episode("e", "g", 0, [trace])])
        args, expect = [path], f"{path}: line 2 has a node with 2 token_ids and 1 mask entries"
    elif case == "id_type":
        trace = prime_trace([([1, 2], [3, 4])], {"c": (1.0, 1.0)})
        trace["nodes"][1]["token_ids"][1] = "4"
        path = write_prime(tmp_path, 0, [prime_episode("e", "g", 0, [trace])])
        args = [path]
        expect = (f"{path}: line 1 does not fit the layout: Expected `int`, got `str` - at "
                  "`$.traces[0].nodes[1].token_ids[1]`")
    elif case == "trl_rows":
        path = write_trl(tmp_path / "o", 1, prompts=2, n=5, rng=np.random.default_rng(0))
        args = [tmp_path / "o", "--group-size", 4]
        expect = f"{path}: row 8: has 10 rows, not a multiple of --group-size 4"
    else:
        path = write_areal(tmp_path / "r", 1, 3, [{"reward": 1.0, "prompt": "p", "completion": "c"},
                                                    {"prompt": "p", "completion": "c"}])
        args, expect = [tmp_path / "r", "--from", "areal"], f"{path}: line 2 has no field 'reward'"
    code, out, err = run_cli(capsys, "convert", *args, "-o", tmp_path / "out.parquet")
    assert code == 2 and err.startswith(f"error: {expect}") and err.count("\n") == 1, err
    assert not (tmp_path / "out.parquet").exists() and "Traceback" not in err


@pytest.mark.parametrize("fmt", ["verl", "trl", "prime-rl", "art", "rllm", "areal"])
def test_detection_without_from(tmp_path, fmt):
    rng = np.random.default_rng(0)
    if fmt == "verl":
        write_verl(tmp_path / "s", 1, verl_rows(rng, 1, 1, 2))
    elif fmt == "trl":
        write_trl(tmp_path / "s", 1, 1, 2, rng)
    elif fmt == "prime-rl":
        write_prime(tmp_path / "s", 1, [prime_episode("e", "g", 1, [prime_trace([([1], [2])], {})])])
    elif fmt == "art":
        write_art(tmp_path / "s", "train", 1, [{"group_index": 0, "trajectory_index": 0, "reward": 1.0, "messages": [
            {"role": "user", "content": "q", "tool_calls": None, "tool_call_id": None, "trainable": None},
            {"role": "assistant", "content": "a", "tool_calls": None, "tool_call_id": None, "trainable": True}]}])
    elif fmt == "rllm":
        write_rllm(tmp_path / "s", 1, "t", 0, [{"uid": "u", "reward": 1.0, "steps": [
            {"chat_completions": [{"role": "user", "content": "q"}], "model_response": "a", "reward": 1.0}]}])
    else:
        write_areal(tmp_path / "s", 1, 3, [{"reward": 1.0, "prompt": "p", "completion": "c"}])
    summary = convert_file(tmp_path / "s", tmp_path / "out.parquet", group_size=2 if fmt == "trl" else None)
    assert summary.format == fmt


def test_scoring_a_text_conversion_warns_once_that_entropies_are_approximate(tmp_path, capsys, tiny_model_dir):
    write_verl(tmp_path / "d", 2, verl_rows(np.random.default_rng(4), 2, prompts=2, n=2))
    assert run_cli(capsys, "convert", tmp_path / "d", "-o", tmp_path / "v.parquet")[0] == 0
    code, out, err = run_cli(capsys, "score", tmp_path / "v.parquet", "--model", tiny_model_dir, "--device", "cpu")
    assert code == 0, err
    assert err.count("warning:") == 1 and "approximate" in err and "v.parquet" in err
    scored = tmp_path / "v.scored.parquet"
    assert metadata(scored)["fidelity"] == "text" and metadata(scored)["source"]["format"] == "verl"


def test_detection_looks_past_other_logs_beside_the_dump(tmp_path):
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "stats.jsonl").write_text('{"step": 1, "loss": 0.5}\n')   # the trainer's metrics
    write_areal(tmp_path / "log", 1, 3, [{"reward": 1.0, "prompt": "p", "completion": "c"}])
    assert convert_file(tmp_path / "log", tmp_path / "out.parquet").format == "areal"


@st.composite
def prime_forests(draw):
    """Episodes whose traces are random forests of nodes (roots, chains and branches), some nodes sampled with a
    masked-in run somewhere inside their ids, some with no logprobs."""
    episodes = []
    for e in range(draw(st.integers(1, 6))):
        traces = []
        for _ in range(draw(st.integers(0, 3))):
            nodes = []
            for i in range(draw(st.integers(1, 8))):
                ids = draw(st.lists(st.integers(0, 50), min_size=0, max_size=5))
                lead = draw(st.integers(0, len(ids)))
                run = draw(st.integers(0, len(ids) - lead))
                node = prime_node(draw(st.one_of(st.none(), st.integers(0, i - 1))) if i else None, ids)
                node.update(sampled=draw(st.booleans()), mask=[lead <= j < lead + run for j in range(len(ids))],
                            logprobs=draw(st.sampled_from([[-0.25] * run, []])))
                nodes.append(node)
            traces.append({"nodes": nodes, "rewards": {}, "agent": {"trainable": draw(st.booleans())}})
        episodes.append(prime_episode(f"e{e}", "g", 0, traces))
    return episodes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prime_forests(), st.sampled_from([1, 500, 3000, 1 << 22]))
def test_prime_rl_paths_match_a_node_by_node_walk(tmp_path_factory, monkeypatch, episodes, piece_bytes):
    """The numpy walk over pieces of the file gives every step the prompt and response of the recursive walk."""
    monkeypatch.setattr(common, "PIECE_BYTES", piece_bytes)
    expected = prime_steps_ref(episodes)
    path = write_prime(tmp_path_factory.mktemp("p"), 0, episodes)
    if not expected:
        with pytest.raises(BadInput, match="no sampled tokens"):
            prime_rl.read([path], Options())
        return
    frame = prime_rl.read([path], Options()).frame
    assert frame.select("traj_id", "step", "prompt_ids", "response_ids", "logprobs").to_dicts() == [
        {**row, "logprobs": None if row["logprobs"] is None else pytest.approx(row["logprobs"])} for row in expected]


@pytest.mark.parametrize("helper", [False, True], ids=["one process", "with the helper"])
def test_prime_rl_names_the_first_broken_line_across_pieces(tmp_path, monkeypatch, helper):
    """Nodes are checked a piece of the file at a time, yet the error is the first in file order: a bad parent on
    line 2 is named before the truncated line 3, and before a missing field later in the same piece."""
    monkeypatch.setattr(common, "PIECE_BYTES", 1500)  # two of these lines a piece
    monkeypatch.setattr(common, "PARALLEL_BYTES", 0 if helper else 1 << 40)
    good = prime_episode("a", "g", 0, [prime_trace([([1], [2])], {})])
    bad = prime_episode("b", "g", 0, [prime_trace([([1], [2])], {})])
    bad["traces"][0]["nodes"][1]["parent"] = 5
    path = write_prime(tmp_path, 0, [good, bad, {"id": "c"}])
    with pytest.raises(BadInput, match="line 2 has a node whose parent 5 is not an earlier node"):
        convert(path)
    path.write_text(path.read_text()[:-10])                            # line 3 cut short
    with pytest.raises(BadInput, match="line 2 has a node whose parent 5"):
        convert(path)
    path.write_text("\n".join([json.dumps(good), json.dumps({"id": "c"}), json.dumps(bad)]) + "\n")
    with pytest.raises(BadInput, match="line 2 has no field 'group'"):
        convert(path)
