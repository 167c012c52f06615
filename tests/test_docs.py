"""The docs list every public name with its real signature, and the README's commands exist."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import igpo_rewards

ROOT = Path(__file__).resolve().parents[1]


def doc_signature(function) -> str:
    parameters = []
    star_written = False
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is parameter.KEYWORD_ONLY and not star_written:
            parameters.append("*")
            star_written = True
        if parameter.default is parameter.empty:
            parameters.append(parameter.name)
        else:
            parameters.append(f"{parameter.name}={parameter.default!r}".replace("'", '"'))
    return f"{function.__name__}({', '.join(parameters)})"


def test_api_doc_lists_every_public_function_with_its_signature():
    api = (ROOT / "docs" / "api.md").read_text()
    for name in igpo_rewards.__all__:
        public = getattr(igpo_rewards, name)
        if inspect.isfunction(public):
            assert f"`{doc_signature(public)}`" in api, f"docs/api.md lacks {doc_signature(public)}"
        else:
            assert f"`{name}`" in api, name
    documented = set(re.findall(r"^\| `(\w+)\(", api, flags=re.M))
    assert documented <= set(igpo_rewards.__all__), documented - set(igpo_rewards.__all__)


def test_algorithm_doc_names_every_pipeline_function():
    algorithm = (ROOT / "docs" / "algorithm.md").read_text()
    for name in igpo_rewards.__all__:
        if not hasattr(igpo_rewards.scoring, name):
            assert f"`{name}`" in algorithm, name


def test_readme_commands_point_at_existing_scripts():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^bash (scripts/\S+)", readme, flags=re.M)
    assert "scripts/test.sh" in commands
    for script in commands:
        assert (ROOT / script).is_file(), script
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
