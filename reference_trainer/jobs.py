"""Run ``igpo-train`` subcommands as child processes, a few at a time, with progress bars.

A ``Job`` is one ``igpo-train`` invocation (its arguments, a log file, the file that marks it
complete and the file whose lines count its progress) and the names of the jobs it waits for.
``run_jobs`` skips jobs that are already complete, starts the others in list order as soon as
their dependencies are complete and a worker is free, and stops everything at the first
failure with the end of the failed job's log. A child dies with its parent (Linux
``PR_SET_PDEATHSIG``), so a killed experiment leaves no orphan writing into its directory.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from igpo_rewards.reference_trainer.files import count_jsonl


@dataclass(frozen=True)
class Job:
    """One ``igpo-train`` child process.

    Attributes:
        name: unique label, e.g. ``"seed_0/igpo"`` (shown in the progress bars).
        argv: the arguments after ``igpo-train`` (subcommand first).
        log: where its stdout and stderr go.
        done: the file whose existence marks the job complete (the last file it writes).
        progress_file: a file with one line per unit of progress (e.g. metrics.jsonl), or None.
        total: the units of progress of a complete job (1 when there is no progress file).
        after: names of the jobs that must be complete first.
    """

    name: str
    argv: tuple[str, ...]
    log: Path
    done: Path
    progress_file: Path | None = None
    total: int = 1
    after: tuple[str, ...] = ()


class JobFailed(RuntimeError):
    """A child job exited with an error (the message holds the end of its log)."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGKILL this child when its parent dies (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class _Running:
    job: Job
    process: subprocess.Popen
    log: IO[str]
    bar: Any


def _check_jobs(jobs: Sequence[Job]) -> None:
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique, got {names}")
    for job in jobs:
        unknown = [name for name in job.after if name not in names]
        if unknown:
            raise ValueError(f"job {job.name!r} waits for unknown job(s) {unknown}")


def _start(job: Job, progress: bool) -> _Running:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    log = open(job.log, "a", encoding="utf-8")
    command = [sys.executable, "-m", "igpo_rewards.reference_trainer.cli", *job.argv]
    log.write(f"$ igpo-train {' '.join(job.argv)}\n")
    log.flush()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    bar = tqdm(total=job.total, desc=job.name, disable=not progress, leave=False)
    return _Running(job, process, log, bar)


def _stop_all(running: list[_Running]) -> None:
    for item in running:
        if item.process.poll() is None:
            item.process.kill()
            item.process.wait()
        item.log.close()
        item.bar.close()


def run_jobs(jobs: Sequence[Job], *, workers: int = 2, progress: bool = True, poll_seconds: float = 0.5) -> list[str]:
    """Run the incomplete ``jobs`` with at most ``workers`` at once; returns the names of those run.

    Raises:
        ValueError: duplicate names, unknown dependencies or ``workers < 1``.
        JobFailed: a job exited with a non-zero status or without writing its ``done`` file
            (the others are killed; the message holds the end of its log).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    _check_jobs(jobs)
    pending = [job for job in jobs if not job.done.is_file()]
    started: list[str] = []
    running: list[_Running] = []
    overall = tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc="jobs", disable=not progress)
    try:
        while pending or running:
            complete = {job.name for job in jobs if job.done.is_file()}
            for job in [job for job in pending if set(job.after) <= complete][: workers - len(running)]:
                pending.remove(job)
                running.append(_start(job, progress))
                started.append(job.name)
            if not running:
                raise RuntimeError(f"jobs {[job.name for job in pending]} wait for jobs that did not complete")
            time.sleep(poll_seconds)
            for item in list(running):
                item.bar.n = min(count_jsonl(item.job.progress_file) if item.job.progress_file else 0, item.job.total)
                item.bar.refresh()
                if item.process.poll() is None:
                    continue
                running.remove(item)
                _stop_all([item])
                if item.process.returncode != 0 or not item.job.done.is_file():
                    _stop_all(running)
                    running.clear()
                    tail = item.job.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-20:]
                    raise JobFailed(f"job {item.job.name} failed (exit {item.process.returncode}); "
                                       f"end of {item.job.log}:\n" + "\n".join(tail))
                overall.update(1)
    finally:
        _stop_all(running)
        overall.close()
    return started
