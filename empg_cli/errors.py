"""The named errors a user can meet. Each becomes one `error:` line and exit code 2 in the CLI."""

from __future__ import annotations

from pathlib import Path


class EmpgError(Exception):
    """A problem the user can fix: bad input, bad usage or an unloadable model (exit code 2)."""

    def __reduce__(self):
        """Errors raised on a Ray worker reach the driver pickled: keep the message and the attributes."""
        return _restore, (type(self), str(self), self.__dict__)


def _restore(cls: type, message: str, attributes: dict) -> EmpgError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(attributes)
    return error


class BadUsage(EmpgError):
    """A flag, path or hyperparameter that cannot be used as given."""


class OutputBusy(BadUsage):
    """Another live run is writing the same output path."""


class OutputExists(BadUsage):
    """The output exists (or appeared while this run was writing it) and --overwrite was not given."""


class ModelLoadError(EmpgError):
    """The model or tokenizer cannot be loaded as asked (missing, unsafe format, no chat template)."""


class WorkerFailed(Exception):
    """A Ray worker failed for a reason other than bad input (a bug, out of memory, a lost node): exit code 1."""


class BadInput(EmpgError):
    """A file that does not meet its schema; the message names the file, the column and the offending row.

    `path` may be a source read from several files (anything with `locate(row) -> (file, row in file)`): the
    message then names the file and its own row. `listing` joins several problems into one error.
    """

    def __init__(self, path: str | Path, message: str, *, column: str | None = None, row: int | None = None,
                 trajectory: str | None = None) -> None:
        if row is not None and hasattr(path, "locate"):
            path, row = path.locate(row)
        where = [str(path)]
        if column is not None:
            where.append(f"column '{column}'")
        if trajectory is not None:
            where.append(f"trajectory {trajectory}")
        if row is not None:
            where.append(f"row {row}")
        super().__init__(": ".join([where[0], ", ".join(where[1:])]) + f": {message}" if len(where) > 1
                         else f"{where[0]}: {message}")
        self.path, self.column, self.row, self.trajectory = str(path), column, row, trajectory
        self.problems: list[BadInput] = [self]
        self.total = 1

    @classmethod
    def listing(cls, problems: list["BadInput"], total: int) -> "BadInput":
        """The first problem, its message followed by the others on indented lines and "... and N more"."""
        first = problems[0]
        lines = [str(first)] + [f"  {p}" for p in problems[1:]]
        if total > len(problems):
            lines.append(f"  ... and {total - len(problems)} more")
        joined = cls.__new__(cls)
        EmpgError.__init__(joined, "\n".join(lines))
        joined.path, joined.column, joined.row, joined.trajectory = first.path, first.column, first.row, first.trajectory
        joined.problems, joined.total = problems, total
        return joined
