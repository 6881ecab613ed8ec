"""The `empg` command line: parse flags, call one library function, print; errors become one `error:` line."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator, Literal, Optional

import typer
from typer.exceptions import TyperException
from rich.console import Console

from . import __version__
from .config import (Device, Dtype, EmpgNorm, Engine, EntropySource, Estimator, RewardAgg, ScoreConfig,
                     Truncation, advantage_config_from)
from .errors import EmpgError

app = typer.Typer(help="Entropy-modulated credit assignment for RL-trained LLM agents: rescore logged rollouts, "
                       "compute EMPG and AEM advantages, plot entropy dynamics, audit credit.",
                  no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
plot_app = typer.Typer(help="Figures from scored files.", no_args_is_help=True)
app.add_typer(plot_app, name="plot")
out = Console()
err = Console(stderr=True)

DEBUG = typer.Option(False, "--debug", help="Show the full traceback on errors.")
OUTPUT = typer.Option(None, "-o", "--output", help="Output Parquet (default: beside the input).")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing output file.")


# Advantage hyperparameters: shared by `score` and `advantages`; None means "the stored or default value".
ESTIMATOR = typer.Option(None, "--estimator",
                         help="Base advantage A_i; default grpo.")
REWARD_AGG = typer.Option(None, "--reward-agg",
                          help="Trajectory reward from step rewards: equal (must be equal) or sum; default equal.")
K = typer.Option(None, "--k", help="EMPG scaling strength k >= 0; default 1.0.")
K_FUTURE = typer.Option(None, "--k-future", help="EMPG future-clarity strength k' >= 0; default 1.0.")
ZETA = typer.Option(None, "--zeta", help="EMPG future-clarity weight zeta >= 0; default 0.1.")
EMPG_NORM = typer.Option(None, "--empg-norm",
                         help="EMPG batch normalisation; default mean.")
AEM_TAU = typer.Option(None, "--aem-tau", help="AEM temperature tau > 0; default 1.0.")
AEM_MIN_RANGE = typer.Option(None, "--aem-min-range", help="AEM flat-group threshold delta >= 0 (nats): a group "
                             "whose step entropies span less keeps weight 1; default 0.1.")
BATCH_KEY = typer.Option(None, "--batch-key", help="Column(s) defining EMPG's batch; repeat or comma-separate "
                                                   "(default: run,iteration).")


@contextmanager
def _reported(debug: bool) -> Iterator[None]:
    """Known errors: one `error:` line, exit 2. Anything else: exit 1. --debug re-raises with the traceback.

    Ctrl-C, SIGTERM and SIGHUP (see `main`) print `interrupted` and exit 128 + the signal's number (130 for Ctrl-C),
    after the output's context manager has removed its temp file.
    """
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt as exc:
        with suppress(OSError):  # after SIGHUP the terminal may be gone
            typer.echo("interrupted", err=True)
        raise typer.Exit(128 + getattr(exc, "signum", signal.SIGINT)) from None
    except EmpgError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:
        if debug:
            raise
        typer.echo(f"error: internal failure ({type(exc).__name__}: {exc}); rerun with --debug for the traceback",
                   err=True)
        raise typer.Exit(1) from None


def _advantage_flags(estimator, reward_agg, k, k_future, zeta, empg_norm, aem_tau, aem_min_range, batch_key) -> dict:
    keys = tuple(part.strip() for item in batch_key or [] for part in item.split(",") if part.strip()) or None
    return dict(estimator=estimator, reward_agg=reward_agg, k=k, k_future=k_future, zeta=zeta, empg_norm=empg_norm,
                aem_tau=aem_tau, aem_min_range=aem_min_range, batch_key=keys)


def _default_output(path: Path, suffix: str) -> Path:
    """INPUT.<suffix>.parquet beside a file, FOLDER.<suffix>.parquet beside a folder; a glob needs -o."""
    if not path.exists() and set("*?[") & set(path.name):
        from .errors import BadUsage
        raise BadUsage(f"the input {path} is a glob: name the output with -o/--output")
    return path.with_name(f"{path.name.removesuffix('.parquet')}.{suffix}.parquet")


def _print_summary(summary) -> None:
    from rich.table import Table
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_row("rows", f"{summary.rows:,}")
    table.add_row("trajectories", f"{summary.trajectories:,} in {summary.groups:,} groups, "
                                  f"{summary.iterations} iteration(s)")
    table.add_row("success rate", f"{summary.success_rate:.1%} (traj_reward > 0)")
    table.add_row("mean step entropy", f"{summary.mean_step_entropy:.4f} nats")
    if summary.resumed_steps:
        table.add_row("resumed", f"{summary.resumed_steps:,} steps")
    if summary.tokens_scored or summary.resumed_steps:
        table.add_row("rescored", f"{summary.tokens_scored:,} response tokens in {summary.seconds:.1f} s "
                                  f"on {summary.device} ({summary.dtype})")
    table.add_row("wrote", str(summary.output))
    out.print(table)


@app.command(epilog="Example: empg score runs.parquet --model ckpt/global_step_{iteration}/actor/huggingface")
def score(
    input: Path = typer.Argument(..., help="Rollouts Parquet, one row per agent step."),
    output: Optional[Path] = OUTPUT,
    overwrite: bool = OVERWRITE,
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint folder, hub id, or template with "
                                        "{iteration}; default: the model named in the input's metadata."),
    device: Device = typer.Option("auto", "--device", help="cuda, then mps, then cpu."),
    dtype: Dtype = typer.Option("auto", "--dtype", help="bfloat16 on cuda, else float32."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature T > 0 "
                                                "(default: the input metadata's, else 1.0)."),
    entropy_source: EntropySource = typer.Option("model", "--entropy-source",
                                       help="Rescore with the model, or average the logged token_entropy."),
    estimator: Optional[Estimator] = ESTIMATOR, reward_agg: Optional[RewardAgg] = REWARD_AGG, k: Optional[float] = K,
    k_future: Optional[float] = K_FUTURE, zeta: Optional[float] = ZETA, empg_norm: Optional[EmpgNorm] = EMPG_NORM,
    aem_tau: Optional[float] = AEM_TAU, aem_min_range: Optional[float] = AEM_MIN_RANGE,
    batch_key: Optional[list[str]] = BATCH_KEY,
    batch_tokens: int = typer.Option(8192, "--batch-tokens", help="Token budget of one forward batch."),
    token_level: bool = typer.Option(False, "--token-level", help="Also write per-token lists for token-level losses."),
    truncate_prompt: Truncation = typer.Option("none", "--truncate-prompt",
                                        help="left: drop the oldest prompt tokens of over-long sequences."),
    prefix_sharing: bool = typer.Option(True, "--prefix-sharing/--no-prefix-sharing",
                                        help="Score prefix-chained trajectories in one forward pass."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow non-safetensors weights."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the checkpoint."),
    engine: Engine = typer.Option("local", "--engine", help="local: this process; ray: a Ray actor pool, one "
                                  "policy per worker (pip install 'empg[ray]')."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers (default: one per GPU of the "
                                          "cluster, else 1)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to attach to (default: "
                                              "RAY_ADDRESS's, else a local one started for the run)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start over instead of continuing from the work "
                                   "an interrupted run committed."),
    debug: bool = DEBUG,
) -> None:
    """Rescore every step with the policy and compute base, EMPG and AEM advantages.

    Writes INPUT.scored.parquet: every input row and column, then the step statistics and advantages.
    Finished work is committed to a folder beside the output as it goes: rerunning the same command after
    a crash or a kill resumes where it stopped; the folder is removed once the output is written.
    """
    with _reported(debug):
        from .pipeline import score_file
        adv = advantage_config_from(None, **_advantage_flags(estimator, reward_agg, k, k_future, zeta, empg_norm,
                                                             aem_tau, aem_min_range, batch_key))
        cfg = ScoreConfig(model=model, device=device, dtype=dtype, temperature=temperature,
                          entropy_source=entropy_source, batch_tokens=batch_tokens, token_level=token_level,
                          truncate_prompt=truncate_prompt, prefix_sharing=prefix_sharing, allow_pickle=allow_pickle,
                          trust_remote_code=trust_remote_code)
        with _token_progress() as progress:
            summary = score_file(input, output or _default_output(input, "scored"), cfg, adv, overwrite=overwrite,
                                 progress=progress, engine=engine, workers=workers, ray_address=ray_address,
                                 resume=not no_resume)
        for warning in summary.warnings:
            typer.echo(f"warning: {warning}", err=True)
        _print_summary(summary)


@contextmanager
def _token_progress():
    """Progress on stderr: a rich bar over steps with tokens/s on a terminal, plain throttled lines otherwise."""
    from .progress import Heartbeat, ProgressLines
    if not err.is_terminal:
        lines = ProgressLines(lambda line: typer.echo(line, err=True))
        with Heartbeat(lines.tick):
            yield lines.callbacks()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, ProgressColumn, TextColumn, \
        TimeRemainingColumn
    from rich.text import Text

    from .progress import Progress

    class TokensPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.fields['tokens'] / task.elapsed if task.elapsed else 0:,.0f} tok/s")

    bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
              TokensPerSecond(), TimeRemainingColumn(), console=err, transient=True)
    task = bar.add_task("rescoring", total=None, tokens=0)

    def start(total_steps: int, done_steps: int) -> None:
        bar.start()
        bar.update(task, total=total_steps, completed=done_steps)

    def advance(steps: int, tokens: int) -> None:
        bar.update(task, advance=steps, tokens=bar.tasks[0].fields["tokens"] + tokens)

    def note(message: str) -> None:  # the bar shows what is being loaded, then "rescoring"
        bar.update(task, description="rescoring" if message.startswith("loaded ") else message)

    try:
        yield Progress(start=start, advance=advance, note=note)
    finally:
        if bar.live.is_started:
            bar.stop()


@app.command(epilog="Example: empg advantages runs.scored.parquet --k 2 --zeta 0 -o sweep_k2.parquet")
def advantages(
    input: Path = typer.Argument(..., help="A scored Parquet from `empg score`."),
    output: Optional[Path] = OUTPUT,
    overwrite: bool = OVERWRITE,
    estimator: Optional[Estimator] = ESTIMATOR, reward_agg: Optional[RewardAgg] = REWARD_AGG, k: Optional[float] = K,
    k_future: Optional[float] = K_FUTURE, zeta: Optional[float] = ZETA, empg_norm: Optional[EmpgNorm] = EMPG_NORM,
    aem_tau: Optional[float] = AEM_TAU, aem_min_range: Optional[float] = AEM_MIN_RANGE,
    batch_key: Optional[list[str]] = BATCH_KEY,
    debug: bool = DEBUG,
) -> None:
    """Recompute only the advantages of a scored file (no model), for hyperparameter sweeps.

    Flags you leave out keep the values stored in the file's metadata.
    """
    with _reported(debug):
        from .pipeline import advantages_file
        summary = advantages_file(input, output or _default_output(input, "adv"),
                                  _advantage_flags(estimator, reward_agg, k, k_future, zeta, empg_norm, aem_tau,
                                                   aem_min_range, batch_key), overwrite=overwrite)
        _print_summary(summary)


@plot_app.command(epilog="Example: empg plot dynamics runs.scored.parquet other.scored.parquet --out-dir plots")
def dynamics(
    inputs: list[Path] = typer.Argument(..., help="One or more scored Parquet files (runs overlay)."),
    out_dir: Path = typer.Option(Path("plots"), "--out-dir", help="Folder for the figures."),
    fmt: Literal["png", "svg", "pdf"] = typer.Option("png", "--format", help="Image format."),
    debug: bool = DEBUG,
) -> None:
    """Entropy drift over iterations and gradient-norm coupling (EMPG Proposition 1)."""
    with _reported(debug):
        from .library import load_scored
        from .plots import plot_dynamics
        for path in plot_dynamics(load_scored(inputs), out_dir, fmt):
            typer.echo(f"wrote {path}")


@app.command(epilog="Example: empg audit runs.scored.parquet --format markdown --top 10")
def audit(
    input: Path = typer.Argument(..., help="A scored Parquet from `empg score`."),
    fmt: Literal["table", "markdown", "json"] = typer.Option("table", "--format",
                            help="Rich tables, Markdown, or JSON for scripts (docs/audit.md)."),
    top: int = typer.Option(5, "--top", min=0, help="How many confident mistakes and uncertain successes to show."),
    debug: bool = DEBUG,
) -> None:
    """Credit-assignment report: confident/uncertain x success/failure, top cases, invariants, correlations."""
    with _reported(debug):
        from .credit_report import render_audit
        from .library import audit as audit_report
        report = audit_report(input, top=top)
        rendered = render_audit(report, fmt)
        if isinstance(rendered, str):
            typer.echo(rendered)
        else:
            out.print(rendered)
        failed = [check["name"] for check in report["invariants"] if not check["passed"]]
        if failed:  # the advantages in the file break their own definition: not the user's input, a failure
            typer.echo(f"error: invariant check failed: {'; '.join(failed)} (see the Invariants section)", err=True)
            raise typer.Exit(1)


@app.command(epilog="Example: empg report runs.scored.parquet -o report.html")
def report(
    input: Path = typer.Argument(..., help="A scored Parquet from `empg score` (with token_entropy, each token is coloured)."),
    output: Path = typer.Option(Path("report.html"), "-o", "--output", help="The HTML file to write."),
    overwrite: bool = OVERWRITE,
    top: int = typer.Option(10, "--top", min=0, help="How many confident mistakes and uncertain successes to list."),
    debug: bool = DEBUG,
) -> None:
    """One self-contained HTML report: figures, audit and a trajectory explorer (opens offline in any browser)."""
    with _reported(debug):
        from .report import write_report
        typer.echo(f"wrote {write_report(input, output, overwrite=overwrite, top=top)}")


SourceFormat = Literal["verl", "trl", "prime-rl", "art", "rllm", "areal", "jsonl", "parquet", "csv"]
FIDELITY_NOTES = {"ids": "exact token ids", "messages": "chat messages, re-rendered with the chat template",
                  "text": "decoded text, re-tokenised: entropies approximate"}


@app.command("convert", epilog="Example: empg convert checkpoints/rollout_data -o runs.parquet   "
                               "(then: empg score runs.parquet --model ...)")
def convert_command(
    sources: list[Path] = typer.Argument(..., help="The files, or the folder, the trainer wrote."),
    from_: Optional[SourceFormat] = typer.Option(None, "--from", help="The trainer or table format (default: detected "
                                                                     "from the layout and fields)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="Rollouts Parquet (default: SOURCE.rollouts.parquet beside it)."),
    run: str = typer.Option("default", "--run", help="The run name written on every row."),
    group_size: Optional[int] = typer.Option(None, "--group-size",
                                             help="TRL: completions per prompt (the trainer's num_generations)."),
    reward_weights: Optional[str] = typer.Option(None, "--reward-weights", help="TRL: weight of each reward "
                                                 "function column, comma-separated (default 1 each)."),
    mapping: Optional[list[str]] = typer.Option(None, "--map", help="Generic tables: COLUMN=SOURCE_FIELD, e.g. "
                                                "--map response=completion; repeat for each column."),
    overwrite: bool = OVERWRITE,
    debug: bool = DEBUG,
) -> None:
    """Turn what a trainer wrote (verl, TRL, prime-rl, ART, rLLM, AReaL, or any table) into a rollouts file.

    Its metadata records the source format and fidelity: ids (exact), messages, or text (entropies approximate).

    Each trainer's layout, and the setting that makes it write one: docs/ingest.md.
    """
    with _reported(debug):
        from .ingest import convert_file
        summary = convert_file(sources, output, from_, overwrite=overwrite, run=run, group_size=group_size,
                               reward_weights=reward_weights, map=mapping)
        from rich.table import Table
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_row("format", summary.format)
        table.add_row("rows", f"{summary.rows:,}")
        table.add_row("trajectories", f"{summary.trajectories:,} in {summary.groups:,} groups, "
                                      f"{summary.iterations} iteration(s)")
        table.add_row("fidelity", f"{summary.fidelity} ({FIDELITY_NOTES[summary.fidelity]})")
        table.add_row("wrote", str(summary.output))
        out.print(table)


@app.command(epilog="Example: empg validate runs.parquet")
def validate(
    input: Path = typer.Argument(..., help="A rollouts or scored Parquet file."),
    debug: bool = DEBUG,
) -> None:
    """Check a file against its schema (a scored file is recognised by its columns)."""
    with _reported(debug):
        from .config import AdvantageConfig
        from .rollouts import open_rollouts, open_source
        from .schema import GROUP_KEYS, TRAJ_KEYS
        scored = "step_entropy" in open_source(input)[1].names
        rollouts = open_rollouts(input, AdvantageConfig(), scored=scored, every_column=True)
        steps = rollouts.steps
        typer.echo(f"ok: {input} is a valid {'scored' if scored else 'rollouts'} file: {steps.height:,} rows, "
                   f"{steps.select(TRAJ_KEYS).n_unique():,} trajectories, "
                   f"{steps.select(GROUP_KEYS).n_unique():,} groups, "
                   f"{steps['iteration'].n_unique()} iteration(s); input '{rollouts.input_column}', "
                   f"output '{rollouts.output_column}'")


@app.command(epilog="Example: empg schema scored")
def schema(name: Literal["rollouts", "scored"] = typer.Argument("rollouts",
                                      help="Which table.")) -> None:
    """Print a table schema (versioned JSON, as shipped in schemas/)."""
    from .schema import schema_text
    typer.echo(schema_text(name), nl=False)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(f"empg {__version__}")
        raise typer.Exit()


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that it is cleaned up like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: click's usage errors also become one `error:` line with exit code 2.

    SIGTERM and SIGHUP are handled like Ctrl-C while the command runs, unless they are ignored (as under nohup).
    """
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for signum, handler in previous.items():
        if handler == signal.SIG_DFL:
            signal.signal(signum, _interrupt)
    try:
        return _run(argv)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(argv: list[str] | None) -> int:
    try:
        code = app(args=argv, standalone_mode=False, prog_name="empg")
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        return 1
    except TyperException as exc:  # click's usage errors (typer vendors click)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx else ""
        typer.echo(f"error: {exc.format_message().replace('Value error, ', '')}{hint}", err=True)
        return getattr(exc, "exit_code", 2)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
