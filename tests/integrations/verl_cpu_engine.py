"""verl 0.9.1's actor worker on CPU: ``ActorRolloutRefWorker(role="actor")`` -> ``TrainingWorker`` ->
the FSDP engine (fsdp2), built from verl's own Hydra config, in this process.

What it takes, and nothing else:

* a CPU platform registered through verl's platform API (``verl.plugin.platform.set_platform``):
  verl picks its device (``get_device_name``, ``get_torch_device``) from the platform, and with no
  GPU it falls back to "nvidia" and calls CUDA;
* ``VERL_ENGINE_DEVICE=cuda`` / ``VERL_ENGINE_VENDOR=nvidia``: verl's own overrides of the engine
  registry's lookup, so the registry returns the engines it returns on an NVIDIA GPU (the probe
  engine under (cuda, nvidia));
* a one-process gloo group over a file store (FSDP needs a process group);
* fp32 weights and mixed precision, no torch.compile, SDPA attention (no flash-attn on CPU);
* ``verl.models.transformers.monkey_patch.is_trl_available`` answering False: verl 0.9.1 then
  imports ``AutoModelForCausalLMWithValueHead`` from TRL, which TRL 1.x no longer has (this venv
  has TRL 1.16 for the TRL integration); verl's pins venv has no TRL at all.

FSDP1 (``strategy=fsdp``) refuses CPU parameters at wrap time (torch's ``sync_module_states``),
Ulysses sequence parallelism needs several ranks and flash-attn: both run on GPUs only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from verl.plugin.platform import platform_manager
from verl.plugin.platform.platform_base import PlatformBase

ENVIRONMENT = {
    "MASTER_ADDR": "127.0.0.1",
    "RANK": "0",
    "WORLD_SIZE": "1",
    "LOCAL_RANK": "0",
    "LOCAL_WORLD_SIZE": "1",
    "VERL_ENGINE_DEVICE": "cuda",
    "VERL_ENGINE_VENDOR": "nvidia",
}


class _CPUDeviceModule(types.ModuleType):
    """``torch.cpu`` plus what verl asks of a device module: memory (0 on CPU), seeds, the name."""

    def __init__(self) -> None:
        super().__init__("igpo_cpu_device")

    def __getattr__(self, name: str) -> Any:
        if name in ("max_memory_allocated", "max_memory_reserved", "memory_allocated", "memory_reserved"):
            return lambda *args, **kwargs: 0
        if name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
            return lambda *args, **kwargs: None
        if name == "mem_get_info":
            return lambda *args, **kwargs: (0, 0)
        if name in ("manual_seed", "manual_seed_all"):
            return torch.manual_seed
        if name == "get_device_name":  # verl's flops counter: an unknown device has no peak (mfu 0)
            return lambda *args, **kwargs: "CPU"
        return getattr(torch.cpu, name)


class CPUPlatform(PlatformBase):
    """verl's platform interface on the CPU (gloo, no device memory)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return _CPUDeviceModule()

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[None, None]:
        return (None, None)

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str) -> Iterator[None]:
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> None:
        return None


@contextlib.contextmanager
def cpu_actor_environment(port: int = 29571) -> Iterator[None]:
    """The CPU platform, the engine-registry overrides and a one-process gloo group (over a file
    store: no port, so parallel test processes do not collide), all undone on exit."""
    from verl.models.transformers import monkey_patch

    saved_env = {key: os.environ.get(key) for key in (*ENVIRONMENT, "MASTER_PORT")}
    saved_platform = platform_manager._current_platform
    saved_trl = monkey_patch.is_trl_available
    os.environ.update(ENVIRONMENT)
    os.environ.setdefault("MASTER_PORT", str(port))  # read by verl's Worker; no store listens on it
    platform_manager._current_platform = CPUPlatform()
    monkey_patch.is_trl_available = lambda: False
    created = not torch.distributed.is_initialized()
    try:
        with tempfile.TemporaryDirectory() as directory:
            if created:
                store = torch.distributed.FileStore(os.path.join(directory, "store"), 1)
                torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
            yield
    finally:
        if created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        monkey_patch.is_trl_available = saved_trl
        platform_manager._current_platform = saved_platform
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def actor_config(
    model_path: str | Path,
    *,
    strategy: str = "fsdp2",
    remove_padding: bool = True,
    dynamic_bsz: bool = False,
    micro_batch_size: int = 2,
    max_token_len: int = 256,
    extra: tuple[str, ...] = (),
) -> Any:
    """verl's ``ppo_trainer`` config (Hydra, as ``main_ppo`` composes it) for an actor on CPU."""
    import verl
    from hydra import compose, initialize_config_dir

    overrides = [
        f"actor_rollout_ref.model.path={model_path}",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        f"actor_rollout_ref.model.use_remove_padding={remove_padding}",
        f"actor_rollout_ref.actor.strategy={strategy}",
        f"actor_rollout_ref.actor.use_dynamic_bsz={dynamic_bsz}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro_batch_size}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro_batch_size}",
        f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={max_token_len}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.rollout.n=1",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
        "actor_rollout_ref.actor.fsdp_config.model_dtype=fp32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.reduce_dtype=fp32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.buffer_dtype=fp32",
        "actor_rollout_ref.rollout.checkpoint_engine.backend=naive",
        "algorithm.adv_estimator=igpo",
        *extra,
    ]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def actor_worker(config: Any) -> Any:
    """verl's ``ActorRolloutRefWorker(role="actor")`` with its model built (``init_model``)."""
    from verl.workers.engine_workers import ActorRolloutRefWorker

    worker = ActorRolloutRefWorker(config=config.actor_rollout_ref, role="actor")
    worker.init_model()
    return worker
