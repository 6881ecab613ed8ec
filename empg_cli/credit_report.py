"""The credit-assignment report of `empg audit` (docs/audit.md): built from `dynamics` tables, rendered three ways.

The JSON form is the report dict itself (schema "empg.audit.v1", documented in docs/audit.md); the table and
markdown forms show the same sections.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import polars as pl
from rich import box
from rich.console import Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from . import dynamics
from .errors import BadUsage

SCHEMA = "empg.audit.v1"
FORMATS = ("table", "markdown", "json")
SNIPPET_CHARS = 60
"""A snippet is the step's text with whitespace collapsed, cut to this many characters plus an ellipsis."""


def snippet(text: str | None) -> str | None:
    """The first SNIPPET_CHARS characters of `text` on one line, "…" marking a cut."""
    if text is None:
        return None
    flat = re.sub(r"\s+", " ", text).strip()
    return flat if len(flat) <= SNIPPET_CHARS else flat[:SNIPPET_CHARS].rstrip() + "…"


def _records(table: pl.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts: Enums as strings, NaN as None."""
    rows = table.with_columns(pl.col(pl.Enum).cast(pl.String)).to_dicts()
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows]


def _top(frame: pl.DataFrame, n: int, outcome: str) -> list[dict[str, Any]]:
    rows = _records(dynamics.top_steps(frame, n, outcome))
    return [{**{k: v for k, v in row.items() if k != "text"}, "snippet": snippet(row["text"])} for row in rows]


def build_audit(frame: pl.DataFrame, top: int = 5) -> dict[str, Any]:
    """The audit of a `dynamics.load_scored` frame as a JSON-ready dict with stable keys (docs/audit.md)."""
    if top < 0:
        raise BadUsage(f"--top must be >= 0; got {top}")
    return {
        "schema": SCHEMA,
        "n_steps": frame.height,
        "n_trajectories": frame.select(pl.struct(dynamics.TRAJ).n_unique()).item(),
        "sources": frame["source"].dtype.categories.to_list(),
        "model_statistics": dynamics.has_model_statistics(frame),
        "quadrants": _records(dynamics.quadrants(frame)),
        "confident_mistakes": _top(frame, top, "failure"),
        "uncertain_successes": _top(frame, top, "success"),
        "invariants": _records(dynamics.invariants(frame)),
        "correlations": _records(dynamics.correlations(frame)),
    }


def _num(x: float | int | None) -> str:
    if x is None:
        return "n/a"
    return str(x) if isinstance(x, int) else f"{x:.4g}"


def _top_rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    return [[str(i), f"{e['source']} · it {e['iteration']} · {_trajectory(e)} · step {e['step']}",
             _num(e["step_entropy"]), _num(e["adv_base"]), _num(e["adv_empg"]), _num(e["adv_aem"]),
             e["snippet"] or ""] for i, e in enumerate(entries, 1)]


TEXT_HEADERS = {"batch", "certainty", "outcome", "run", "step", "text", "check", "scope", "quantity", "result"}
TOP_HEADERS = ["#", "step", "H (nats)", "A_base", "A_empg", "A_aem", "text"]


def _sections(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows of cells) for each part of the report; one source for table and markdown."""
    quadrants = [[q["batch"], q["certainty"], q["outcome"], str(q["n_steps"]),
                  *(_num(q[f"mean_abs_adv_{e}"]) for e in ("base", "empg", "aem")),
                  _num(q["amplification_empg"]), _num(q["amplification_aem"])] for q in report["quadrants"]]
    invariants = [[i["name"], i["scope"], str(i["n_checked"]), _num(i["max_abs_deviation"]), _num(i["tolerance"]),
                   "pass" if i["passed"] else "FAIL"] for i in report["invariants"]]
    correlations = [[c["source"], c["quantity"], str(c["n_steps"]), _num(c["pearson"]), _num(c["spearman"])]
                    for c in report["correlations"]]
    return [
        ("Steps by certainty (batch H_norm tercile) × outcome: mean |A| per estimator; amplification "
         "×EMPG = mean |A_empg| / mean |A_base|, ×AEM = mean |A_aem| / mean |A_base|",
         ["batch", "certainty", "outcome", "steps", "|A_base|", "|A_empg|", "|A_aem|", "×EMPG", "×AEM"], quadrants),
        ("Confident mistakes: lowest-entropy steps of failed trajectories", TOP_HEADERS,
         _top_rows(report["confident_mistakes"])),
        ("Uncertain successes: highest-entropy steps of successful trajectories", TOP_HEADERS,
         _top_rows(report["uncertain_successes"])),
        ("Invariants (docs/method.md)", ["check", "scope", "checked", "max |deviation|", "tolerance", "result"], invariants),
        ("Correlation of step entropy with gradient norm and update magnitude |A|·‖∇‖ (before/after modulation)",
         ["run", "quantity", "steps", "Pearson", "Spearman"], correlations),
    ]


def _summary(report: dict[str, Any]) -> str:
    note = "" if report["model_statistics"] else (
        " Gradient norms are unavailable (entropies logged, not rescored), so correlations are n/a.")
    return (f"{report['n_steps']} steps in {report['n_trajectories']} trajectories; success means traj_reward > 0; "
            f"confident / uncertain = lowest / highest third of H_norm within the batch.{note}")


def _markdown(report: dict[str, Any]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    parts = ["# empg audit", "", _summary(report)]
    for title, headers, rows in _sections(report):
        parts += ["", f"## {title}", "", line(headers), line(["---"] * len(headers)), *map(line, rows)]
    return "\n".join(parts)


def _trajectory(entry: dict[str, Any]) -> str:
    """group/traj, or the trajectory id alone when it already names its group (ids like `task-7/3`)."""
    group, traj = str(entry["group_id"]), str(entry["traj_id"])
    return traj if traj.startswith(group) else f"{group}/{traj}"


def _rich(report: dict[str, Any]) -> Group:
    """Light borders and unbroken numbers, to fit 80 columns. Where the first column repeats (batch, run), the
    section is split into one table per value, titled with it, instead of repeating it on every row."""
    parts: list[Any] = [Text(_summary(report))]
    for title, headers, rows in _sections(report):
        firsts = [row[0] for row in rows]
        if len(set(firsts)) < len(firsts):
            parts.append(Padding(Text(title, style="bold"), (1, 0, 0, 0)))
            for value in dict.fromkeys(firsts):
                parts.append(_table(value, headers[1:], [row[1:] for row in rows if row[0] == value], style="italic"))
        else:
            parts.append(Padding(_table(title, headers, rows, style="bold"), (1, 0, 0, 0)))
    return Group(*parts)


def _table(title: str, headers: list[str], rows: list[list[str]], style: str) -> Table:
    table = Table(title=title, title_justify="left", title_style=style, box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False)
    for h in headers:
        text = h in TEXT_HEADERS
        table.add_column(h, overflow="fold", no_wrap=not text, justify="left" if text else "right")
    for row in rows:
        cells = [Text(c) for c in row]  # Text: a "[tag]" in a snippet is not markup
        table.add_row(*cells, style="red" if row[-1] == "FAIL" else None)
    return table


def render_audit(report: dict[str, Any], fmt: str) -> Group | str:
    """`table`: a rich renderable; `markdown`: GitHub-flavoured markdown; `json`: the report, indented, sorted keys."""
    if fmt not in FORMATS:
        raise BadUsage(f"--format must be one of {', '.join(FORMATS)}; got '{fmt}'")
    if fmt == "json":
        return json.dumps(report, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False)
    return _markdown(report) if fmt == "markdown" else _rich(report)
