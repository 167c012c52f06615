"""Run ``igpo-train`` subcommands as child processes, a few at a time, with progress bars.

A ``Job`` is one ``igpo-train`` invocation (its arguments, a log file, the file that marks it
complete and the file whose lines count its progress) and the names of the jobs it waits for;
``module`` names another module whose ``main()`` to run instead (the tests use a light one).
``run_jobs`` skips jobs that are already complete, starts the others in list order as soon as
their dependencies are complete and a worker is free, and stops everything at the first
failure with the end of the failed job's log.

Children are forked from a ``multiprocessing`` fork server that imports the jobs' modules once
(torch and transformers take seconds to import, more than a quick job's work), so no child pays
for the imports again and none inherits the parent's threads or state. Each child calls its
module's ``main()`` with ``sys.argv`` as ``python -m MODULE *argv`` sets it, with stdout and
stderr in its log. A child kills itself when the process that runs the jobs dies (it watches
a pipe whose only writer is that process), so a killed experiment leaves no orphan writing
into its directory. A job with a ``usage`` file gets one line appended there per invocation
that returns or raises (``resource.getrusage`` of the child, whose counters start at the fork):
its CPU seconds (user + system, every thread), wall seconds, peak memory and exit status; an
invocation killed from outside writes none.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from igpo_rewards.reference_trainer.files import count_jsonl

CLI_MODULE = "igpo_rewards.reference_trainer.cli"
"""The module behind the ``igpo-train`` console script."""


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
        module: the module whose ``main()`` runs with ``sys.argv`` = ``[MODULE, *argv]`` (default:
            ``igpo-train``'s).
        usage: a JSON Lines file that gets the child's resource use per invocation (``usage_record``), or None.
    """

    name: str
    argv: tuple[str, ...]
    log: Path
    done: Path
    progress_file: Path | None = None
    total: int = 1
    after: tuple[str, ...] = ()
    module: str = CLI_MODULE
    usage: Path | None = None


class JobFailed(RuntimeError):
    """A child job exited with an error (the message holds the end of its log)."""


def _exit_with_parent(parent_alive: Any) -> None:  # pragma: no cover - runs in the child
    """Kill this child as soon as the parent's end of ``parent_alive`` (a one-way pipe the
    parent never writes to) is closed: the parent exited or was killed."""

    def watch() -> None:
        try:
            parent_alive.recv()
        except (EOFError, OSError):
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def usage_record(started: float, status: Any) -> dict[str, Any]:
    """This process's resource use so far (``resource.getrusage(RUSAGE_SELF)``, every thread):
    ``cpu_seconds`` (user + system), ``user_seconds``, ``system_seconds``, ``wall_seconds`` since
    ``started`` (a ``time.perf_counter()`` value), ``max_rss_mb`` (Linux reports KiB) and the exit ``status``."""
    import resource  # Unix only

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_seconds": usage.ru_utime + usage.ru_stime, "user_seconds": usage.ru_utime, "system_seconds": usage.ru_stime,
            "wall_seconds": time.perf_counter() - started, "max_rss_mb": usage.ru_maxrss / 1024, "status": status}


def _run_module(module: str, argv: Sequence[str], log: str, parent_alive: Any,
                usage: str | None = None) -> None:  # pragma: no cover - runs in the child
    """The child: ``module.main()`` with ``sys.argv`` as ``python -m module *argv`` sets it, stdout
    and stderr appended to ``log``; its return value is the exit status. With ``usage``, its
    ``usage_record`` is appended there when it returns or raises."""
    _exit_with_parent(parent_alive)
    started = time.perf_counter()
    descriptor = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)
    sys.argv = [module, *argv]
    status: Any = 1
    try:
        status = importlib.import_module(module).main()
    except SystemExit as exit_:
        status = exit_.code if exit_.code is None or isinstance(exit_.code, int) else str(exit_.code)
        raise
    finally:
        if usage is not None:
            with open(usage, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(usage_record(started, status)) + "\n")
    sys.exit(status)


def _context(modules: Sequence[str]) -> Any:
    """A fork-server context that preloads ``modules`` (spawn where there is no fork server)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(sorted(set(modules)))
    return context


@dataclass
class _Running:
    job: Job
    process: Any  # multiprocessing.Process
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


def _start(job: Job, context: Any, parent_alive: Any, progress: bool) -> _Running:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    log = open(job.log, "a", encoding="utf-8")
    program = "igpo-train" if job.module == CLI_MODULE else f"python -m {job.module}"
    log.write(f"$ {program} {' '.join(job.argv)}\n")
    log.flush()
    if job.usage is not None:
        job.usage.parent.mkdir(parents=True, exist_ok=True)
    process = context.Process(target=_run_module, name=job.name,
                              args=(job.module, tuple(job.argv), str(job.log), parent_alive,
                                    None if job.usage is None else str(job.usage)))
    process.start()
    bar = tqdm(total=job.total, desc=job.name, disable=not progress, leave=False)
    return _Running(job, process, log, bar)


def _stop_all(running: list[_Running]) -> None:
    for item in running:
        if item.process.exitcode is None:
            item.process.kill()
        item.process.join()
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
    context = _context([job.module for job in pending])
    parent_alive, alive = context.Pipe(duplex=False)  # children hold the reading end; nobody writes
    started: list[str] = []
    running: list[_Running] = []
    overall = tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc="jobs", disable=not progress)
    try:
        while pending or running:
            complete = {job.name for job in jobs if job.done.is_file()}
            for job in [job for job in pending if set(job.after) <= complete][: workers - len(running)]:
                pending.remove(job)
                running.append(_start(job, context, parent_alive, progress))
                started.append(job.name)
            if not running:
                raise RuntimeError(f"jobs {[job.name for job in pending]} wait for jobs that did not complete")
            time.sleep(poll_seconds)
            for item in list(running):
                item.bar.n = min(count_jsonl(item.job.progress_file) if item.job.progress_file else 0, item.job.total)
                item.bar.refresh()
                if item.process.exitcode is None:
                    continue
                running.remove(item)
                _stop_all([item])
                if item.process.exitcode != 0 or not item.job.done.is_file():
                    _stop_all(running)
                    running.clear()
                    tail = item.job.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-20:]
                    raise JobFailed(f"job {item.job.name} failed (exit {item.process.exitcode}); "
                                       f"end of {item.job.log}:\n" + "\n".join(tail))
                overall.update(1)
    finally:
        _stop_all(running)
        overall.close()
        parent_alive.close()
        alive.close()
    return started
