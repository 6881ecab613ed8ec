"""Bad input and bad usage: one `error:` line naming file, column and row; exit 2; input untouched; no output."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import random_rollouts, write_rollouts
from empg_cli.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _rows(**overrides) -> dict[str, list]:
    rows = {"group_id": ["g", "g", "g", "g"], "traj_id": ["a", "a", "b", "b"], "step": [0, 1, 0, 1],
            "prompt_ids": [[5, 6, 7], [5, 6, 7, 8, 9, 10], [5, 6], [5, 6, 11, 12]],
            "response_ids": [[8, 9], [11], [11], [13, 14]], "reward": [1.0, 1.0, 0.0, 0.0]}
    rows.update(overrides)
    return rows


def _write(tmp_path, rows=None, table=None, raw: bytes | None = None):
    path = tmp_path / "runs.parquet"
    if raw is not None:
        path.write_bytes(raw)
    elif table is not None:
        pq.write_table(table, path)
    else:
        write_rollouts(path, rows)
    return path


# (id, how to build the input, extra CLI flags, expected fragments of the one error line)
CASES = [
    ("not-parquet", dict(raw=b"run,step\nx,0\n"), [], ["is not a Parquet file"]),
    ("empty-file", dict(raw=b""), [], ["is not a Parquet file (it is empty)"]),
    ("no-rows", dict(table=pa.table({"group_id": pa.array([], pa.string())})), [], ["has no rows"]),
    ("missing-traj_id", dict(rows={k: v for k, v in _rows().items() if k != "traj_id"}), [],
     ["required column 'traj_id' is missing", "empg schema rollouts"]),
    ("no-response", dict(rows={k: v for k, v in _rows().items() if k != "response_ids"}), [],
     ["no policy output column", "response_ids, response"]),
    ("reward-is-text", dict(table=pa.Table.from_pydict(_rows(reward=["1", "1", "0", "0"]))), [],
     ["column 'reward'", "expected float64"]),
    ("null-traj_id", dict(rows=_rows(traj_id=["a", None, "b", "b"])), [], ["column 'traj_id', row 1", "is null"]),
    ("null-step", dict(rows=_rows(step=[0, 1, None, 1])), [], ["column 'step', row 2", "is null"]),
    ("nan-reward", dict(rows=_rows(reward=[1.0, 1.0, math.nan, 0.0])), [],
     ["column 'reward', row 2", "reward is nan; must be a finite number"]),
    ("inf-reward", dict(rows=_rows(reward=[math.inf, 1.0, 0.0, 0.0])), [], ["column 'reward', row 0", "inf"]),
    ("unequal-reward", dict(rows=_rows(reward=[1.0, 0.5, 0.0, 0.0])), [],
     ["column 'reward', trajectory (run='default', iteration=0, group_id='g', traj_id='a'), row 0",
      "differs within this trajectory", "--reward-agg sum"]),
    ("null-rewards", dict(rows=_rows(reward=[1.0, 1.0, None, None])), [],
     ["column 'reward', trajectory", "traj_id='b'", "row 2", "null on every step"]),
    ("step-gap", dict(rows=_rows(step=[0, 2, 0, 1])), [],
     ["column 'step', trajectory", "traj_id='a'", "steps are 0, 2; expected 0..1 with no gaps"]),
    ("duplicate-step", dict(rows=_rows(step=[0, 0, 0, 1])), [], ["column 'step'", "step 0 appears twice", "row 0"]),
    ("negative-step", dict(rows=_rows(step=[0, -1, 0, 1])), [], ["column 'step', row 1", "0-based"]),
    ("empty-response", dict(rows=_rows(response_ids=[[8, 9], [], [11], [13, 14]])), [],
     ["column 'response_ids', row 1", "is empty"]),
    ("null-prompt", dict(rows=_rows(prompt_ids=[[5], None, [5, 6], [5, 6, 11, 12]])), [],
     ["column 'prompt_ids', row 1", "is null"]),
    ("id-outside-vocab", dict(rows=_rows(response_ids=[[8, 9], [11], [11], [13, 99999]])), [],
     ["column 'response_ids', row 3", "token id 99999 is outside the model's vocabulary (0..319)"]),
    ("negative-id", dict(rows=_rows(prompt_ids=[[5, 6, 7], [5, 6, 7, 8, 9, 10], [-3, 6], [5, 6, 11, 12]])), [],
     ["column 'prompt_ids', row 2", "token id -3"]),
    ("entropy-length", dict(rows=_rows(token_entropy=[[0.1, 0.2], [0.3], [0.1, 0.1], [0.2, 0.2]])), [],
     ["column 'token_entropy', row 2", "has 2 entropies for 1 response_ids"]),
    ("negative-entropy", dict(rows=_rows(token_entropy=[[0.1, 0.2], [-0.3], [0.1], [0.2, 0.2]])), [],
     ["column 'token_entropy', row 1", "not a finite number >= 0"]),
    ("nan-entropy", dict(rows=_rows(token_entropy=[[0.1, 0.2], [0.3], [0.1], [0.2, math.nan]])), [],
     ["column 'token_entropy', row 3"]),
    ("logged-without-entropies", dict(rows=_rows()), ["--entropy-source", "logged"],
     ["--entropy-source logged needs the column 'token_entropy'"]),
    ("too-long", dict(rows=_rows(prompt_ids=[[5] * 600, [5, 6, 7, 8, 9, 10], [5, 6], [5, 6, 11, 12]])), [],
     ["row 0", "exceed the model's context of 512 tokens", "--truncate-prompt left"]),
    ("estimator-column-without-advantage", dict(rows=_rows()), ["--estimator", "column"],
     ["--estimator column needs the column 'advantage'"]),
    ("advantage-differs", dict(rows=_rows(advantage=[0.5, 0.4, -0.5, -0.5])), ["--estimator", "column"],
     ["column 'advantage', trajectory", "differs within this trajectory"]),
    ("already-scored", dict(rows=_rows(step_entropy=[0.1, 0.2, 0.3, 0.4])), [],
     ["column 'step_entropy'", "looks like a scored file", "empg advantages"]),
    ("messages-null-content", dict(rows={**{k: v for k, v in _rows().items() if k != "prompt_ids"},
                                         "messages": [[{"role": "user", "content": "hi"}]] * 3
                                         + [[{"role": "user", "content": None}]]}), [],
     ["column 'messages', row 3", "null content"]),
]


@pytest.mark.parametrize("case, build, flags, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_loses_nothing(tmp_path, capsys, tiny_model_dir, case, build, flags,
                                                       fragments):
    src = _write(tmp_path, **build)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    code, out, err = run_cli(capsys, "score", src, "--model", tiny_model_dir, *flags)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in [str(src)] * (case not in ("logged-without-entropies",)) + fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.parquet"]


def test_every_token_id_outside_the_vocabulary_is_listed(tmp_path, capsys, tiny_model_dir):
    """Each row holding an id outside the model's vocabulary is named, in both id columns, not only the first."""
    rows = _rows(prompt_ids=[[5, 6, 7], [5, 6, 7, 8, 9, 10], [5, 400], [5, 6, 11, 12]],
                 response_ids=[[8, 99999, 320], [11], [11], [13, 330]])
    src = _write(tmp_path, rows=rows)
    code, _, err = run_cli(capsys, "score", src, "--model", tiny_model_dir)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 3, err
    for fragment in ("column 'prompt_ids', row 2: token id 400 is outside",
                     "column 'response_ids', row 0: token id 99999 is outside",
                     "column 'response_ids', row 3: token id 330 is outside"):
        assert sum(fragment in line for line in lines) == 1, (fragment, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.parquet"]


USAGE = [
    (["--k", "-1"], "--k must be >= 0; got -1.0"),
    (["--k-future", "-0.5"], "--k-future must be >= 0"),
    (["--zeta", "-1"], "--zeta must be >= 0"),
    (["--aem-tau", "0"], "--aem-tau must be > 0; got 0.0"),
    (["--aem-min-range", "-0.1"], "--aem-min-range must be >= 0; got -0.1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--estimator", "ppo"], "'ppo' is not one of 'grpo', 'drgrpo', 'rloo', 'reinforce', 'column'"),
    (["--device", "tpu"], "'tpu' is not one of 'auto', 'cpu', 'cuda', 'mps'"),
    (["--batch-key", "nope"], "--batch-key column 'nope' is not in"),
    (["--batch-tokens", "0"], "--batch-tokens must be >= 1"),
]


@pytest.mark.parametrize("flags, fragment", USAGE, ids=[u[0][0] for u in USAGE])
def test_bad_usage_is_one_error_line(tmp_path, capsys, tiny_model_dir, flags, fragment):
    src = _write(tmp_path, rows=_rows())
    code, _, err = run_cli(capsys, "score", src, "--model", tiny_model_dir, *flags)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.parquet"]


def test_output_equal_to_input_is_refused(tmp_path, capsys, tiny_model_dir):
    src = _write(tmp_path, rows=_rows())
    code, _, err = run_cli(capsys, "score", src, "--model", tiny_model_dir, "-o", src, "--overwrite")
    assert code == 2 and "is the input file" in err


def test_existing_output_needs_overwrite(tmp_path, capsys, tiny_model_dir):
    src = _write(tmp_path, rows=_rows())
    target = tmp_path / "runs.scored.parquet"
    target.write_bytes(b"keep me")
    code, _, err = run_cli(capsys, "score", src, "--model", tiny_model_dir)
    assert code == 2 and "exists; pass --overwrite" in err
    assert target.read_bytes() == b"keep me"
    code, _, err = run_cli(capsys, "score", src, "--model", tiny_model_dir, "--overwrite")
    assert code == 0, err
    assert pq.read_table(target).num_rows == 4


def test_model_errors(tmp_path, capsys, tiny_model_dir):
    src = _write(tmp_path, rows=_rows())
    code, _, err = run_cli(capsys, "score", src)
    assert code == 2 and "no model: pass --model" in err
    code, _, err = run_cli(capsys, "score", src, "--model", tmp_path / "nowhere")
    assert code == 2 and "model folder" in err and "does not exist" in err


def test_pickle_weights_need_allow_pickle(tmp_path, capsys, tiny_model_dir):
    import shutil

    import torch
    from safetensors.torch import load_file
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    src = _write(tmp_path, rows=_rows())
    code, _, err = run_cli(capsys, "score", src, "--model", pickled)
    assert code == 2 and "--allow-pickle" in err, err
    code, _, err = run_cli(capsys, "score", src, "--model", pickled, "--allow-pickle", "-o", tmp_path / "ok.parquet")
    assert code == 0, err


def test_remote_code_is_refused_with_its_own_hint(tmp_path, capsys, tiny_model_dir):
    """A checkpoint that ships its own model code is refused without --trust-remote-code, the hint names that
    flag (not --allow-pickle), and the checkpoint's code never runs."""
    import json
    import shutil
    remote = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, remote)
    marker = tmp_path / "code-ran"
    for module, name in (("configuration_custom", "Qwen2Config as CustomConfig"),
                         ("modeling_custom", "Qwen2ForCausalLM as CustomForCausalLM")):
        (remote / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom transformers import {name}\n")
    config = json.loads((remote / "config.json").read_text())
    config["model_type"] = "custom-arch"  # an architecture transformers does not ship: only its own code loads it
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (remote / "config.json").write_text(json.dumps(config))
    src = _write(tmp_path, rows=_rows())
    code, _, err = run_cli(capsys, "score", src, "--model", remote)
    assert code == 2 and err.startswith("error: cannot load model") and len(err.splitlines()) == 1, err
    assert err.rstrip().endswith("pass --trust-remote-code if you trust it)") and "--allow-pickle" not in err, err
    assert not marker.exists() and not (tmp_path / "runs.scored.parquet").exists()


def test_text_input_needs_the_models_tokenizer(tmp_path, capsys, tiny_model_dir):
    import shutil
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    rows = {k: v for k, v in _rows().items() if k != "response_ids"} | {"response": ["a", "b", "c", "d"]}
    src = _write(tmp_path, rows=rows)
    code, _, err = run_cli(capsys, "score", src, "--model", bare)
    assert code == 2 and "column 'response' is text, and the model folder has no tokenizer files" in err, err
    code, _, err = run_cli(capsys, "score", _write(tmp_path, rows=_rows()), "--model", bare, "--overwrite",
                           "-o", tmp_path / "ids.parquet")
    assert code == 0, err  # token ids need no tokenizer


def test_internal_failure_is_exit_1_and_debug_shows_the_traceback(tmp_path, capsys, tiny_model_dir, monkeypatch):
    import empg_cli.pipeline as pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")
    monkeypatch.setattr(pipeline, "advantage_table", boom)
    src = _write(tmp_path, rows=_rows())
    code, _, err = run_cli(capsys, "score", src, "--model", tiny_model_dir)
    assert code == 1 and err.startswith("error: internal failure (RuntimeError: kaboom)") and "Traceback" not in err
    with pytest.raises(RuntimeError, match="kaboom"):
        main(["score", str(src), "--model", str(tiny_model_dir), "--debug"])
    assert not (tmp_path / "runs.scored.parquet").exists()


def test_validate_and_schema(tmp_path, capsys):
    src = write_rollouts(tmp_path / "ok.parquet", random_rollouts(np.random.default_rng(0)))
    code, out, _ = run_cli(capsys, "validate", src)
    assert code == 0 and out.startswith(f"ok: {src} is a valid rollouts file")
    bad = _write(tmp_path, rows=_rows(step=[0, 2, 0, 1]))
    code, _, err = run_cli(capsys, "validate", bad)
    assert code == 2 and "expected 0..1 with no gaps" in err
    code, out, _ = run_cli(capsys, "schema", "scored")
    import json
    assert code == 0 and json.loads(out)["name"] == "scored"
