"""The local engine: chunks scored in order in this process, each committed as soon as it is done."""

from __future__ import annotations

import time

from ..chunk import Checkpoints, plan_chunks, score_chunk, stream_rows
from ..rollouts import Rollouts
from ..work import WorkFolder
from . import Job

COMMIT_SECONDS = 10.0
"""Chunks are sized to about this much compute: a kill loses at most about this much work."""


def run_local(job: Job, rollouts: Rollouts, work: WorkFolder, progress, *, chunk_tokens: int | None,
              rows_per_chunk: int) -> None:
    """Score the job's chunks in file order. Without `chunk_tokens`, the first chunk is one forward batch and each
    next one is sized from the measured tokens per second to take COMMIT_SECONDS."""
    checkpoints = Checkpoints(job.cfg, progress.note)
    budget = chunk_tokens or job.cfg.batch_tokens
    chunks = plan_chunks(job.steps, job.costs, job.done, lambda left: budget)
    for rows, table in stream_rows(rollouts, job.source.columns, chunks, job.done, rows_per_chunk):
        started, loading = time.perf_counter(), checkpoints.load_seconds
        work.commit(score_chunk(job.keys(rows), table, job.source, job.refs, checkpoints, job.cfg,
                                on_batch=progress.advance))
        seconds = time.perf_counter() - started - (checkpoints.load_seconds - loading)
        if chunk_tokens is None and seconds > 0:
            budget = max(job.cfg.batch_tokens, int(job.costs[rows].sum() / seconds * COMMIT_SECONDS))
