"""plots: the figures are written in every format, draw the dynamics tables, and say so when model statistics
are missing."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_dynamics import scored_steps, write_scored

from empg_cli import dynamics, plots
from empg_cli.errors import BadUsage

NOTE_START = "Not available: these entropies were logged"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    return dynamics.load_scored([write_scored(tmp_path_factory.mktemp("p") / "m.parquet", scored_steps(iterations=3))])


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    path = write_scored(tmp_path_factory.mktemp("p") / "l.parquet", scored_steps(iterations=1, logged=True))
    return dynamics.load_scored([path])


def svg_text(path: Path) -> str:
    """The <text> elements of an SVG file, joined (svg.fonttype 'none' keeps text as text; mathtext as tspans)."""
    texts = ("".join(el.itertext()) for el in ET.parse(path).iter("{http://www.w3.org/2000/svg}text"))
    return " | ".join(re.sub(r"\n\s*", "", t).replace("\xa0", " ").strip() for t in texts)


def test_png_files_are_written_into_a_new_folder(model: pl.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "plots"
    paths = plots.plot_dynamics(model, out)
    assert paths == [out / "entropy_drift.png", out / "grad_norm.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000


def test_svg_is_written_with_its_text_as_text(model: pl.DataFrame, tmp_path: Path) -> None:
    drift, grad = plots.plot_dynamics(model, tmp_path, "svg")
    assert "successful trajectories (traj_reward > 0)" in svg_text(drift)
    assert "Effective update magnitude by entropy decile" in svg_text(grad)
    assert NOTE_START not in svg_text(grad)


def test_every_panel_has_a_title_axis_labels_with_units_and_a_legend(model: pl.DataFrame) -> None:
    drift_axes = plots.entropy_figure(model).axes
    grad_axes = plots.grad_figure(model).axes
    assert [ax.get_title() for ax in drift_axes] == [
        "successful trajectories (traj_reward > 0)", "failed trajectories (traj_reward ≤ 0)",
        "early steps (first third), all trajectories", "middle steps (middle third), all trajectories",
        "late steps (last third), all trajectories"]
    assert all(ax.get_xlabel() == "training iteration" for ax in drift_axes)
    entropy = "step entropy $H_t$ (nats)"
    assert [ax.get_ylabel() for ax in drift_axes] == [entropy, "", entropy, "", ""]
    assert [t.get_text() for t in drift_axes[1].get_legend().get_texts()] == ["run a", "run b"]
    for ax in grad_axes:
        assert ax.get_title() and ax.get_xlabel() and "(" in ax.get_ylabel() and ax.get_legend() is not None
    assert grad_axes[0].get_xlabel() == plots.RENYI2_LABEL and "Rényi-2" in plots.RENYI2_LABEL
    legend = [t.get_text() for t in grad_axes[1].get_legend().get_texts()]
    assert legend == ["run a", "run b", "base ($A_i$)", "EMPG", "AEM"]


def test_pdf_is_written(model: pl.DataFrame, tmp_path: Path) -> None:
    for path in plots.plot_dynamics(model, tmp_path, "pdf"):
        assert path.suffix == ".pdf" and path.read_bytes().startswith(b"%PDF")


def test_logged_entropies_give_a_note_instead_of_gradient_panels(logged: pl.DataFrame, tmp_path: Path) -> None:
    png = plots.plot_dynamics(logged, tmp_path / "png")
    assert all(p.stat().st_size > 10_000 for p in png)
    drift, grad = plots.plot_dynamics(logged, tmp_path / "svg", "svg")
    assert svg_text(grad).count(NOTE_START) == 3
    assert NOTE_START not in svg_text(drift) and "step entropy" in svg_text(drift)


def test_unknown_format_is_bad_usage(model: pl.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(BadUsage, match="--format must be one of png, svg, pdf; got 'jpg'"):
        plots.plot_dynamics(model, tmp_path, "jpg")
    assert not any(tmp_path.iterdir())


def test_panels_draw_the_dynamics_tables(model: pl.DataFrame) -> None:
    success, failure, *positions = plots.entropy_figure(model).axes
    drift = dynamics.entropy_drift(model)
    for ax, outcome in ((success, "success"), (failure, "failure")):
        for line, source in zip(ax.get_lines(), ("a", "b")):
            ref = drift.filter(pl.col("source") == source, pl.col("outcome") == outcome)
            np.testing.assert_array_equal(line.get_xdata(), ref["iteration"].to_numpy())
            np.testing.assert_array_equal(line.get_ydata(), ref["mean"].to_numpy())
    late = dynamics.entropy_by_position(model).filter(pl.col("position") == "late", pl.col("source") == "b")
    np.testing.assert_array_equal(positions[2].get_lines()[1].get_ydata(), late["mean"].to_numpy())

    scatter, update, per_iteration = plots.grad_figure(model).axes
    deciles = dynamics.entropy_deciles(model).filter(pl.col("source") == "a")
    lines = update.get_lines()[:3]  # run a: base, EMPG, AEM
    for line, name in zip(lines, ("base", "empg", "aem")):
        np.testing.assert_array_equal(line.get_xdata(), deciles["decile"].to_numpy())
        np.testing.assert_array_equal(line.get_ydata(), deciles[f"update_{name}"].to_numpy())
    renyi2 = dynamics.renyi2_deciles(model).filter(pl.col("source") == "a")
    measured, predicted = scatter.get_lines()[:2]  # run a
    for line, column in ((measured, "grad_norm_sq_mean"), (predicted, "grad_norm_sq_expected_mean")):
        np.testing.assert_array_equal(line.get_xdata(), renyi2["renyi2_mean"].to_numpy())
        np.testing.assert_array_equal(line.get_ydata(), renyi2[column].to_numpy())
    dots = np.concatenate([c.get_offsets() for c in scatter.collections])  # every step, at its H2 (not H_t)
    steps = model.select("step_renyi2", "step_grad_norm_sq").to_numpy()
    np.testing.assert_array_equal(dots[np.lexsort(dots.T[::-1])], steps[np.lexsort(steps.T[::-1])])
    curve = scatter.get_lines()[-1]  # Proposition 1 over the same H2 axis
    np.testing.assert_allclose(curve.get_ydata(), 1 - np.exp(-np.asarray(curve.get_xdata())))
    assert curve.get_xdata().max() == pytest.approx(model["step_renyi2"].max())
    mean_norm = dynamics.grad_norm_by_iteration(model).filter(pl.col("source") == "a")["mean"].to_numpy()
    np.testing.assert_array_equal(per_iteration.get_lines()[0].get_ydata(), mean_norm)


def test_a_run_without_model_statistics_is_left_out_of_the_gradient_panels(tmp_path: Path) -> None:
    mixed = dynamics.load_scored([write_scored(tmp_path / "m.parquet", scored_steps(runs=("a",), iterations=2)),
                                  write_scored(tmp_path / "l.parquet", scored_steps(runs=("b",), logged=True))])
    figure = plots.grad_figure(mixed)
    scatter, update, per_iteration = figure.axes
    assert figure.get_supxlabel() == "Not shown, as their entropies were logged (no gradient norm): run b"
    assert len(update.get_lines()) == 3  # run a only: base, EMPG, AEM
    assert [t.get_text() for t in per_iteration.get_legend().get_texts()] == ["run a"]
    assert not any(NOTE_START in t.get_text() for t in scatter.texts)


def test_empty_panels_and_a_single_iteration_say_so(tmp_path: Path) -> None:
    """Single-turn data has no middle or late steps, and one iteration has no drift: the panels say it in words."""
    single = dynamics.load_scored([write_scored(tmp_path / "s.parquet", scored_steps(iterations=1, max_steps=1))])
    drift = plots.entropy_figure(single).axes
    texts = [[t.get_text() for t in ax.texts] for ax in drift]
    one = plots.ONE_ITERATION_NOTE.format(0)
    assert texts[:3] == [[one], [one], [one]]
    assert texts[3] == [plots.EMPTY_NOTES["middle"]] and texts[4] == [plots.EMPTY_NOTES["late"]]
    assert len(drift[2].get_yticks()) > 1  # the note keeps the shared entropy axis
    assert [t.get_text() for t in plots.grad_figure(single).axes[2].texts] == [one]
    many = dynamics.load_scored([write_scored(tmp_path / "m.parquet", scored_steps(iterations=2, max_steps=4))])
    assert not any(ax.texts for ax in plots.entropy_figure(many).axes + plots.grad_figure(many).axes)
