"""The Ray engine: chunks scored on a Ray Data actor pool, each actor loading the policy once.

`map_batches` with a callable class and `ActorPoolStrategy(size=workers)`: one chunk per call, one GPU per actor on a
GPU cluster, one CPU otherwise. Chunks shrink as the job goes (guided self-scheduling) and each actor holds at most
one chunk beyond the one it scores, so the actors finish together. Actors read their chunk's rows from the input
file themselves (on a cluster the input and the checkpoints must be at the same path on every node, as for the
trainer that wrote them); the driver commits each result to the work folder as it arrives, in whatever order the
actors finish.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import socket
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import polars as pl
import pyarrow as pa

from ..chunk import Checkpoints, Source, plan_chunks, read_rows, score_chunk
from ..config import ScoreConfig
from ..errors import BadUsage, EmpgError, WorkerFailed
from ..validation import ROW
from ..work import WorkFolder
from . import Job

CHUNK_TOKENS = 1 << 19
"""Tokens per chunk at most: about 10 s of a 1.5B policy on one current GPU."""
SHARES_PER_WORKER = 2
"""Guided self-scheduling: each chunk holds at most 1 / (SHARES_PER_WORKER * workers) of the tokens not yet
planned, so chunks shrink towards the end of the job and the workers finish together."""
IN_FLIGHT = dict(max_tasks_in_flight_per_actor=2)
"""Each actor holds its next chunk while it scores one (no idle round trip between chunks, ~0.15 s each on two
busy cores), and no more: with guided sizes, what waits in a queue near the end is small."""
ERROR = "_error"
"""The one column of a worker's reply when its chunk is bad input (a pickled EmpgError)."""
NOTES = "_notes"
"""A column of a worker's reply whose first row holds the worker's notes since its last reply (loading a checkpoint),
which the driver writes to the progress log."""
INSTALL_HINT = "--engine ray needs Ray: pip install 'empg[ray]'"


def import_ray() -> Any:
    """The `ray` module with Ray Data, or BadUsage saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise BadUsage(INSTALL_HINT) from exc
    return ray


class ChunkScorer:
    """A Ray Data callable class: loads checkpoints once per actor, scores one chunk per call."""

    def __init__(self, source: Source, refs: dict[int, str], cfg: ScoreConfig, threads: int | None) -> None:
        if threads:  # a CPU worker uses the one core Ray gave it
            import torch
            torch.set_num_threads(threads)
        self.source, self.refs, self.cfg = source, refs, cfg
        self.name = f"worker {os.getpid()}@{socket.gethostname()}"
        self.notes: list[str] = []
        self.checkpoints = Checkpoints(cfg, lambda message: self.notes.append(f"{self.name}: {message}"))

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = pl.read_ipc(io.BytesIO(batch.column("keys")[0].as_py()))
        table = read_rows(self.source.path, self.source.columns, keys[ROW].to_numpy())
        try:
            result = score_chunk(keys, table, self.source, self.refs, self.checkpoints, self.cfg)
        except EmpgError as exc:  # Ray Data passes the driver only the text of a worker's exception: send it whole
            return pa.table({ERROR: [pickle.dumps(exc)]})
        if self.notes:
            notes = ["\n".join(self.notes)] + [None] * (result.num_rows - 1)
            result, self.notes = result.append_column(NOTES, pa.array(notes, pa.string())), []
        return result


def _ipc(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_ipc(buffer)
    return buffer.getvalue()


def _first_line(exc: BaseException) -> str:
    """The worker's own exception line out of the traceback text Ray Data passes on."""
    lines = [line for line in str(exc).splitlines() if line and not line.startswith((" ", "\x1b", "ray::"))]
    own = [line for line in lines if not line.startswith(("ray.", "The above exception", "Traceback"))]
    return (own or lines or [type(exc).__name__])[0]


def _check_reachable(address: str) -> None:
    """ConnectionError now when nothing answers at a host:port address; Ray itself retries for minutes. Other forms
    ("auto", "ray://...") are Ray's to resolve."""
    host, _, port = address.rpartition(":")
    if not host or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise ConnectionError(exc.strerror or str(exc)) from exc


@contextmanager
def _cluster(ray: Any, address: str | None) -> Iterator[None]:
    """Attach to `address`, else to RAY_ADDRESS's cluster, else start a local one (shut down afterwards); a Ray
    already initialised in this process is used as it is. A cluster that cannot be reached is bad usage."""
    if ray.is_initialized():
        yield
        return
    target = address or os.environ.get("RAY_ADDRESS")
    try:
        if target:
            _check_reachable(target)
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        else:
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    except ConnectionError as exc:
        raise BadUsage(f"cannot attach to the Ray cluster at {target or 'this machine'} ({exc}): check that it "
                       f"runs (`ray status` there) and, if it uses token authentication, that RAY_AUTH_MODE=token "
                       f"is set here") from exc
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """Ray Data logs every execution and failure on the console; the CLI reports those itself."""
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def run_ray(job: Job, work: WorkFolder, progress, *, workers: int | None, address: str | None,
            chunk_tokens: int | None) -> None:
    """Score the job's chunks on `workers` actors (default: one per GPU of the cluster, else 1)."""
    ray = import_ray()
    with _cluster(ray, address), _quiet_logs():
        gpus = int(ray.cluster_resources().get("GPU", 0)) if job.cfg.device in ("auto", "cuda") else 0
        workers = workers or gpus or 1

        def budget(left: int) -> int:
            guided = max(job.cfg.batch_tokens, min(CHUNK_TOKENS, left // (SHARES_PER_WORKER * workers)))
            return chunk_tokens or guided
        chunks = list(plan_chunks(job.steps, job.costs, job.done, budget))
        if not chunks:
            return
        workers = min(workers, len(chunks))
        progress.note(f"rescoring on {workers} Ray worker(s)")
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        dataset = ray.data.from_items([{"keys": _ipc(job.keys(rows))} for rows in chunks],
                                      override_num_blocks=len(chunks))
        resources = dict(num_gpus=1) if gpus else dict(num_cpus=1)
        scored = dataset.map_batches(ChunkScorer, batch_size=1, batch_format="pyarrow",
                                     compute=ray.data.ActorPoolStrategy(size=workers, **IN_FLIGHT),
                                     fn_constructor_kwargs=dict(source=job.source, refs=job.refs, cfg=job.cfg,
                                                                threads=None if gpus else 1), **resources)
        try:
            for part in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
                if ERROR in part.column_names:
                    raise pickle.loads(part.column(ERROR)[0].as_py())
                if NOTES in part.column_names:
                    for note in part.column(NOTES)[0].as_py().splitlines():
                        progress.note(note)
                    part = part.drop_columns([NOTES])
                work.commit(part)
                progress.advance(part.num_rows, int(np.asarray(part.column("n_response_tokens")).sum()))
        except ray.exceptions.RayError as exc:  # a worker's bug, lost node or out-of-memory: its first line
            raise WorkerFailed(_first_line(exc)) from exc
