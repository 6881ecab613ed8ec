"""Reading JSON-lines files in pieces, and sharing the pieces with a helper process (`read_pieces`)."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from empg_cli.errors import BadInput
from empg_cli.ingest import common
from empg_cli.ingest.common import json_lines, pieces, read_pieces
from piece_readers import MARK, PARENT, dies_in_the_helper, lines_and_pid, raises_at_bad


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.dictionaries(st.sampled_from("abc"), st.integers(), max_size=3).map(json.dumps),
                          st.sampled_from(["", "  "])), max_size=12),
       st.sampled_from(["\n", "\r\n"]), st.booleans(), st.integers(1, 64))
def test_pieces_cover_every_line_once_with_its_number(tmp_path_factory, lines, newline, trailing, size):
    """Blank lines, CRLF, a last line without its newline, any piece size: the pieces' records, in order, are the
    file's records with the same line numbers."""
    path = tmp_path_factory.mktemp("p") / "f.jsonl"
    path.write_bytes((newline.join(lines) + (newline if trailing and lines else "")).encode())
    found = pieces([path], size)
    assert [record for piece in found for record in json_lines(path, piece)] == list(json_lines(path))
    assert sum(piece.lines for piece in found) == len(path.read_bytes().splitlines())


def _files(tmp_path, count=3, lines=40):
    paths = []
    for f in range(count):
        paths.append(tmp_path / f"{f}.jsonl")
        paths[-1].write_text("".join(json.dumps({"f": f, "i": i, "pad": "x" * 50}) + "\n" for i in range(lines)))
    return paths


@pytest.fixture
def helper_on(monkeypatch, tmp_path):
    """Every input is big enough for the helper; pieces of about ten lines; the piece_readers' mark."""
    monkeypatch.setattr(common, "PARALLEL_BYTES", 0)
    monkeypatch.setattr(common, "PIECE_BYTES", 700)
    monkeypatch.setenv(PARENT, str(os.getpid()))
    monkeypatch.setenv(MARK, str(tmp_path / "helper-began"))
    return tmp_path / "helper-began"


def test_the_helper_reads_pieces_from_the_back_and_results_keep_file_order(tmp_path, helper_on):
    files = _files(tmp_path)
    results = read_pieces(lines_and_pid, files)
    assert [n for lines, _ in results for n in lines] == list(range(1, 41)) * 3
    pids = [pid for _, pid in results]
    assert pids[0] == os.getpid() and pids[-1] != os.getpid(), pids  # both took part, each from its own end
    switch = pids.index(pids[-1])
    assert set(pids[:switch]) == {os.getpid()} and set(pids[switch:]) == {pids[-1]}


def test_a_helper_that_dies_leaves_its_pieces_to_this_process(tmp_path, helper_on):
    files = _files(tmp_path)
    results = read_pieces(dies_in_the_helper, files)
    assert [n for lines, _ in results for n in lines] == list(range(1, 41)) * 3
    assert helper_on.exists() and {pid for _, pid in results} == {os.getpid()}


@pytest.mark.parametrize("bad_lines", [[38], [3, 38]], ids=["in a late piece", "early and late"])
def test_the_first_problem_in_file_order_is_raised_whoever_met_it(tmp_path, helper_on, bad_lines):
    """A problem met by the helper comes back pickled, naming its own file and line; when both processes meet one,
    the earlier one is raised."""
    files = _files(tmp_path)
    records = files[2].read_text().splitlines()
    for line in bad_lines:
        records[line - 1] = json.dumps({"bad": True})
    files[2].write_text("\n".join(records) + "\n")
    with pytest.raises(BadInput, match=f"{files[2]}: line {bad_lines[0]} is bad"):
        read_pieces(raises_at_bad, files)


def test_small_inputs_are_read_here_alone(tmp_path, helper_on, monkeypatch):
    files = _files(tmp_path)
    monkeypatch.setattr(common, "PARALLEL_BYTES", sum(f.stat().st_size for f in files) + 1)
    started = []
    monkeypatch.setattr(common.subprocess, "Popen", lambda *args, **kwargs: started.append(args))
    helper_on.touch()  # nothing to wait for
    results = read_pieces(lines_and_pid, files)
    assert len(results) > 3 and {pid for _, pid in results} == {os.getpid()} and not started
