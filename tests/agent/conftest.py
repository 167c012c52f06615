"""Every test here runs tiny torch models on one thread (the fixture is shared, see tests/torch_threads.py)."""

from ..torch_threads import one_thread  # noqa: F401  (an autouse fixture)
