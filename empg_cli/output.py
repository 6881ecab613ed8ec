"""Put an output file in place safely: every check up front, one writer per path, atomic commit, no leftovers.

Usage (every command that writes a file goes through `atomic_output`):

    with atomic_output(output, overwrite=overwrite, inputs=[input]) as temp:
        ...read, score...                   # everything that can fail at the end was tried before this line
        write_parquet(temp, tables)         # or temp.write_text(html), or any writer that writes to `temp`

On entry the output is checked (folder exists and is writable, name fits, a regular file or absent, not an
input, absent unless `overwrite`), an advisory lock keyed to the output path is taken (a second writer fails at
once with `OutputBusy`), files of dead runs beside it are removed, and an empty temp file is created beside the
output. On a clean exit the temp file is synced and committed: renamed over the output with `overwrite`,
otherwise linked into place so that a file that appeared meanwhile is never replaced (`OutputExists`). On any
exception, KeyboardInterrupt included, the temp file is removed. Either way the lock is released.

Files beside the output are named `.empg-<key>.<suffix>`, where <key> is a short hash of the output's real path
(short, so a legal 255-byte output name still works): `.lock` (the lock), `.tmp` (the temp file) and, for other
writers that need more room, whatever `sidecar(output, suffix)` names (the scoring work folder). They belong to
whoever holds the key's lock: a run that takes a free lock knows the files of that key are a dead run's.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import BadUsage, OutputBusy, OutputExists

LOCK_PATIENCE_S = 0.5
"""How long a held lock is retried before `OutputBusy`: covers another run's brief sweep of dead files only."""

_SIDECAR = re.compile(r"\.empg-([0-9a-f]{16})\.(tmp|lock)")
"""The files a dead run can leave beside an output (work folders are kept: a rerun resumes from them)."""


def sidecar(output: Path, suffix: str) -> Path:
    """`.empg-<key>.<suffix>` beside the output, <key> = 16 hex digits of sha256(real path of the output).

    For files or folders a writer keeps beside its output (the scoring work folder: `sidecar(output, "work")`):
    create and change them only inside `atomic_output(output)`, which holds the key's lock; one found on entry
    is a dead run's, to resume from or remove. Suffixes other than tmp and lock are never swept.
    """
    target = Path(os.path.realpath(output))
    key = hashlib.sha256(os.fsencode(target)).hexdigest()[:16]
    return target.parent / f".empg-{key}.{suffix}"


@contextmanager
def atomic_output(output: Path, *, overwrite: bool = False, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Reserve `output` (checks, lock, dead runs' files removed) and yield an empty temp file beside it.

    A clean exit commits the temp file as the output (see the module docstring); an exception removes it.
    A symlinked output is written through to its target. Raises BadUsage (its subclasses OutputBusy,
    OutputExists) for anything the user can fix, before the caller does any work.
    """
    output = Path(output)
    target = Path(os.path.realpath(output))
    _check_target(output, target, inputs)
    try:
        lock = _lock(sidecar(output, "lock"), LOCK_PATIENCE_S)
    except OSError as exc:
        raise BadUsage(f"cannot write in the output folder {output.parent} ({exc.strerror})") from exc
    if lock is None:
        raise OutputBusy(f"another empg run is writing {output}; wait for it to finish or choose another -o")
    temp = sidecar(output, "tmp")
    try:
        if target.exists() and not overwrite:
            raise OutputExists(f"output {output} exists; pass --overwrite to replace it")
        _remove_dead_files(target.parent)
        temp.unlink(missing_ok=True)  # a dead run's: we hold its lock
        _create(temp, output)
        yield temp
        _commit(temp, target, output, overwrite)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        _unlock(sidecar(output, "lock"), lock)


def write_parquet(path: Path, tables: Iterable[pa.Table]) -> int:
    """Stream `tables` (one schema; the first one's key-value metadata is written) into a Parquet file at `path`,
    normally an `atomic_output` temp file, with page checksums so that later corruption is detected on read, and
    dictionaries for text columns only. Returns the number of rows written; an empty iterable is a ValueError (a
    Parquet file needs a schema)."""
    writer, rows = None, 0
    try:
        for table in tables:
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, write_page_checksum=True,
                                          use_dictionary=text_columns(table.schema))
            writer.write_table(table)
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError("write_parquet needs at least one table")
    return rows


def text_columns(schema: pa.Schema | pa.DataType, prefix: str = "") -> list[str]:
    """The Parquet paths of the text leaves (`traj_id`, `messages.list.element.role`): keys and prompts repeat, so
    a dictionary pays; token ids and entropies rarely repeat enough, and trying one costs a third of the write."""
    if isinstance(schema, pa.Schema) or pa.types.is_struct(schema):
        return [path for field in schema for path in text_columns(field.type, f"{prefix}{field.name}.")]
    if pa.types.is_list(schema) or pa.types.is_large_list(schema):
        return text_columns(schema.value_type, f"{prefix}list.element.")
    return [prefix[:-1]] if pa.types.is_string(schema) or pa.types.is_large_string(schema) else []


def _check_target(output: Path, target: Path, inputs: Iterable[Path]) -> None:
    """The checks that need no lock: a folder that exists, a name that fits, not an input, a regular file or absent."""
    if not target.parent.is_dir():
        raise BadUsage(f"output folder {output.parent} does not exist")
    name_bytes, limit = len(os.fsencode(target.name)), os.pathconf(target.parent, "PC_NAME_MAX")
    if name_bytes > limit:
        raise BadUsage(f"output file name {target.name[:24]}... is {name_bytes} bytes; the filesystem of "
                       f"{output.parent} allows at most {limit}")
    for source in inputs:
        same = target.exists() and Path(source).exists() and os.path.samefile(target, source)
        if same or target == Path(os.path.realpath(source)):
            raise BadUsage(f"output {output} is the input file; empg never modifies its input (choose another -o)")
    if target.is_dir():
        raise BadUsage(f"output {output} is a folder; give a file name, e.g. -o {output / 'out.parquet'}")
    if target.exists() and not target.is_file():
        raise BadUsage(f"output {output} is not a regular file (a device, FIFO or socket); empg only writes regular "
                       f"files (choose another -o)")


def _create(path: Path, output: Path) -> None:
    """Create an empty file with the umask's permissions (0644 under umask 022), like any file the user makes."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
    except OSError as exc:
        raise BadUsage(f"cannot write in the output folder {output.parent} ({exc.strerror})") from exc


def _lock(path: Path, patience: float) -> int | None:
    """An fd holding an exclusive flock on `path` (created if absent), or None while another process holds it.

    The holder unlinks the file before releasing it (`_unlock`), so after locking we check that the path still
    names the locked file; if not, a releasing holder removed it meanwhile and we start again.
    """
    deadline = time.monotonic() + patience
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
            continue
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _unlock(path: Path, fd: int) -> None:
    """Remove the lock file, then release the lock (the order `_lock` relies on)."""
    with suppress(OSError):  # another user's lock file in a sticky folder: it stays, and still works as a lock
        path.unlink()
    os.close(fd)


def _remove_dead_files(folder: Path) -> None:
    """Remove the temp and lock files of dead runs (their lock is free) beside any output in `folder`."""
    keys = {m.group(1) for m in map(_SIDECAR.fullmatch, os.listdir(folder)) if m}
    for key in keys:
        lock_path = folder / f".empg-{key}.lock"
        with suppress(OSError):  # another user's files may be beyond our rights: theirs to clean up
            fd = _lock(lock_path, 0)
            if fd is not None:
                try:
                    (folder / f".empg-{key}.tmp").unlink(missing_ok=True)
                finally:
                    _unlock(lock_path, fd)


def _commit(temp: Path, target: Path, output: Path, overwrite: bool) -> None:
    """Sync the temp file and put it in place: replace the output with `overwrite`, else never replace a file."""
    _fsync(temp, os.O_RDONLY)
    if overwrite:
        os.replace(temp, target)
    else:
        try:
            os.link(temp, target)  # atomic "create if absent": fails if a file appeared meanwhile
        except FileExistsError:
            raise _appeared(output) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            # A filesystem without hard links (FAT, some network shares): check, then rename (not atomic).
            if target.exists():
                raise _appeared(output) from None
            os.rename(temp, target)
        temp.unlink(missing_ok=True)
    _fsync(target.parent, os.O_RDONLY | os.O_DIRECTORY)


def _appeared(output: Path) -> OutputExists:
    return OutputExists(f"output {output} appeared while this run was writing it; it was left unchanged "
                        f"(pass --overwrite to replace it)")


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
