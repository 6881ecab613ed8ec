"""Engines run the chunks of a scoring job and commit each finished chunk to the work folder.

`local` scores the chunks in order in this process; `ray` scores them on a Ray Data actor pool, one policy per actor
(one per GPU on a GPU cluster). Both run `chunk.score_chunk`, so their results are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from ..chunk import KEY_COLUMNS, Source
from ..config import ScoreConfig

@dataclass(frozen=True)
class Job:
    """What every engine needs to score the chunks of one input."""

    source: Source
    refs: dict[int, str]
    """The checkpoint of each iteration."""
    cfg: ScoreConfig
    steps: pl.DataFrame
    """The input's key columns, one row per input row, in file order."""
    costs: np.ndarray
    """Tokens to score per input row (chunk.row_costs)."""
    done: np.ndarray
    """Input rows whose results are already committed."""

    def keys(self, rows: np.ndarray) -> pl.DataFrame:
        """KEY_COLUMNS of some input rows."""
        return self.steps[rows].select(KEY_COLUMNS)
