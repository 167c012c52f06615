"""Eager torch vs ``torch.compile(fullgraph=True)`` vs ``jax.jit`` on W1 and W2, on a GPU or the CPU.

One command on a machine with a GPU (torch with CUDA; JAX with its CUDA plugin for the JAX rows):

    python tests/benchmarks/gpu_compile_jit.py --out gpu_compile_jit.json

and the same command on a CPU machine gives the CPU columns (``--device cpu`` forces the CPU).
It writes a JSON file and prints a Markdown table (docs/backends.md, "On a GPU").

What is timed, per workload (docs/benchmarks.md: W1 = 512 rollouts, T = 10, S = 8192; W2 = 4096
rollouts, T = 10, S = 4096; groups of G = 16, ``tests/benchmarks/bench_support.py: make_batch``),
each call in the form a training loop would use (``group_size=G``, ``validate=False``, and
``max_turns=T`` on the token path: no host sync):

- ``token``: ``advantages_from_token_rewards(token_level_rewards, response_mask, group_size=G,
  max_turns=T, validate=False)``, verl's layout;
- ``turn``: ``igpo_advantages(answer_logprob, outcome, turn_mask, group_size=G, validate=False)
  .advantages``;
- ``copy``: one [B, S] float32 copy into an existing buffer (torch) or ``jax.jit(jnp.copy)``, the
  floor the other rows are divided by;

in three modes: ``eager`` (torch), ``compile`` (``torch.compile(fullgraph=True)``, inductor) and
``jit`` (``jax.jit`` with the hyperparameters closed over, i.e. static). After the timing, every
compiled result is checked against the eager one (torch) or against NumPy (JAX), and NumPy
against the float64 oracle on the first group of each batch. Times are medians over ``--rounds`` calls after warm-up, each call
bracketed by a device synchronization (``torch.cuda.synchronize`` / ``block_until_ready``).
``first_call_s`` is the first call, compilation included (inductor starts from an empty cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.benchmarks imports

import igpo_rewards as igpo  # noqa: E402
from igpo_rewards.testing import reference  # noqa: E402
from tests.benchmarks.bench_support import WORKLOADS, Batch, Workload, make_batch  # noqa: E402


def _timed(call: Callable[[], Any], sync: Callable[[Any], Any], rounds: int) -> tuple[float, list[float]]:
    """(first call in s, the later calls in ms)."""
    start = time.perf_counter()
    sync(call())
    first = time.perf_counter() - start
    for _ in range(2):  # warm-up (autotuning, caches)
        sync(call())
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        sync(call())
        times.append((time.perf_counter() - start) * 1e3)
    return first, times


def _row(workload: Workload, backend: str, path: str, mode: str, first: float, times: list[float]) -> dict[str, Any]:
    return {"workload": workload.name, "backend": backend, "path": path, "mode": mode, "first_call_s": first,
            "median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "rounds": len(times)}


def _check_against_oracle(batch: Batch, workload: Workload) -> None:
    """Eager NumPy on the first group of the batch equals the float64 oracle (the timed calls are then
    compared with eager torch / JAX, which the test suite compares with the oracle)."""
    rows = slice(0, workload.group_size)
    mine = igpo.advantages_from_token_rewards(batch.token_level_rewards[rows], batch.response_mask[rows],
                                              group_size=workload.group_size, max_turns=workload.turns)
    want = reference.advantages_from_token_rewards(batch.token_level_rewards[rows], batch.response_mask[rows],
                                                   group_size=workload.group_size)
    np.testing.assert_allclose(mine, want, rtol=1e-4, atol=1e-5)


def torch_rows(batch: Batch, workload: Workload, device: str, rounds: int) -> list[dict[str, Any]]:
    import torch

    on = [torch.from_numpy(np.ascontiguousarray(array)).to(device) for array in batch]
    data = Batch(*on)
    G, T = workload.group_size, workload.turns

    def token():
        return igpo.advantages_from_token_rewards(data.token_level_rewards, data.response_mask, group_size=G,
                                                  max_turns=T, validate=False)

    def turn():
        return igpo.igpo_advantages(data.answer_logprob, data.outcome, data.turn_mask, group_size=G,
                                    validate=False).advantages

    buffer = torch.empty_like(data.token_level_rewards)
    sync = (lambda _: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda _: None)
    rows = [_row(workload, "torch", "copy", "eager", *_timed(lambda: buffer.copy_(data.token_level_rewards), sync, rounds))]
    for path, call in (("token", token), ("turn", turn)):
        rows.append(_row(workload, "torch", path, "eager", *_timed(call, sync, rounds)))
        compiled = torch.compile(call, fullgraph=True, dynamic=False)  # one graph per workload's shapes
        rows.append(_row(workload, "torch", path, "compile", *_timed(compiled, sync, rounds)))
        torch.testing.assert_close(compiled(), call(), rtol=1e-4, atol=1e-5)
    return rows


def jax_rows(batch: Batch, workload: Workload, device: str, rounds: int) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    target = jax.devices("gpu" if device.startswith("cuda") else "cpu")[0]
    data = Batch(*[jax.device_put(array.astype(np.int32) if array.dtype == np.int64 else array, target)
                   for array in batch])
    G, T = workload.group_size, workload.turns
    token = jax.jit(lambda rewards, mask: igpo.advantages_from_token_rewards(rewards, mask, group_size=G, max_turns=T))
    turn = jax.jit(lambda logprob, outcome, mask: igpo.igpo_advantages(logprob, outcome, mask, group_size=G).advantages)
    copy = jax.jit(jnp.copy)
    sync = jax.block_until_ready
    rows = [
        _row(workload, "jax", "copy", "jit", *_timed(lambda: copy(data.token_level_rewards), sync, rounds)),
        _row(workload, "jax", "token", "jit", *_timed(lambda: token(data.token_level_rewards, data.response_mask),
                                                      sync, rounds)),
        _row(workload, "jax", "turn", "jit", *_timed(lambda: turn(data.answer_logprob, data.outcome, data.turn_mask),
                                                     sync, rounds)),
    ]
    expected_tokens = igpo.advantages_from_token_rewards(batch.token_level_rewards, batch.response_mask, group_size=G,
                                                         max_turns=T)
    expected_turns = igpo.igpo_advantages(batch.answer_logprob, batch.outcome, batch.turn_mask, group_size=G).advantages
    np.testing.assert_allclose(np.asarray(token(data.token_level_rewards, data.response_mask)), expected_tokens,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(turn(data.answer_logprob, data.outcome, data.turn_mask)), expected_turns,
                               rtol=1e-4, atol=1e-5)
    return rows


def machine(device: str) -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
            "cpu_count": os.cpu_count(), "load_average_after": os.getloadavg(), "torch_threads": torch.get_num_threads(),
            "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import jax

        info["jax"] = jax.__version__
        info["jax_devices"] = [str(d) for d in jax.devices()]
    except ImportError:
        info["jax"] = None
    return info


def markdown(rows: list[dict[str, Any]]) -> str:
    copies = {(row["workload"], row["backend"]): row["median_ms"] for row in rows if row["path"] == "copy"}
    lines = ["| workload | backend | path | mode | median ms | x copy | first call s |", "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for row in rows:
        ratio = row["median_ms"] / copies[(row["workload"], row["backend"])]
        lines.append(f"| {row['workload']} | {row['backend']} | {row['path']} | {row['mode']} | {row['median_ms']:.3f} | "
                     f"{ratio:.1f} | {row['first_call_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_compile_jit.json"), help="JSON file to write")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when torch sees a GPU, else the CPU")
    parser.add_argument("--workloads", default="W1,W2", help="comma list of docs/benchmarks.md workloads")
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per row (default: 50 on CUDA, 10 on the CPU)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads on the CPU (default 1)")
    parser.add_argument("--no-jax", action="store_true", help="skip the JAX rows")
    args = parser.parse_args(argv)

    # A fresh inductor cache, so that first_call_s is a cold compilation (set TORCHINDUCTOR_CACHE_DIR to reuse one).
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="igpo-inductor-"))
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    if device == "cpu":
        torch.set_num_threads(args.torch_threads)
    rounds = args.rounds or (50 if device == "cuda" else 10)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for name in args.workloads.split(","):
        workload = WORKLOADS[name.strip().upper()]
        batch = make_batch(workload)
        _check_against_oracle(batch, workload)
        rows += torch_rows(batch, workload, device, rounds)
        if not args.no_jax:
            rows += jax_rows(batch, workload, device, rounds)
        print(f"{workload}: done", file=sys.stderr, flush=True)
    result = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine(device), "rows": rows}
    result["machine"]["load_average_before"] = load_before
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
