"""empg report: the page's data against the scored file, token pieces, the CLI, and the page in a real browser.

The browser tests drive Debian's chromium headless through Playwright (never a downloaded browser). Outside CI
they skip when chromium is absent; in CI (env CI set) a missing chromium fails them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from test_dynamics import scored_steps, write_scored

from conftest import build_tokenizer, random_rollouts, write_rollouts
from empg_cli.cli import main
from empg_cli.config import AdvantageConfig, ScoreConfig
from empg_cli.pipeline import score_file
from empg_cli.report import build, render_report, report_document
from empg_cli.report.tokens import streamed_pieces, token_pieces

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
STEP_NUMBERS = {"H": "step_entropy", "A_base": "adv_base", "A_empg": "adv_empg", "A_aem": "adv_aem", "g": "empg_g",
                "w": "aem_w"}
KEYS = ["run", "iteration", "group_id", "traj_id"]


# ---- inputs --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_scored(tmp_path_factory) -> Path:
    """Scored steps with response text and step entropies only (no token level, no model)."""
    return write_scored(tmp_path_factory.mktemp("r") / "text.scored.parquet", scored_steps(seed=5, iterations=3))


@pytest.fixture(scope="module")
def token_scored(tmp_path_factory, tiny_model_dir) -> Path:
    """Token ids rescored by the tiny model with --token-level: one entropy per response token."""
    folder = tmp_path_factory.mktemp("t")
    source = write_rollouts(folder / "runs.parquet", random_rollouts(np.random.default_rng(2), iterations=2))
    out = folder / "runs.scored.parquet"
    score_file(source, out, ScoreConfig(model=str(tiny_model_dir), token_level=True), AdvantageConfig())
    return out


@pytest.fixture(scope="module")
def text_document(text_scored: Path) -> dict:
    return report_document(text_scored)


@pytest.fixture(scope="module")
def token_document(token_scored: Path) -> dict:
    return report_document(token_scored)


def trajectory_rows(path: Path, key: tuple) -> list[dict]:
    """The file's rows of one trajectory, read with polars and sorted by step."""
    frame = pl.read_parquet(path)
    if "run" not in frame.columns:
        frame = frame.with_columns(run=pl.lit("default"))
    match = pl.all_horizontal(pl.col(k) == v for k, v in zip(KEYS, key))
    return frame.filter(match).sort("step").to_dicts()


def document_trajectory(document: dict, t: int) -> list[int]:
    start, length = document["trajectories"]["start"][t], document["trajectories"]["length"][t]
    return list(range(start, start + length))


def key_of(document: dict, t: int) -> tuple:
    trajs = document["trajectories"]
    return (document["sources"][trajs["source"][t]], trajs["iteration"][t], trajs["group"][t], trajs["traj"][t])


# ---- token pieces --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (▁ marks a word's space; decoding drops the first token's space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(["go to the cabinet and open the drawer"] * 5,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize("text", ["Thought: open drawer 1. Action: go", "café ☕ naïve — 東京",
                                  "  two  spaces\n"])
def test_pieces_join_into_the_decoded_response_one_per_token(byte_tokenizer, text: str) -> None:
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    end = byte_tokenizer.convert_tokens_to_ids("<|end|>")
    for response in (ids, ids + [end]):
        [pieces] = token_pieces(byte_tokenizer, [response])
        assert len(pieces) == len(response)
        assert "".join(pieces) == byte_tokenizer.decode(response, skip_special_tokens=False)
    assert "".join(streamed_pieces(byte_tokenizer, ids)) == text


def test_a_character_split_over_tokens_goes_to_the_token_that_completes_it(byte_tokenizer) -> None:
    ids = byte_tokenizer.encode("☕", add_special_tokens=False)  # three UTF-8 bytes, unmerged by this vocabulary
    assert len(ids) == 3
    assert token_pieces(byte_tokenizer, [ids]) == [["", "", "☕"]]


def test_sentencepiece_pieces_keep_their_leading_spaces(metaspace_tokenizer) -> None:
    ids = metaspace_tokenizer.encode("go to the cabinet", add_special_tokens=False)
    [pieces] = token_pieces(metaspace_tokenizer, [ids])
    assert "".join(pieces) == metaspace_tokenizer.decode(ids) == "go to the cabinet"
    assert any(p.startswith(" ") for p in pieces[1:])


# ---- the document --------------------------------------------------------------------------------------------------

def test_every_trajectory_lists_its_steps_in_order_with_the_files_numbers(text_scored: Path,
                                                                          text_document: dict) -> None:
    document = text_document
    steps = document["steps"]
    assert sum(document["trajectories"]["length"]) == len(steps["step"]) == pl.read_parquet(text_scored).height
    for t in range(len(document["trajectories"]["start"])):
        rows = trajectory_rows(text_scored, key_of(document, t))
        indices = document_trajectory(document, t)
        assert [steps["step"][i] for i in indices] == [r["step"] for r in rows] == list(range(len(rows)))
        assert document["trajectories"]["reward"][t] == pytest.approx(rows[0]["traj_reward"], rel=1e-6)
        for key, column in STEP_NUMBERS.items():
            assert [steps[key][i] for i in indices] == pytest.approx([r[column] for r in rows], rel=1e-5, abs=1e-12)
        assert [steps["text"][i] for i in indices] == [r["response"] for r in rows]


def test_quadrants_are_batch_terciles_of_h_norm_by_outcome(text_scored: Path, text_document: dict) -> None:
    """Each step's quadrant against numpy: confident when H_norm <= the batch's 1/3-quantile, uncertain above the
    2/3-quantile, outcome by traj_reward > 0."""
    document = text_document
    frame = pl.read_parquet(text_scored)
    expected = {}
    for (run, iteration), batch in frame.group_by("run", "iteration"):
        h = batch["empg_h_norm"].to_numpy()
        low, high = np.quantile(h, [1 / 3, 2 / 3])
        for row in batch.iter_rows(named=True):
            level = "confident" if row["empg_h_norm"] <= low else "uncertain" if row["empg_h_norm"] > high else None
            outcome = "success" if row["traj_reward"] > 0 else "failure"
            expected[(run, iteration, row["group_id"], row["traj_id"], row["step"])] = (
                f"{level} · {outcome}" if level else "middle third")
    for t in range(len(document["trajectories"]["start"])):
        for i in document_trajectory(document, t):
            label = document["quadrants"][document["steps"]["quadrant"][i]]
            assert label == expected[(*key_of(document, t), document["steps"]["step"][i])]


def test_top_cases_are_the_audits_and_point_at_their_trajectories(text_scored: Path, text_document: dict) -> None:
    from empg_cli import dynamics
    from empg_cli.credit_report import build_audit
    document = text_document
    audit = build_audit(dynamics.load_scored([text_scored]), top=build.TOP)
    assert document["audit"]["quadrants"] == audit["quadrants"]
    for part, name in zip(document["top"], ("confident_mistakes", "uncertain_successes")):
        assert [{k: v for k, v in e.items() if k != "trajectory"} for e in part["entries"]] == audit[name]
        for entry in part["entries"]:
            assert key_of(document, entry["trajectory"]) == tuple(entry[k] for k in
                                                                  ("source", "iteration", "group_id", "traj_id"))


def test_token_level_entropies_colour_each_decoded_token(token_scored: Path, token_document: dict,
                                                         tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    document = token_document
    tokens, steps = document["tokens"], document["steps"]
    assert document["scale"]["level"] == "token"
    for t in range(len(document["trajectories"]["start"])):
        rows = trajectory_rows(token_scored, key_of(document, t))
        for i, row in zip(document_trajectory(document, t), rows):
            span = range(tokens["start"][i], tokens["start"][i + 1])
            assert [tokens["entropy"][k] for k in span] == pytest.approx(row["token_entropy"], rel=2e-3, abs=1e-6)
            text = "".join(tokens["pieces"][tokens["piece"][k]] for k in span)
            assert text == tokenizer.decode(row["response_ids"], skip_special_tokens=False)
            assert steps["text"][i] is None  # shown through its tokens
        for i, before, row in zip(document_trajectory(document, t)[1:], rows, rows[1:]):  # chained: the observation
            new = row["prompt_ids"][len(before["prompt_ids"]) + len(before["response_ids"]):]
            assert steps["input"][i] == tokenizer.decode(new, skip_special_tokens=False)


def test_without_the_checkpoints_tokenizer_steps_are_coloured_whole_and_say_why(token_scored: Path,
                                                                                  tmp_path: Path) -> None:
    table = pq.read_table(token_scored)
    moved = tmp_path / "moved.parquet"
    pq.write_table(table.replace_schema_metadata({}), moved)  # no model recorded: no tokenizer to find
    document = report_document(moved)
    assert document["scale"]["level"] == "no-tokenizer"
    assert document["tokens"]["piece"] == [] and set(document["steps"]["text"]) == {None}


def test_new_input_is_what_a_chained_prompt_adds() -> None:
    assert build._new_input("SYS task A1 obs", "SYS task", " A1") == " obs"
    assert build._new_input([1, 2, 3, 4, 5], [1, 2], [3]) == [4, 5]
    assert build._new_input("SYS task obs", "SYS task", " A1") == " obs"  # response not echoed: past the prompt
    assert build._new_input("other", "SYS task", " A1") == "other"
    assert build._new_input("first", None, None) == "first"


def test_page_is_self_contained(text_document: dict) -> None:
    page = render_report(text_document)
    assert "default-src 'none'" in page
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", page)
    assert not re.search(r"https?://|url\(|@import", page.split('id="report-data"')[0])
    assert "{{" not in page.split('id="report-data"')[0]


# ---- the command ---------------------------------------------------------------------------------------------------

def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_once_and_refuses_to_overwrite_or_touch_the_input(text_scored: Path, tmp_path: Path,
                                                                     capsys) -> None:
    out = tmp_path / "report.html"
    assert run_cli(capsys, "report", text_scored, "-o", out) == (0, f"wrote {out}\n", "")
    before = out.read_bytes()
    code, _, err = run_cli(capsys, "report", text_scored, "-o", out)
    assert code == 2 and err == f"error: output {out} exists; pass --overwrite to replace it\n"
    assert out.read_bytes() == before
    assert run_cli(capsys, "report", text_scored, "-o", out, "--overwrite")[0] == 0
    original = text_scored.read_bytes()
    code, _, err = run_cli(capsys, "report", text_scored, "-o", text_scored, "--overwrite")
    assert code == 2 and "is the input file" in err and text_scored.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary file left behind


def test_cli_rejects_a_rollouts_file(tmp_path: Path, capsys) -> None:
    source = write_rollouts(tmp_path / "runs.parquet", random_rollouts(np.random.default_rng(0)))
    code, out, err = run_cli(capsys, "report", source, "-o", tmp_path / "r.html")
    assert (code, out) == (2, "")
    assert err == f"error: {source}: column 'step_entropy': is missing; this is not a scored file (make one with " \
                  "`empg score`)\n"
    assert not (tmp_path / "r.html").exists()


# ---- in the browser ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs Debian's chromium package")
        pytest.skip("no chromium at /usr/bin/chromium (CI installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield browser
        browser.close()


class Page:
    """A report opened in a fresh browser context that records script errors and every request made."""

    def __init__(self, browser, path: Path, fragment: str = "") -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.url = path.resolve().as_uri()
        self.page.goto(self.url + fragment)
        self.page.wait_for_selector("body[data-ready=true]")

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def text_page(browser, text_document: dict, tmp_path_factory):
    report = tmp_path_factory.mktemp("p") / "report.html"
    report.write_text(render_report(text_document), encoding="utf-8")
    page = Page(browser, report)
    yield page
    page.close()


def read_trajectory(page) -> list[dict]:
    """The open trajectory's table as shown: step, the numbers (stored value and displayed text), response."""
    return page.eval_on_selector_all("#trajectory-steps tbody tr", """rows => rows.map(r => ({
        step: +r.dataset.step,
        values: Object.fromEntries([...r.querySelectorAll('td[data-column]')].map(
            c => [c.dataset.column, [c.dataset.v === '' ? null : +c.dataset.v, c.textContent]])),
        text: r.querySelector('.tokens').textContent,
        highlighted: r.classList.contains('highlight')}))""")


def assert_trajectory_matches_the_file(shown: list[dict], rows: list[dict]) -> None:
    assert [s["step"] for s in shown] == [r["step"] for r in rows] == list(range(len(rows)))
    for s, r in zip(shown, rows):
        for key, column in STEP_NUMBERS.items():
            stored, displayed = s["values"][key]
            assert stored == pytest.approx(r[column], rel=1e-5, abs=1e-12)
            assert float(displayed) == pytest.approx(float(f"{r[column]:.4g}"), rel=1e-9, abs=1e-12)


def test_page_renders_without_errors_or_requests(text_page) -> None:
    page = text_page.page
    assert text_page.errors == [] and page.locator("#errors").is_hidden()
    assert text_page.requests == [text_page.url]  # the file itself, nothing else
    assert page.locator("#figure-list img").count() == 2
    assert all(src.startswith("data:image/png;base64,")
               for src in page.eval_on_selector_all("img", "imgs => imgs.map(i => i.getAttribute('src'))"))
    assert page.eval_on_selector_all("#figure-list img", "imgs => imgs.every(i => i.naturalWidth > 0)")
    assert "Invariants" in page.locator("#audit").inner_text()


def test_top_confident_mistake_opens_its_trajectory_and_text(text_page, text_scored: Path,
                                                             text_document: dict) -> None:
    page = text_page.page
    first = page.locator("#confident-mistakes tbody tr").first
    trajectory, step = first.locator("td").nth(3).inner_text(), int(first.locator("td").nth(4).inner_text())
    first.click()
    title = page.locator("#trajectory-title").inner_text()
    entry = text_document["audit"]["confident_mistakes"][0]
    assert (trajectory, step) == (entry["traj_id"], entry["step"])
    assert f"Trajectory {entry['traj_id']} · group {entry['group_id']} · iteration {entry['iteration']}" in title
    rows = trajectory_rows(text_scored, (entry["source"], entry["iteration"], entry["group_id"], entry["traj_id"]))
    shown = read_trajectory(page)
    [highlighted] = [s for s in shown if s["highlighted"]]
    assert highlighted["step"] == step and highlighted["text"] == rows[step]["response"]
    assert page.locator("#trajectory-steps tr.highlight").is_visible()
    assert text_page.errors == []


def test_filtering_to_one_quadrant_shows_only_its_steps(text_page, text_document: dict) -> None:
    page = text_page.page
    document = text_document
    code = document["quadrants"].index("uncertain · success")
    page.select_option("#f-quadrant", str(code))
    expected = document["steps"]["quadrant"].count(code)
    assert page.locator("#match-count").inner_text().startswith(f"{expected:,} steps in ")
    seen = 0
    while True:
        labels = page.eval_on_selector_all("#steps tbody tr", "rows => rows.map(r => r.children[6].textContent)")
        assert labels and set(labels) == {"uncertain · success"}
        seen += len(labels)
        if page.locator("#pager button").last.is_disabled():
            break
        page.locator("#pager button").last.click()
    assert seen == expected
    page.select_option("#f-quadrant", "")


def test_opening_a_trajectory_shows_its_steps_in_order_with_the_files_numbers(text_page, text_scored: Path) -> None:
    page = text_page.page
    page.select_option("#f-outcome", "failure")
    page.select_option("#f-iteration", "2")
    row = page.locator("#steps tbody tr").nth(3)
    key = tuple(row.locator("td").nth(i).inner_text() for i in range(4))
    row.click()
    rows = trajectory_rows(text_scored, (key[0], int(key[1]), key[2], key[3]))
    assert rows and all(r["traj_reward"] <= 0 and r["iteration"] == 2 for r in rows)
    assert_trajectory_matches_the_file(read_trajectory(page), rows)
    sibling = page.locator(".siblings button:not(.current)").first
    other = sibling.inner_text().split(" (")[0]
    sibling.click()
    assert f"Trajectory {other} · group {key[2]}" in page.locator("#trajectory-title").inner_text()
    assert_trajectory_matches_the_file(read_trajectory(page), trajectory_rows(text_scored, (key[0], 2, key[2], other)))
    page.locator("#f-reset").click()
    assert text_page.errors == [] and text_page.requests == [text_page.url]


def test_token_level_page_colours_each_token(browser, token_scored: Path, token_document: dict,
                                             tmp_path: Path) -> None:
    document = token_document
    t = int(np.argmax(document["trajectories"]["length"]))
    report = tmp_path / "report.html"
    report.write_text(render_report(document), encoding="utf-8")
    opened = Page(browser, report, f"#traj={t}")
    try:
        rows = trajectory_rows(token_scored, key_of(document, t))
        shown = read_trajectory(opened.page)
        assert_trajectory_matches_the_file(shown, rows)
        titles = opened.page.eval_on_selector_all("#trajectory-steps tbody tr", """rows => rows.map(r =>
            [...r.querySelectorAll('.tok')].map(s => +s.title.match(/H = (\\S+) nats/)[1]))""")
        for entropies, row in zip(titles, rows):
            assert entropies == pytest.approx(row["token_entropy"], rel=2e-3, abs=1e-6)
        backgrounds = opened.page.eval_on_selector_all(".tok", "s => new Set(s.map(x => x.style.backgroundColor)).size")
        assert backgrounds > 1
        assert "token entropy (nats)" in opened.page.locator("#legend").inner_text()
        assert opened.errors == [] and opened.requests == [opened.url]
    finally:
        opened.close()
