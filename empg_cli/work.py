"""The work folder beside the output: committed per-step results of finished chunks, so a killed job resumes.

Layout of the folder (output.sidecar(output, "work"), owned by whoever holds the output's lock):
  manifest.json      {"key": ...}: sha256 over the input's sha256 and every setting that changes results
  part-000001.parquet, ...   one per committed chunk: per-step results of whole trajectories (`_row` = input row)

A part is written to a temporary name, flushed to disk and renamed, so it is either whole or absent; its Parquet
pages carry checksums and its footer the manifest key and row count, so a damaged part is found, deleted and its
trajectories scored again. A different key (other input or settings) or `--no-resume` empties the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PART_KEY = b"empg_work"


def work_key(settings: dict[str, Any]) -> str:
    """sha256 of the settings (JSON with sorted keys): equal settings, equal key."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _write_atomic(path: Path, write) -> None:
    """write(tmp) then fsync and rename: `path` is either absent or complete."""
    tmp = path.with_name(f"{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class WorkFolder:
    """Committed chunk results of one output, keyed by input and settings."""

    def __init__(self, path: Path, key: str, *, resume: bool = True) -> None:
        self.path = path
        self.key = key
        manifest = self.path / "manifest.json"
        if self.path.exists() and (not resume or _read_key(manifest) != key):
            shutil.rmtree(self.path)
        self.path.mkdir(exist_ok=True)
        for stale in self.path.glob("*.tmp"):  # half-written by a killed run
            stale.unlink()
        if not manifest.exists():
            _write_atomic(manifest, lambda tmp: tmp.write_text(json.dumps({"key": key})))
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in self.path.glob("part-*.parquet")), default=0)

    def committed(self) -> list[pa.Table]:
        """The readable parts, in commit order; a damaged or foreign part is deleted (its work is redone)."""
        parts = []
        for path in sorted(self.path.glob("part-*.parquet")):
            part = self._read(path)
            if part is None:
                path.unlink()
            else:
                parts.append(part)
        return parts

    def _read(self, path: Path) -> pa.Table | None:
        try:
            parquet = pq.ParquetFile(path, page_checksum_verification=True)
            meta = json.loads((parquet.schema_arrow.metadata or {}).get(PART_KEY, b"{}"))
            table = parquet.read()
        except (OSError, ValueError, pa.ArrowException):
            return None
        if meta.get("key") != self.key or meta.get("rows") != table.num_rows:
            return None
        return table.replace_schema_metadata(None)

    def commit(self, part: pa.Table) -> None:
        """Write one chunk's results as the next part, atomically."""
        meta = {PART_KEY: json.dumps({"key": self.key, "rows": part.num_rows}).encode()}
        path = self.path / f"part-{self._next:06d}.parquet"
        _write_atomic(path, lambda tmp: pq.write_table(part.replace_schema_metadata(meta), tmp,
                                                       write_page_checksum=True))
        self._next += 1

    def remove(self) -> None:
        """Delete the folder (once the output is written)."""
        shutil.rmtree(self.path, ignore_errors=True)


def _read_key(manifest: Path) -> str | None:
    try:
        return json.loads(manifest.read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None
