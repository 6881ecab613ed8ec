"""The HTML report of `empg report`: figures, the audit of `empg audit` and a trajectory explorer in one file.

The page is report.html with report.css, report.js and one JSON document inlined: nothing is loaded from outside
(its Content-Security-Policy forbids it). The document is columnar — one array per column, steps sorted by
trajectory then step — so that a 100k-step file parses at once and the script renders only what is on screen.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from importlib.resources import files
from pathlib import Path
from typing import Any

import matplotlib
import polars as pl

from .. import dynamics, plots
from ..credit_report import _sections, _summary, build_audit
from ..output import atomic_output
from ..rollouts import open_parquet, read_table
from ..schema import is_text
from .tokens import token_pieces

TOP = 10
"""Confident mistakes and uncertain successes listed by default."""
INPUT_CHARS = 2000
"""A step's new input (what the policy saw since its previous response) is cut to its last this many characters."""
DIGITS = 6
"""Significant digits of the step statistics in the page (the table shows 4, a cell's tooltip all 6)."""
TOKEN_DIGITS = 3
"""Significant digits of token entropies (they only pick a colour and a tooltip)."""
STEP_COLUMNS = {"H": "step_entropy", "A_base": "adv_base", "A_empg": "adv_empg", "A_aem": "adv_aem",
                "g": "empg_g", "w": "aem_w"}
QUADRANTS = [f"{c} · {o}" for c in dynamics.CERTAINTIES.categories for o in dynamics.OUTCOMES.categories]
"""Audit quadrants (batch H_norm tercile × outcome), coded 0..3 in this order; 4 is the middle tercile."""
MIDDLE = "middle third"
SCALE = ("#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")
"""ColorBrewer Blues: one hue from light to dark, so order reads from lightness alone (colour-blind safe)."""
CAPTIONS = {"entropy_drift": "Entropy drift: mean step entropy per iteration, successful and failed trajectories, "
                             "and early / middle / late steps (entropy_drift.png of `empg plot dynamics`).",
            "grad_norm": "Gradient norm against step entropy with EMPG's Proposition 1, and the effective update "
                         "magnitude |A|·‖∇‖ per entropy decile for base, EMPG and AEM (grad_norm.png)."}


def _rounded(values: list[float | None], digits: int) -> list[float | None]:
    """Floats cut to `digits` significant digits for a compact page; NaN and null become null."""
    return [None if v is None or math.isnan(v) else float(f"{v:.{digits}g}") for v in values]


def _extra_columns(steps: pl.DataFrame) -> dict[str, list]:
    """Each step's response text, token ids, token entropies and prompt, read from its file (`path`, `row`), where
    the file has them; a column some files lack is null on their steps."""
    wanted = {"response": True, "prompt": True, "response_ids": False, "prompt_ids": False, "token_entropy": False}
    extra: dict[str, list] = {}
    for (path,), part in steps.with_row_index("i").group_by("path", maintain_order=True):
        schema = open_parquet(Path(path)).schema_arrow
        columns = [c for c, text in wanted.items() if c in schema.names and is_text(schema.field(c).type) == text]
        if not columns:
            continue
        found = pl.from_arrow(read_table(Path(path), columns=columns))[part["row"].to_list()]
        for column in columns:
            values = extra.setdefault(column, [None] * steps.height)
            for i, value in zip(part["i"].to_list(), found[column].to_list()):
                values[i] = value
    return extra


def _tokenizers(steps: pl.DataFrame) -> list[Any]:
    """Each step's tokenizer: the scoring checkpoint's (`dynamics.tokenizer_for`, loaded once per folder), or None."""
    found = {key: dynamics.tokenizer_for(Path(key[0]), key[1])
             for key in steps.select("path", "iteration").unique().iter_rows()}
    return [found[key] for key in steps.select("path", "iteration").iter_rows()]


def _new_input(prompt, previous_prompt, previous_response):
    """What the policy saw since its previous response: the prompt past the previous prompt and response when it
    extends them (a chained multi-turn prompt), else the whole prompt. Works on text and on id lists."""
    if previous_prompt is not None:
        for before in (previous_prompt + previous_response if previous_response is not None else None,
                       previous_prompt):
            if before is not None and len(before) <= len(prompt) and prompt[:len(before)] == before:
                return prompt[len(before):]
    return prompt


def _inputs(steps: pl.DataFrame, extra: dict[str, list], tokenizers: list[Any]) -> list[str | None]:
    """Each step's new input as text, cut to its last INPUT_CHARS characters (a leading … marks a cut)."""
    none = [None] * steps.height
    if "prompt" in extra:
        prompts, responses = extra["prompt"], extra.get("response") or none
    elif "prompt_ids" in extra:
        prompts, responses = extra["prompt_ids"], extra.get("response_ids") or none
    else:
        return none
    first = steps["step"].to_list()
    parts = [_new_input(p, None if first[i] == 0 else prompts[i - 1], None if first[i] == 0 else responses[i - 1])
             if p is not None else None for i, p in enumerate(prompts)]
    if "prompt" not in extra:  # ids: decode each step's new part with its checkpoint's tokenizer
        parts = [tokenizer.decode(p, skip_special_tokens=False) if p is not None and tokenizer is not None else None
                 for p, tokenizer in zip(parts, tokenizers)]
    return [None if p is None else p if len(p) <= INPUT_CHARS else "…" + p[-INPUT_CHARS:] for p in parts]


def _tokens(extra: dict[str, list], tokenizers: list[Any]) -> dict[str, Any]:
    """Token pieces and entropies of the steps whose token_entropy has one value per response token.

    Columnar: `start[i]:start[i+1]` are step i's tokens in `piece` (an index into `pieces`) and `entropy` (nats);
    a step without token-level entropies (or without a tokenizer to split its text) has none.
    """
    n = len(tokenizers)
    entropies = extra.get("token_entropy") or [None] * n
    ids, texts = extra.get("response_ids") or [None] * n, extra.get("response") or [None] * n
    per_step: list[list[str] | None] = [None] * n
    by_tokenizer: dict[int, list[int]] = {}
    for i, tokenizer in enumerate(tokenizers):
        if tokenizer is not None and entropies[i] is not None and (ids[i] is not None or texts[i] is not None):
            by_tokenizer.setdefault(id(tokenizer), []).append(i)
    for rows in by_tokenizer.values():
        tokenizer = tokenizers[rows[0]]
        from_text = [i for i in rows if ids[i] is None]
        encoded = dict(zip(from_text, tokenizer([texts[i] for i in from_text], add_special_tokens=False)["input_ids"]
                           if from_text else []))
        responses = [ids[i] if ids[i] is not None else encoded[i] for i in rows]
        for i, pieces in zip(rows, token_pieces(tokenizer, responses)):
            if pieces and len(pieces) == len(entropies[i]):
                per_step[i] = pieces
    index: dict[str, int] = {}
    start, piece, entropy = [0], [], []
    for i, pieces in enumerate(per_step):
        if pieces is not None:
            piece += [index.setdefault(p, len(index)) for p in pieces]
            entropy += _rounded(entropies[i], TOKEN_DIGITS)
        start.append(len(piece))
    return {"pieces": list(index), "start": start, "piece": piece, "entropy": entropy,
            "has_tokens": [p is not None for p in per_step]}


def _texts(extra: dict[str, list], tokenizers: list[Any], has_tokens: list[bool]) -> list[str | None]:
    """Response text of the steps not shown token by token: `response`, else its ids decoded, else null."""
    none = [None] * len(tokenizers)
    texts, ids = extra.get("response") or none, extra.get("response_ids") or none
    return [None if shown else text if text is not None
            else tokenizer.decode(i, skip_special_tokens=False) if i is not None and tokenizer is not None else None
            for text, i, tokenizer, shown in zip(texts, ids, tokenizers, has_tokens)]


def _figures(frame: pl.DataFrame) -> list[dict[str, str]]:
    """The two figures of `empg plot dynamics` as PNG data URLs."""
    out = []
    with matplotlib.rc_context(plots.RC):
        for name, draw in plots.FIGURES.items():
            buffer = io.BytesIO()
            figure = draw(frame)
            figure.savefig(buffer, format="png", dpi=100)
            out.append({"name": name, "title": CAPTIONS.get(name, f"{name}.png of `empg plot dynamics`"),
                        "src": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()})
    return out


def _scale_max(tokens: dict[str, Any], steps: pl.DataFrame) -> float:
    """Top of the colour scale (nats): the 99th percentile of the token entropies, else of the step entropies."""
    values = pl.Series(tokens["entropy"] or steps["step_entropy"].to_list(), dtype=pl.Float64)
    top = values.quantile(0.99, "linear")
    return float(f"{top:.2g}") if top and top > 0 else 1.0


def _colour_level(tokens: dict[str, Any], extra: dict[str, list]) -> str:
    """`token` when tokens are coloured; else why not: `no-tokenizer` (token entropies, but no tokenizer found to
    split the response into tokens) or `step` (no token entropies in the file)."""
    if any(tokens["has_tokens"]):
        return "token"
    return "no-tokenizer" if any(e is not None for e in extra.get("token_entropy") or []) else "step"


def report_document(path: Path, top: int = TOP) -> dict[str, Any]:
    """The page's data: audit (as `empg audit` computes it), figures, trajectories, steps and tokens."""
    frame = dynamics.load_scored([path])
    audit = build_audit(frame, top=top)
    steps = (frame.with_columns(dynamics.certainty(), dynamics.OUTCOME).sort([*dynamics.TRAJ, "step"])
             .with_row_index("index"))
    quadrant = (pl.col("certainty").to_physical().cast(pl.Int64) * 2 + pl.col("outcome").to_physical()) \
        .fill_null(len(QUADRANTS))
    steps = steps.with_columns(quadrant=quadrant)
    trajectories = (steps.group_by(dynamics.TRAJ, maintain_order=True)
                    .agg(start=pl.col("index").first(), length=pl.len(), reward=pl.col("traj_reward").first()))
    position = {tuple(r): i for i, r in enumerate(trajectories.select(dynamics.TRAJ).cast({"source": pl.String})
                                                  .iter_rows())}
    for entry in audit["confident_mistakes"] + audit["uncertain_successes"]:
        entry["trajectory"] = position[tuple(entry[k] for k in dynamics.TRAJ)]
    extra = _extra_columns(steps)
    tokenizers = _tokenizers(steps)
    tokens = _tokens(extra, tokenizers)
    sources = frame["source"].dtype.categories.to_list()
    quadrants, mistakes, successes, invariants, correlations = _sections(audit)  # (title, headers, rows) each
    return {
        "file": path.name,
        "summary": _summary(audit),
        "audit": audit,
        "audit_tables": [{"title": t, "headers": h, "rows": r} for t, h, r in (quadrants, invariants, correlations)],
        "top": [{"id": "confident-mistakes", "title": mistakes[0], "entries": audit["confident_mistakes"]},
                {"id": "uncertain-successes", "title": successes[0], "entries": audit["uncertain_successes"]}],
        "figures": _figures(frame),
        "sources": sources,
        "quadrants": [*QUADRANTS, MIDDLE],
        "scale": {"colours": SCALE, "max": _scale_max(tokens, steps),
                  "level": _colour_level(tokens, extra)},
        "trajectories": {
            "source": trajectories["source"].to_physical().to_list(),
            "iteration": trajectories["iteration"].to_list(),
            "group": trajectories["group_id"].to_list(),
            "traj": trajectories["traj_id"].to_list(),
            "reward": _rounded(trajectories["reward"].to_list(), DIGITS),
            "start": trajectories["start"].to_list(),
            "length": trajectories["length"].to_list(),
        },
        "steps": {
            "step": steps["step"].to_list(),
            "quadrant": steps["quadrant"].to_list(),
            **{key: _rounded(steps[column].to_list(), DIGITS) for key, column in STEP_COLUMNS.items()},
            "text": _texts(extra, tokenizers, tokens["has_tokens"]),
            "input": _inputs(steps, extra, tokenizers),
        },
        "tokens": {k: v for k, v in tokens.items() if k != "has_tokens"},
    }


def _asset(name: str) -> str:
    return files(__package__).joinpath(name).read_text(encoding="utf-8")


def render_report(document: dict[str, Any]) -> str:
    """report.html with its stylesheet, script and the document inlined.

    The JSON is embedded in a script element of type application/json, with every "<" escaped so that no text in
    it can close the element.
    """
    data = json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    page = _asset("report.html")
    for placeholder, value in (("{{title}}", html.escape(f"empg report · {document['file']}")),
                               ("{{css}}", _asset("report.css")), ("{{script}}", _asset("report.js"))):
        page = page.replace(placeholder, value)
    head, tail = page.split("{{data}}")
    return head + data + tail


def write_report(input_path: Path, output_path: Path, *, overwrite: bool = False, top: int = TOP) -> Path:
    """Build the report of a scored file and put it in place atomically (`output.atomic_output`); the path written."""
    with atomic_output(output_path, overwrite=overwrite, inputs=[input_path]) as temp:
        temp.write_text(render_report(report_document(Path(input_path), top)), encoding="utf-8")
    return Path(output_path)
