"""Run files: atomic text writes and JSON Lines records.

Every file a run writes goes through these: ``write_text_atomic`` (a temporary file in the same
directory, fsync, ``os.replace``) for whole files (configs, ``eval.json``, checkpoint pointers),
``append_jsonl`` (append and fsync, so a record is on disk before the next step starts) for
``metrics.jsonl`` and ``trajectories.jsonl``, ``truncate_jsonl`` to drop the records a killed run
wrote after its last checkpoint, ``count_jsonl`` to follow a run's progress, and ``read_jsonl``
(with line numbers, for error messages) for every JSON Lines file read back (metrics, case
studies).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def append_jsonl(path: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> None:
    """Append one JSON object per line to ``path`` (created if missing) and fsync it."""
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def truncate_jsonl(path: str | os.PathLike[str], last_step: int) -> None:
    """Drop the records whose "step" is after ``last_step`` (written by a run killed before its next
    checkpoint); a missing file is left missing."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def count_jsonl(path: str | os.PathLike[str]) -> int:
    """Number of records (non-blank lines) in ``path``; 0 when it does not exist yet."""
    path = Path(path)
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def read_jsonl(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of ``path``.

    Raises:
        ValueError: a line that is not JSON, or not a JSON object (the message names the line).
    """
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            records.append((line_number, record))
    return records
