"""Fixtures of the benchmarks: the results recorder and the torch thread count.

The summary (``summary.json`` and ``summary.md``: medians, ratio to the copy, speed-up over the
loop style, JAX / NumPy) is written at the end of the session to ``IGPO_BENCH_SUMMARY``
(a directory; default ``.benchmarks/igpo`` under the repository root) whenever timings were
taken, i.e. not under ``--benchmark-disable``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .bench_support import SUMMARY_ENV, TORCH_THREADS_ENV, Recorder

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def recorder():
    collected = Recorder()
    yield collected
    directory = Path(os.environ.get(SUMMARY_ENV, REPOSITORY / ".benchmarks" / "igpo"))
    for path in collected.write(directory):
        print(f"\nbenchmark summary written to {path}")


@pytest.fixture(scope="module")
def torch_threads(recorder):
    """Torch intra-op threads for the benchmarks (``IGPO_BENCH_TORCH_THREADS``, default 1).

    On a small machine shared with other jobs, torch's OpenMP pool makes every op wait for a
    descheduled worker: igpo_advantages on B=4096 took a median of 114 ms with 2 threads and
    2.6 ms with 1 on the 2-core machine of docs/benchmarks.md. The previous count is restored.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get(TORCH_THREADS_ENV, "1")))
    recorder.settings["torch_threads"] = torch.get_num_threads()
    yield torch.get_num_threads()
    torch.set_num_threads(previous)
