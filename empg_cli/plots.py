"""The figures of `empg plot dynamics` (docs/method.md, figures), drawn from the tables of `dynamics`.

Matplotlib's object API with the Agg canvas (no pyplot, no display, no global state); the Okabe–Ito palette,
which stays distinguishable under the common colour-vision deficiencies (https://jfly.uni-koeln.de/color/).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from . import dynamics
from .errors import BadUsage
from .output import atomic_output

FORMATS = ("png", "svg", "pdf")
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
"""One colour per run, yellow last: it is faint on white."""
OUTCOME_TITLE = {"success": "successful trajectories (traj_reward > 0)",
                 "failure": "failed trajectories (traj_reward ≤ 0)"}
ESTIMATOR_STYLE = {"base": (":", "o", "base ($A_i$)"), "empg": ("-", "s", "EMPG"), "aem": ("--", "^", "AEM")}
ENTROPY_LABEL = "step entropy $H_t$ (nats)"
RENYI2_LABEL = r"step Rényi-2 entropy $H_2$, mean of $-\log\sum p^2$ over its tokens (nats)"
GRAD_LABEL = r"$\|\nabla_z \log\pi\|^2$ (unitless)"
NO_MODEL_NOTE = ("Not available: these entropies were logged at generation time,\n"
                 "so there is no gradient norm. Rescore with `empg score`\n"
                 "(--entropy-source model) to draw this panel.")
EMPTY_NOTES = {"success": "No successful trajectory (traj_reward > 0).",
               "failure": "No failed trajectory (traj_reward ≤ 0).",
               "middle": "No middle steps: every trajectory has fewer than\n2 steps (single-turn data has early steps only).",
               "late": "No late steps: every trajectory has fewer than\n3 steps (single-turn data has early steps only)."}
"""What an empty panel of the entropy figure says instead of staying blank."""
ONE_ITERATION_NOTE = "one iteration ({}): no drift over training to show"
RC = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9.5, "svg.fonttype": "none"}
"""Sizes readable at 100 % zoom; SVG text stays text (searchable, editable)."""


def _colours(frame: pl.DataFrame) -> dict[str, str]:
    """One Okabe–Ito colour per source, in the source Enum's order (cycling after eight)."""
    sources = frame["source"].dtype.categories.to_list()
    return {s: OKABE_ITO[i % len(OKABE_ITO)] for i, s in enumerate(sources)}


def _bands(ax: Axes, table: pl.DataFrame, colours: dict[str, str]) -> None:
    """Per source: mean per iteration as a line, the interquartile range as a band.

    With a single iteration, a bar per source instead, the sources spread sideways so that none hides another.
    """
    single = table["iteration"].n_unique() == 1
    slots = {source: i - (len(colours) - 1) / 2 for i, source in enumerate(colours)}
    for (source,), part in table.group_by("source", maintain_order=True):
        dodge = 0.08 * slots[source] if single else 0.0
        _band(ax, part, colours[source], dodge)
    ax.set_xlabel("training iteration")
    iterations = table["iteration"].unique().sort().to_list()
    if len(iterations) == 1:
        ax.set_xlim(iterations[0] - 0.5, iterations[0] + 0.5)
    if len(iterations) <= 12:
        ax.set_xticks(iterations)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)


def _band(ax: Axes, table: pl.DataFrame, colour: str, dodge: float) -> None:
    x, mean, lo, hi = (table[c].to_numpy() for c in ("iteration", "mean", "q25", "q75"))
    x = x + dodge
    ax.plot(x, mean, color=colour, marker="o", markersize=4, linewidth=1.8)
    if len(x) == 1:
        ax.vlines(x, lo, hi, color=colour, alpha=0.3, linewidth=8)  # the mean may lie outside the IQR
    else:
        ax.fill_between(x, lo, hi, color=colour, alpha=0.15, linewidth=0)


def _legend(ax: Axes, colours: dict[str, str], styles: dict[str, dict], loc: str = "best") -> None:
    """One legend: a coloured line per run, then a black line per style (label: Line2D keyword arguments)."""
    handles = [Line2D([], [], color=c, linewidth=2, label=f"run {s}") for s, c in colours.items()]
    handles += [Line2D([], [], color="black", label=label, **style) for label, style in styles.items()]
    ax.legend(handles=handles, loc=loc, frameon=False)


def _note(ax: Axes, text: str, clear: bool = True) -> None:
    """A boxed note in the middle of a panel that has nothing to draw; `clear` drops its ticks (not for a panel
    that shares its axis with others)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=10,
            bbox={"boxstyle": "round", "facecolor": "#f2f2f2", "edgecolor": "#999999"})
    if clear:
        ax.set_xticks([])
        ax.set_yticks([])


def _one_iteration_note(ax: Axes, table: pl.DataFrame) -> None:
    """Say so at the top of a per-iteration panel when the data hold a single iteration (nothing to compare)."""
    if table["iteration"].n_unique() == 1:
        ax.text(0.5, 0.97, ONE_ITERATION_NOTE.format(table["iteration"][0]), transform=ax.transAxes, ha="center",
                va="top", fontsize=9.5, style="italic", color="#444444")


def entropy_figure(frame: pl.DataFrame) -> Figure:
    """Top: mean H_t per iteration of successful and of failed trajectories. Bottom: over early / middle / late
    steps. Bands: interquartile range of the steps; all panels share the entropy axis."""
    colours = _colours(frame)
    fig = Figure(figsize=(13, 8.5), layout="constrained")
    grid = fig.add_gridspec(2, 6, height_ratios=[1.1, 1])
    axes = [fig.add_subplot(grid[0, :3])]
    axes += [fig.add_subplot(grid[0, 3:], sharey=axes[0])]
    axes += [fig.add_subplot(grid[1, 2 * i:2 * i + 2], sharey=axes[0]) for i in range(3)]
    fig.suptitle("Entropy drift: mean step entropy per training iteration (band: interquartile range of the steps)")
    panels = [(OUTCOME_TITLE[o], dynamics.entropy_drift(frame).filter(pl.col("outcome") == o))
              for o in dynamics.OUTCOMES.categories]
    by_position = dynamics.entropy_by_position(frame)
    panels += [(f"{p} steps ({third} third), all trajectories", by_position.filter(pl.col("position") == p))
               for p, third in zip(dynamics.POSITIONS.categories, ("first", "middle", "last"))]
    for ax, key, (title, table) in zip(axes, [*dynamics.OUTCOMES.categories, *dynamics.POSITIONS.categories], panels):
        _bands(ax, table, colours)
        ax.set_title(title)
        if table.height == 0:
            _note(ax, EMPTY_NOTES[key], clear=False)  # the entropy axis is shared: keep its ticks
        else:
            _one_iteration_note(ax, table)
    for ax in (axes[0], axes[2]):
        ax.set_ylabel(ENTROPY_LABEL)
    _legend(axes[1], colours, {})
    return fig


def grad_figure(frame: pl.DataFrame) -> Figure:
    """Left: ‖∇_z log π‖² vs the step's Rényi-2 entropy H2 with H2-decile means, Proposition 1's prediction for the
    same steps and its curve 1 − exp(−H2) over the same axis. Middle: |A| · ‖∇_z log π‖ per step-entropy decile
    for base, EMPG and AEM. Right: mean ‖∇_z log π‖² per iteration."""
    colours = _colours(frame)
    fig = Figure(figsize=(16, 5.5), layout="constrained")
    scatter, update, per_iteration = fig.subplots(1, 3)
    scatter.set_title("Gradient norm vs Rényi-2 entropy (EMPG Proposition 1)")
    update.set_title("Effective update magnitude by entropy decile")
    per_iteration.set_title("Mean gradient norm per iteration (band: IQR)")
    if not dynamics.has_model_statistics(frame):
        for ax in (scatter, update, per_iteration):
            _note(ax, NO_MODEL_NOTE)
        return fig
    model = frame.drop_nulls("step_grad_norm_sq")
    left_out = [s for s in colours if s not in set(model["source"].cast(pl.String))]
    if left_out:
        fig.supxlabel("Not shown, as their entropies were logged (no gradient norm): "
                      + ", ".join(f"run {s}" for s in left_out), fontsize=10)
    colours = {s: c for s, c in colours.items() if s not in left_out}
    _proposition_1(scatter, model, colours)
    for (source,), part in dynamics.entropy_deciles(model).group_by("source", maintain_order=True):
        for name, (ls, marker, _) in ESTIMATOR_STYLE.items():
            update.plot(part["decile"], part[f"update_{name}"], linestyle=ls, marker=marker, color=colours[source],
                        markersize=5, linewidth=1.6)
    update.set_xlabel("step-entropy decile within the run (1 = lowest entropy)")
    update.set_ylabel(r"mean $|A|\cdot\|\nabla_z \log\pi\|$ (advantage units)")
    update.set_xticks(range(1, 11))
    update.grid(alpha=0.3)
    _legend(update, colours, {label: {"linestyle": ls, "marker": m} for ls, m, label in ESTIMATOR_STYLE.values()})
    by_iteration = dynamics.grad_norm_by_iteration(model)
    _bands(per_iteration, by_iteration, colours)
    _one_iteration_note(per_iteration, by_iteration)
    per_iteration.set_ylabel(GRAD_LABEL)
    _legend(per_iteration, colours, {})
    return fig


def _proposition_1(ax: Axes, model: pl.DataFrame, colours: dict[str, str]) -> None:
    """Each step's ‖∇_z log π‖² at its H2 (dots), H2-decile means of the measured values (solid) and of Proposition
    1's prediction for the same steps, mean_j 1 − exp(−H2_j) (dashed), and the curve 1 − exp(−H2) on the same axis.

    Per token, E_a ‖∇_z log π(a)‖² = 1 − exp(−H2) exactly. A step's values are means over its tokens, and 1 − e^−x is
    concave, so a step's mean of 1 − exp(−H2_j) lies on or below the curve at its mean H2 (Jensen): steps mixing
    near-certain and uncertain tokens sit below the curve although every token obeys it.
    """
    for (source,), part in model.group_by("source", maintain_order=True):
        ax.scatter(part["step_renyi2"], part["step_grad_norm_sq"], s=7, alpha=0.25, color=colours[source],
                   linewidths=0, rasterized=True)
    for (source,), part in dynamics.renyi2_deciles(model).group_by("source", maintain_order=True):
        ax.plot(part["renyi2_mean"], part["grad_norm_sq_mean"], "-o", color=colours[source], markersize=4,
                markeredgecolor="white", linewidth=1.8)
        ax.plot(part["renyi2_mean"], part["grad_norm_sq_expected_mean"], "--x", color=colours[source], markersize=5,
                linewidth=1.4)
    h2 = np.linspace(0.0, max(float(model["step_renyi2"].max()), 1e-3), 200)
    ax.plot(h2, 1 - np.exp(-h2), color="#555555", linewidth=1.5, linestyle="-.")
    ax.set_xlabel(RENYI2_LABEL)
    ax.set_ylabel(GRAD_LABEL + ", mean over the step's tokens")
    ax.grid(alpha=0.3)
    _legend(ax, colours, {"steps (dots) and $H_2$-decile means": {"marker": "o"},
                          r"Prop. 1 for the same steps: mean$_j\,(1-e^{-H_{2,j}})$": {"linestyle": "--", "marker": "x"},
                          r"$1-e^{-H_2}$: Prop. 1 per token;" "\n" r"a bound for a step's mean (Jensen)": {"linestyle": "-."}},
            loc="upper left")


FIGURES = {"entropy_drift": entropy_figure, "grad_norm": grad_figure}


def plot_dynamics(frame: pl.DataFrame, out_dir: Path, fmt: str = "png") -> list[Path]:
    """Write entropy_drift.<fmt> and grad_norm.<fmt> into out_dir (created if missing); the paths written."""
    if fmt not in FORMATS:
        raise BadUsage(f"--format must be one of {', '.join(FORMATS)}; got '{fmt}'")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BadUsage(f"--out-dir {out_dir} is a file, not a folder") from None
    written = []
    with matplotlib.rc_context(RC):
        for name, draw in FIGURES.items():
            path = out_dir / f"{name}.{fmt}"
            with atomic_output(path, overwrite=True) as temp:  # a figure is redrawn in place, never half-written
                draw(frame).savefig(temp, dpi=100, format=fmt)
            written.append(path)
    return written
