"""The console scripts ``igpo-train`` and ``igpo-retrieve``.

Both are declared by every install of igpo-rewards, but their code needs an optional extra
(``trainer`` / ``server``). These wrappers import the real entry point and, when a dependency
of that extra is missing, print which extra to install instead of a raw traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from igpo_rewards._extras import install_hint

_EXTRA_OF_COMMAND = {
    "igpo-train": ("igpo_rewards.reference_trainer.cli", "trainer"),
    "igpo-retrieve": ("igpo_rewards.agent.retrieval_server", "server"),
}


def _load_main(command: str) -> Callable[[], int] | None:
    module_name, extra = _EXTRA_OF_COMMAND[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if not missing or missing == "igpo_rewards":
            raise
        print(
            f"{command}: needs the '{extra}' extra of igpo-rewards (module {missing!r} is not installed); "
            f"{install_hint(extra)}",
            file=sys.stderr,
        )
        return None
    return module.main


def igpo_train() -> int:
    """``igpo-train``: the reference trainer's CLI (needs ``igpo-rewards[trainer]``)."""
    main = _load_main("igpo-train")
    return 2 if main is None else main()


def igpo_retrieve() -> int:
    """``igpo-retrieve``: the Search-R1 compatible BM25 server (needs ``igpo-rewards[server]``)."""
    main = _load_main("igpo-retrieve")
    return 2 if main is None else main()
