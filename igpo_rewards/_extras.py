"""How to install an extra of igpo-rewards, in the one form that works: every message names it.

igpo-rewards is on no package registry, so installing it by name alone fails in a fresh environment
("Could not find a version that satisfies the requirement"). pip installs it from git,
``pip install "igpo-rewards[trl] @ git+$IGPO_GIT"`` with ``IGPO_GIT`` the repository's https
address (README, "Install"), or from a clone, ``pip install ".[trl]"``.
"""

from __future__ import annotations

__all__ = ["install_line", "install_hint"]


def install_line(extra: str) -> str:
    """The README's install line for ``extra``.

    Example:
        >>> install_line("trl")
        'pip install "igpo-rewards[trl] @ git+$IGPO_GIT"'
    """
    return f'pip install "igpo-rewards[{extra}] @ git+$IGPO_GIT"'


def install_hint(extra: str) -> str:
    """What an error message says to install the ``extra`` extra: the git line, the clone line, where to read more.

    Example:
        >>> print(install_hint("server"))
        install the 'server' extra: pip install "igpo-rewards[server] @ git+$IGPO_GIT" (IGPO_GIT: the repository's https address), or pip install ".[server]" in a clone (README, "Install")
    """
    return (f"install the {extra!r} extra: {install_line(extra)} (IGPO_GIT: the repository's https address), "
            f'or pip install ".[{extra}]" in a clone (README, "Install")')
