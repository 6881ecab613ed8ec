"""audit: the report's figures against plain-Python references, its stable JSON keys, and its three renderings."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from rich.console import Console
from test_dynamics import by, records, reference_quadrants, scored_steps, write_scored

from empg_cli import dynamics
from empg_cli.credit_report import build_audit, render_audit, snippet
from empg_cli.errors import BadUsage

ENTRY_KEYS = {"source", "batch", "iteration", "group_id", "traj_id", "step", "step_entropy", "empg_h_norm",
              "traj_reward", "adv_base", "adv_empg", "adv_aem", "snippet"}
"""The keys docs/audit.md promises; a change here is a change of the schema version."""
QUADRANT_KEYS = {"batch", "certainty", "outcome", "n_steps", "mean_abs_adv_base", "mean_abs_adv_empg",
                 "mean_abs_adv_aem", "amplification_empg", "amplification_aem"}
INVARIANT_KEYS = {"name", "scope", "n_checked", "max_abs_deviation", "tolerance", "passed"}
CORRELATION_KEYS = {"source", "quantity", "n_steps", "pearson", "spearman"}


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    return dynamics.load_scored([write_scored(tmp_path_factory.mktemp("a") / "s.parquet", scored_steps(seed=3))])


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    path = write_scored(tmp_path_factory.mktemp("a") / "l.parquet", scored_steps(seed=4, iterations=1, logged=True))
    return dynamics.load_scored([path])


def test_report_has_the_documented_keys(steps: pl.DataFrame) -> None:
    report = build_audit(steps, top=4)
    assert set(report) == {"schema", "n_steps", "n_trajectories", "sources", "model_statistics", "quadrants",
                           "confident_mistakes", "uncertain_successes", "invariants", "correlations"}
    assert report["schema"] == "empg.audit.v1" and report["sources"] == ["a", "b"] and report["model_statistics"]
    assert all(set(q) == QUADRANT_KEYS for q in report["quadrants"])
    assert all(set(e) == ENTRY_KEYS for e in report["confident_mistakes"] + report["uncertain_successes"])
    assert all(set(i) == INVARIANT_KEYS for i in report["invariants"])
    assert all(set(c) == CORRELATION_KEYS for c in report["correlations"])


def test_counts_and_quadrants_match_a_loop(steps: pl.DataFrame) -> None:
    report = build_audit(steps)
    rows = records(steps)
    assert report["n_steps"] == len(rows)
    assert report["n_trajectories"] == len(by(rows, *dynamics.TRAJ))
    expected = reference_quadrants(rows)
    assert len(report["quadrants"]) == len(expected) == 4 * 8
    for q in report["quadrants"]:
        ref = expected[(q["batch"], q["certainty"], q["outcome"])]
        assert q["n_steps"] == ref["n_steps"]
        assert q["mean_abs_adv_empg"] == (None if ref["empg"] is None else pytest.approx(ref["empg"], rel=1e-12))


def test_top_lists_hold_the_extreme_steps_with_snippets(steps: pl.DataFrame) -> None:
    report = build_audit(steps, top=3)
    rows = records(steps)
    failed = sorted(r["step_entropy"] for r in rows if r["traj_reward"] <= 0)
    won = sorted((r["step_entropy"] for r in rows if r["traj_reward"] > 0), reverse=True)
    assert [e["step_entropy"] for e in report["confident_mistakes"]] == failed[:3]
    assert [e["step_entropy"] for e in report["uncertain_successes"]] == won[:3]
    text = {(r["source"], r["iteration"], r["group_id"], r["traj_id"], r["step"]): r["text"] for r in rows}
    for e in report["confident_mistakes"] + report["uncertain_successes"]:
        original = " ".join(text[(e["source"], e["iteration"], e["group_id"], e["traj_id"], e["step"])].split())
        assert e["traj_reward"] in (0.0, 1.0)
        if len(original) <= 60:
            assert e["snippet"] == original
        else:
            assert e["snippet"].endswith("…") and original.startswith(e["snippet"][:-1]) and len(e["snippet"]) <= 61
    assert build_audit(steps, top=0)["confident_mistakes"] == []


def test_snippet_collapses_whitespace_and_cuts() -> None:
    assert snippet("go\n\n  north\t now ") == "go north now"
    assert snippet("x" * 60) == "x" * 60
    assert snippet("word " * 20) == ("word " * 12).rstrip() + "…"
    assert snippet(None) is None


def test_invariants_pass_on_scored_data(steps: pl.DataFrame) -> None:
    checks = build_audit(steps)["invariants"]
    assert [c["passed"] for c in checks] == [True, True, True]
    assert [c["n_checked"] for c in checks][:2] == [8, 8]


def test_logged_entropies_give_null_correlations_and_valid_json(logged: pl.DataFrame) -> None:
    report = build_audit(logged)
    assert report["model_statistics"] is False
    assert all(c["pearson"] is None and c["spearman"] is None and c["n_steps"] == 0 for c in report["correlations"])
    text = render_audit(report, "json")
    assert json.loads(text) == report
    assert "NaN" not in text
    assert "correlations are n/a" in render_audit(report, "markdown")


def test_json_is_sorted_and_round_trips(steps: pl.DataFrame) -> None:
    report = build_audit(steps)
    text = render_audit(report, "json")
    assert json.loads(text) == report
    top_level = [line.split('"')[1] for line in text.splitlines() if line.startswith('  "')]
    assert top_level == sorted(report)


def test_markdown_has_one_table_row_per_figure(steps: pl.DataFrame) -> None:
    report = build_audit(steps, top=2)
    text = render_audit(report, "markdown")
    sections = text.split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "Steps by certainty (batch H_norm tercile) × outcome: mean |A| per estimator; amplification "
        "×EMPG = mean |A_empg| / mean |A_base|, ×AEM = mean |A_aem| / mean |A_base|",
        "Confident mistakes: lowest-entropy steps of failed trajectories",
        "Uncertain successes: highest-entropy steps of successful trajectories",
        "Invariants (docs/method.md)",
        "Correlation of step entropy with gradient norm and update magnitude |A|·‖∇‖ (before/after modulation)"]
    body_rows = [sum(1 for line in s.splitlines() if line.startswith("| ")) - 2 for s in sections]
    assert body_rows == [32, 2, 2, 3, 8]
    assert "| \\|A_base\\| |" in text  # pipes inside cells are escaped


def test_rich_table_shows_a_failed_invariant(steps: pl.DataFrame) -> None:
    tampered = steps.with_columns(pl.col("empg_g") * 1.01)
    console = Console(record=True, width=220)
    console.print(render_audit(build_audit(tampered), "table"))
    text = console.export_text()
    assert "Confident mistakes" in text and "Invariants (docs/method.md)" in text
    line = next(line for line in text.splitlines() if "mean_B empg_g = 1" in line)
    assert "FAIL" in line and "0.01" in line


def test_rich_table_fits_80_columns_with_whole_numbers(steps: pl.DataFrame) -> None:
    console = Console(record=True, width=80)
    console.print(render_audit(build_audit(steps), "table"))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    cells = [line.split() for line in lines if line.split()[:1] in (["confident"], ["uncertain"])
             and line.split()[1] in ("success", "failure")]
    assert len(cells) == 32 and all(len(c) == 8 for c in cells)  # certainty, outcome, steps, 5 numbers
    headings = [line.strip() for line in lines if line.startswith("run=")]
    batches = list(dict.fromkeys(q["batch"] for q in build_audit(steps)["quadrants"]))
    assert len(batches) == 8 and headings == batches  # one titled table per batch, label whole on one line


def test_text_that_looks_like_markup_is_shown_as_written(steps: pl.DataFrame) -> None:
    odd = steps.with_columns(pl.lit("[/bold] open [door] | 1").alias("text"))
    report = build_audit(odd, top=1)
    console = Console(record=True, width=200)
    console.print(render_audit(report, "table"))
    assert "[/bold] open [door] | 1" in console.export_text()
    assert "[/bold] open [door] \\| 1" in render_audit(report, "markdown")


@pytest.mark.parametrize(("call", "message"), [
    (lambda f: render_audit(build_audit(f), "html"), "--format must be one of table, markdown, json; got 'html'"),
    (lambda f: build_audit(f, top=-1), "--top must be >= 0; got -1"),
])
def test_bad_options_are_bad_usage(steps: pl.DataFrame, call, message: str) -> None:
    with pytest.raises(BadUsage, match=message.replace("|", "\\|")):
        call(steps)


def test_several_files_keep_their_batches_apart(tmp_path: Path) -> None:
    paths = [write_scored(tmp_path / f"{n}.parquet", scored_steps(seed=n, runs=("r",), iterations=1)) for n in (1, 2)]
    report = build_audit(dynamics.load_scored(paths))
    assert report["sources"] == ["1:r", "2:r"]
    assert sorted({q["batch"] for q in report["quadrants"]}) == ["1: run=r, iteration=0", "2: run=r, iteration=0"]
    assert [c["n_checked"] for c in report["invariants"]][:2] == [2, 2]


def test_trajectory_label_names_the_group_once() -> None:
    from empg_cli.credit_report import _trajectory
    assert _trajectory({"group_id": "task-7", "traj_id": "task-7/3"}) == "task-7/3"
    assert _trajectory({"group_id": "g1", "traj_id": "t3"}) == "g1/t3"


def _entries_by_step(report: dict) -> dict[tuple, dict]:
    return {(e["iteration"], e["group_id"], e["traj_id"], e["step"]): e
            for e in report["confident_mistakes"] + report["uncertain_successes"]}


def test_snippets_of_a_token_id_file_decode_its_response_ids(tmp_path: Path, tiny_model_dir: Path, monkeypatch,
                                                             capsys) -> None:
    """Response ids are decoded by the scoring checkpoint's tokenizer, found as recorded (relative to where `empg
    score` ran) or as the metadata's reference relative to the file; without a readable tokenizer the snippet is
    the prompt text."""
    import shutil

    import numpy as np
    from conftest import random_rollouts, write_rollouts
    from transformers import AutoTokenizer

    from empg_cli.cli import main
    rows = random_rollouts(np.random.default_rng(11), iterations=1, groups=3)
    rows["prompt"] = [f"prompt of row {i}" for i in range(len(rows["run"]))]  # carried: the ids are scored
    key = lambda r: (r["iteration"], r["group_id"], r["traj_id"], r["step"])  # noqa: E731
    by_step = {key(r): r for r in (dict(zip(rows, v)) for v in zip(*rows.values()))}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    shutil.copytree(tiny_model_dir, tmp_path / "data/ckpt/iter_0")
    write_rollouts(tmp_path / "data/runs.parquet", rows, metadata={"model": {"ref": "ckpt/iter_{iteration}"}})

    def snippets(path: Path, cwd: Path) -> dict[tuple, str | None]:
        monkeypatch.chdir(cwd)
        dynamics._load_tokenizer.cache_clear()  # each `empg audit` is a new process
        assert main(["audit", str(path), "--format", "json", "--top", "3"]) == 0
        report = json.loads(capsys.readouterr().out)
        found = {key(e): e["snippet"] for e in report["confident_mistakes"] + report["uncertain_successes"]}
        assert len(found) == 6
        return found

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert main(["score", "data/runs.parquet", "--device", "cpu"]) == 0                 # model from the metadata
    assert main(["score", "data/runs.parquet", "--model", "data/ckpt/iter_0", "-o", "out/flag.parquet",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    decoded = lambda k: snippet(tokenizer.decode(by_step[k]["response_ids"]))  # noqa: E731
    for path, cwd in ((tmp_path / "out/flag.parquet", tmp_path),                 # only as recorded
                      (tmp_path / "data/runs.scored.parquet", tmp_path / "out")):  # only relative to the file
        assert all(text == decoded(k) for k, text in snippets(path, cwd).items())
    (tmp_path / "data/ckpt/iter_0/tokenizer.json").write_text('{"not": "a tokenizer"}')
    prompts = snippets(tmp_path / "out/flag.parquet", tmp_path)
    assert all(text == snippet(by_step[k]["prompt"]) for k, text in prompts.items())
