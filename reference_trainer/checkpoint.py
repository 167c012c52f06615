"""Checkpoints: safetensors weights + optimizer state + RNG states + step, written atomically.

A checkpoint is a directory ``<root>/step_000010/`` holding

- the model and tokenizer in the ``save_pretrained`` layout (``model.safetensors``,
  ``config.json``, tokenizer files): it loads with ``AutoModelForCausalLM.from_pretrained``;
- ``optimizer.safetensors`` (every tensor of the optimizer state, key
  ``state.<param index>.<name>``) and ``optimizer.json`` (param groups and any non-tensor state);
- ``rng.safetensors`` (torch CPU and CUDA generator states) and ``rng.json`` (Python's
  ``random`` and NumPy's global state);
- ``trainer_state.json``: the step and whatever the training loop needs to continue.

Nothing is pickled, nothing is read with ``torch.load``. The directory is written under a
temporary name and renamed into place with ``os.replace`` (a rename is atomic), and only then
the ``latest`` file (itself written to a temporary file and renamed) points at it, so a run
killed at any moment leaves either the previous checkpoint or the new one, never a torn one.
``latest_checkpoint`` ignores leftovers of a killed write; ``restore_training_state`` puts the
optimizer and every RNG back, so a resumed run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from igpo_rewards.reference_trainer.files import write_text_atomic

LATEST = "latest"
"""Name of the file in the checkpoint root that holds the name of the newest checkpoint."""
_PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` updates, e.g. ``step_000010``."""
    return f"{_PREFIX}{step:06d}"


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- optimizer and RNG state ------------------------------------------------------------------------


def optimizer_state_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into a flat dict of tensors and a JSON-ready dict of the rest."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalar_state": scalars}


def optimizer_state_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild an optimizer ``state_dict`` from ``optimizer_state_to_files``' two parts."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalar_state", {}).items():
        state.setdefault(int(index), {}).update(values)
    # JSON has no tuples: give back the tuples torch's optimizers keep (Adam's betas)
    groups = [{key: tuple(value) if key == "betas" else value for key, value in group.items()} for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every global RNG state: torch CPU (+ CUDA) as tensors, Python ``random`` and NumPy as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((key for key in tensors if key.startswith("torch_cuda_")), key=lambda key: int(key.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[key] for key in cuda])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_meta = meta["numpy"]
    np.random.set_state(
        (
            numpy_meta["kind"],
            tensors["numpy_keys"].numpy().astype(np.uint32),
            numpy_meta["position"],
            numpy_meta["has_gauss"],
            numpy_meta["cached_gaussian"],
        )
    )


# --- save / find / load --------------------------------------------------------------------------


def save_checkpoint(
    root: str | os.PathLike[str],
    *,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write the checkpoint of ``step`` under ``root`` atomically and point ``root/latest`` at it.

    Args:
        root: the checkpoint directory (created if needed).
        step: updates done so far (names the checkpoint).
        model, tokenizer: saved with ``save_pretrained`` (safetensors).
        optimizer: its state goes to ``optimizer.safetensors`` + ``optimizer.json``.
        trainer_state: JSON-serializable extras; ``step`` is added.
        keep_last: older checkpoints beyond this many are deleted (0 keeps all).

    Returns:
        The checkpoint directory.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    temporary = root / f".{final.name}.tmp-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    model.save_pretrained(temporary, safe_serialization=True)
    tokenizer.save_pretrained(temporary)
    if optimizer is not None:
        tensors, meta = optimizer_state_to_files(optimizer)
        save_file(tensors, temporary / "optimizer.safetensors")
        (temporary / "optimizer.json").write_text(json.dumps(meta), encoding="utf-8")
    tensors, meta = rng_state()
    save_file(tensors, temporary / "rng.safetensors")
    (temporary / "rng.json").write_text(json.dumps(meta), encoding="utf-8")
    state = dict(trainer_state or {})
    state["step"] = step
    (temporary / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    _fsync_tree(temporary)
    if final.exists():  # the same step written again (e.g. after a resume): swap it out first
        stale = root / f".{final.name}.stale-{os.getpid()}"
        os.replace(final, stale)
        os.replace(temporary, final)
        shutil.rmtree(stale)
    else:
        os.replace(temporary, final)
    write_text_atomic(root / LATEST, final.name + "\n")
    if keep_last > 0:
        complete = sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir())
        for old in complete[:-keep_last]:
            if old != final:
                shutil.rmtree(old)
    return final


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root`` (``None`` when there is none).

    Reads ``root/latest``; temporary directories of an interrupted write are never returned.
    """
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / "trainer_state.json").is_file():
            return candidate
    complete = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / "trainer_state.json").is_file()) if root.is_dir() else []
    return complete[-1] if complete else None


def read_trainer_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint directory."""
    file = Path(path) / "trainer_state.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint: {file.name} is missing")
    return json.loads(file.read_text(encoding="utf-8"))


def restore_training_state(path: str | os.PathLike[str], optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load the optimizer state (into ``optimizer``) and every RNG state of a checkpoint.

    Load the model itself from the same directory with ``from_pretrained`` (e.g.
    ``modeling.load_pretrained``) and build ``optimizer`` on its parameters first. Returns
    the trainer state (with ``step``).
    """
    path = Path(path)
    state = read_trainer_state(path)
    if optimizer is not None:
        if not (path / "optimizer.safetensors").is_file():
            raise FileNotFoundError(f"checkpoint {path} has no optimizer state (optimizer.safetensors)")
        # load_state_dict moves each tensor to its parameter's device (and keeps "step" where torch wants it)
        tensors = load_file(path / "optimizer.safetensors")
        meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        optimizer.load_state_dict(optimizer_state_from_files(tensors, meta))
    tensors = load_file(path / "rng.safetensors")
    set_rng_state(tensors, json.loads((path / "rng.json").read_text(encoding="utf-8")))
    return state
