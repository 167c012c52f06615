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


# The pages whose Python blocks are complete programs; each block runs in a fresh namespace.
RUNNABLE_PAGES = ("README.md", "docs/api.md", "docs/backends.md", "docs/scoring.md")


def python_blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / page).read_text(), flags=re.M | re.S)


def test_python_blocks_of_the_user_docs_run():
    ran = 0
    for page in RUNNABLE_PAGES:
        for number, block in enumerate(python_blocks(page)):
            code = compile(block, f"{page} python block {number}", "exec")
            exec(code, {"__name__": f"docs_block_{number}"})  # noqa: S102 - the docs' own examples
            ran += 1
    assert ran >= 4, ran
    token_level = [b for b in python_blocks("docs/api.md") if "advantages_from_token_rewards(" in b]
    assert token_level, "docs/api.md must keep a runnable token-level example"


def test_nothing_in_the_repository_points_outside_it():
    """Users have the repository only: docs and tests may not name the development machines'
    shared folder (the spec lives in docs/algorithm.md, the test data in tests/data/)."""
    checked = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("igpo_rewards/**/*.py"),
               *ROOT.glob("backends/*.py"), *ROOT.glob("tests/**/*.py")]
    this_file = Path(__file__).resolve()
    outside = re.compile(r"\.\./shared|shared/data|ALGORITHM\.md")
    offenders = [str(path.relative_to(ROOT)) for path in checked
                 if path.resolve() != this_file and outside.search(path.read_text(encoding="utf-8"))]
    assert not offenders, offenders
