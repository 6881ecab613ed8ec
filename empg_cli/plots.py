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

FORMATS = ("png", "svg", "pdf")
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
"""One colour per run, yellow last: it is faint on white."""
OUTCOME_TITLE = {"success": "successful trajectories (traj_reward > 0)",
                 "failure": "failed trajectories (traj_reward ≤ 0)"}
ESTIMATOR_STYLE = {"base": (":", "o", "base ($A_i$)"), "empg": ("-", "s", "EMPG"), "aem": ("--", "^", "AEM")}
ENTROPY_LABEL = "step entropy $H_t$ (nats)"
GRAD_LABEL = r"$\|\nabla_z \log\pi\|^2$ (unitless)"
NO_MODEL_NOTE = ("Not available: these entropies were logged at generation time,\n"
                 "so there is no gradient norm. Rescore with `empg score`\n"
                 "(--entropy-source model) to draw this panel.")
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


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=10,
            bbox={"boxstyle": "round", "facecolor": "#f2f2f2", "edgecolor": "#999999"})
    ax.set_xticks([])
    ax.set_yticks([])


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
    for ax, (title, table) in zip(axes, panels):
        _bands(ax, table, colours)
        ax.set_title(title)
    for ax in (axes[0], axes[2]):
        ax.set_ylabel(ENTROPY_LABEL)
    _legend(axes[1], colours, {})
    return fig


def grad_figure(frame: pl.DataFrame) -> Figure:
    """Left: ‖∇_z log π‖² vs H_t with decile means and Proposition 1. Middle: |A| · ‖∇_z log π‖ per entropy
    decile for base, EMPG and AEM. Right: mean ‖∇_z log π‖² per iteration."""
    colours = _colours(frame)
    fig = Figure(figsize=(16, 5.5), layout="constrained")
    scatter, update, per_iteration = fig.subplots(1, 3)
    scatter.set_title("Gradient norm vs step entropy")
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
    deciles = dynamics.entropy_deciles(model)
    for (source,), part in model.group_by("source", maintain_order=True):
        scatter.scatter(part["step_entropy"], part["step_grad_norm_sq"], s=7, alpha=0.25, color=colours[source],
                        linewidths=0, rasterized=True)
    for (source,), part in deciles.group_by("source", maintain_order=True):
        scatter.plot(part["entropy_mean"], part["grad_norm_sq_mean"], "-o", color=colours[source], markersize=4,
                     markeredgecolor="white", linewidth=1.8)
        for name, (ls, marker, _) in ESTIMATOR_STYLE.items():
            update.plot(part["decile"], part[f"update_{name}"], linestyle=ls, marker=marker, color=colours[source],
                        markersize=5, linewidth=1.6)
    h = np.linspace(0.0, max(float(model["step_entropy"].max()), 1e-3), 200)
    scatter.plot(h, 1 - np.exp(-h), color="#555555", linewidth=1.5, linestyle="-.")
    scatter.set_xlabel(ENTROPY_LABEL)
    scatter.set_ylabel(GRAD_LABEL + ", mean over the step's tokens")
    scatter.grid(alpha=0.3)
    _legend(scatter, colours, {"steps (dots) and entropy-decile means": {"marker": "o"},
                               r"Prop. 1: $E\|\nabla\|^2 = 1-e^{-H_2}$, $x = H_2$": {"linestyle": "-."}},
            loc="lower right")
    update.set_xlabel("step-entropy decile within the run (1 = lowest entropy)")
    update.set_ylabel(r"mean $|A|\cdot\|\nabla_z \log\pi\|$ (advantage units)")
    update.set_xticks(range(1, 11))
    update.grid(alpha=0.3)
    _legend(update, colours, {label: {"linestyle": ls, "marker": m} for ls, m, label in ESTIMATOR_STYLE.values()})
    _bands(per_iteration, dynamics.grad_norm_by_iteration(model), colours)
    per_iteration.set_ylabel(GRAD_LABEL)
    _legend(per_iteration, colours, {})
    return fig


FIGURES = {"entropy_drift": entropy_figure, "grad_norm": grad_figure}


def plot_dynamics(frame: pl.DataFrame, out_dir: Path, fmt: str = "png") -> list[Path]:
    """Write entropy_drift.<fmt> and grad_norm.<fmt> into out_dir (created if missing); the paths written."""
    if fmt not in FORMATS:
        raise BadUsage(f"--format must be one of {', '.join(FORMATS)}; got '{fmt}'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with matplotlib.rc_context(RC):
        for name, draw in FIGURES.items():
            path = out_dir / f"{name}.{fmt}"
            draw(frame).savefig(path, dpi=100)
            written.append(path)
    return written
