"""The docs list every public name with its real signature, and the README's commands exist."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


# The pages whose Python blocks are complete programs. Each block runs cold, as a user's first
# script would: in a fresh interpreter, in an empty folder (an import, a JIT or a first torch
# call that is slow or fails only in a fresh process shows here).
RUNNABLE_PAGES = ("README.md", "docs/api.md", "docs/backends.md", "docs/scoring.md", "docs/first_hour.md")


def python_blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / page).read_text(), flags=re.M | re.S)


def run_cold(code: str, *, python: str = sys.executable, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HYPOTHESIS_PROFILE")}
    return subprocess.run([python, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_python_blocks_of_the_user_docs_run_cold_in_a_fresh_process(tmp_path):
    ran = 0
    for page in RUNNABLE_PAGES:
        for number, block in enumerate(python_blocks(page)):
            done = run_cold(block, cwd=tmp_path)
            assert done.returncode == 0, f"{page} python block {number} failed cold:\n{done.stderr[-3000:]}"
            assert "Warning" not in done.stderr, f"{page} python block {number} warns cold:\n{done.stderr[-3000:]}"
            ran += 1
    assert ran >= 6, ran
    token_level = [b for b in python_blocks("docs/api.md") if "advantages_from_token_rewards(" in b]
    assert token_level, "docs/api.md must keep a runnable token-level example"


# docs/first_hour.md: every command runs, in order, each in a fresh process, as the page says: in a
# scratch folder that stands for the clone (its examples/), with this environment's interpreter and
# console scripts first on PATH; `--budget mid` becomes `--budget quick` (the same pipeline on the
# CI budget). The set-up lines (git clone, venv, pip install) are not run here: the install-line
# tests check their form and extras, and the README's line runs in a fresh venv below. A Python
# block followed by a ```text block prints that text.
FIRST_HOUR = "docs/first_hour.md"
SET_UP = ("git clone ", "python3 -m venv ", "pip install ")


def first_hour_commands() -> list[str]:
    text = (ROOT / FIRST_HOUR).read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#\s.*$", "", line).strip()
            if command and not command.startswith(SET_UP):
                commands.append(command)
    return commands


def quick_variant(command: str) -> str:
    return command.replace("--budget mid", "--budget quick")


def test_the_first_hour_page_runs_every_command(tmp_path):
    commands = first_hour_commands()
    assert sum("--budget mid" in command for command in commands) >= 2, commands
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "examples").symlink_to(ROOT / "examples")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HYPOTHESIS_PROFILE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for command in map(quick_variant, commands):
        done = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command!r} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    check = json.loads(next(clone.glob("runs/*/heldout_em.json")).read_text())["pipeline_check"]
    assert check["ok"] and check["verdict"].startswith("WORKING"), check  # the quick warm start gives a signal


def test_the_first_hour_python_prints_what_the_page_shows(tmp_path):
    text = (ROOT / FIRST_HOUR).read_text(encoding="utf-8")
    pairs = re.findall(r"^```python\n(.*?)^```\n+```text\n(.*?)^```", text, flags=re.M | re.S)
    assert pairs, "docs/first_hour.md shows no output of its library call"
    for code, shown in pairs:
        done = run_cold(code, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split() == shown.split(), done.stdout


def test_the_settings_methods_are_documented_with_their_signatures():
    api = (ROOT / "docs" / "api.md").read_text()
    for name, method in inspect.getmembers(igpo_rewards.IGPOSettings, callable):
        if name.startswith("_"):
            continue
        signature = doc_signature(method).replace("(self, ", "(").replace("(self)", "()")
        signature = signature.replace("(cls, ", "(")
        assert signature + "`" in api, f"docs/api.md lacks IGPOSettings.{signature}"


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


# ---------------------------------------------------------------------------------------------
# Every dotted name in backticks resolves to an object
# ---------------------------------------------------------------------------------------------
#
# The rule. A code span `...` of README.md or a page of docs/ (fenced blocks excluded) is a dotted
# name when it is `a.b[.c ...]`, optionally followed by a call `(...)` and an index `[...]`
# (`np.unique(..., return_inverse=True)[1]`). Anything else is not: flags, commands,
# `key=value` assignments, paths with a slash. A dotted name is not a Python path, and is skipped,
# when its last part is a file extension (`settings.py`, `metrics.jsonl`) or its first part is in
# NOT_PYTHON (a config section of verl/Hydra, a data column, a variable of the docs' examples, a
# module of another project that is not installed) or the name is in NOT_PYTHON_NAMES. Every other dotted name must resolve: the
# longest importable module prefix is imported and the rest looked up attribute by attribute
# (through a dataclass's fields where the attribute is a field with a default factory). The
# first part may be:
#   - an importable top-level module, a builtin, or an alias the docs use (ALIASES);
#   - the short name of a module of the project (`training.rl_step` for
#     igpo_rewards.reference_trainer.training.rl_step, `protocol.observation_block`), tried
#     against every module of that name;
#   - a section of the trainer's config (`rl.max_turns`, `world.max_hops`: RunConfig's fields);
#   - a class of the project (`IGPOSettings.from_mapping`) or of THIRD_PARTY_CLASSES;
#   - an object the docs name by a variable (EXAMPLE_OBJECTS: `settings.igpo_advantages(...)`).

DOC_PAGES = ("README.md", *sorted(str(path.relative_to(ROOT)) for path in (ROOT / "docs").rglob("*.md")))
FILE_EXTENSIONS = {"py", "md", "json", "jsonl", "yaml", "yml", "toml", "txt", "sh", "png", "parquet", "safetensors",
                   "whl", "jinja"}
NOT_PYTHON = {
    # verl / Hydra config sections (`algorithm.igpo.kind`, `actor_rollout_ref.rollout.n`)
    "algorithm": "verl config", "actor_rollout_ref": "verl config", "actor": "verl config",
    "critic": "verl config", "data": "verl config", "reward": "verl config", "trainer": "verl config; "
    "also the `trainer` object of the TRL examples", "rollout_correction": "verl config",
    # columns of the Search-R1 / verl parquet layout
    "reward_model": "parquet column", "extra_info": "parquet column",
    # objects of the docs' examples and of verl's agent loop
    "dataset": "a datasets.Dataset in docs/integrations/trl.md", "advantages": "an array in docs/api.md",
    "server_manager": "the agent loop's attribute in verl",
    # another project's code, not installed
    "qa_em_format": "Search-R1's verl/utils/reward_score/qa_em_format.py",
}
NOT_PYTHON_NAMES = {"verl.plugins": "the entry-point group verl loads at import (pyproject.toml), not a module"}
ALIASES = {"np": "numpy", "jnp": "jax.numpy", "igpo": "igpo_rewards"}
THIRD_PARTY_CLASSES = {
    "Tensor": "torch.Tensor",
    "GRPOTrainer": "trl.GRPOTrainer",
    "AgentLoopWorker": "verl.experimental.agent_loop.agent_loop.AgentLoopWorker",
    "LLMServerClient": "verl.workers.rollout.llm_server.LLMServerClient",
    "PPOTrainer": "verl.trainer.ppo.v1.trainer_base.PPOTrainer",
    "RayPPOTrainer": "verl.trainer.ppo.ray_trainer.RayPPOTrainer",
}
EXAMPLE_OBJECTS = {"settings": "igpo_rewards.IGPOSettings"}
DOTTED_NAME = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(.*\))?(?:\[.*\])?", flags=re.S)


def inline_code(page: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", (ROOT / page).read_text(encoding="utf-8"), flags=re.M | re.S)
    return [span.replace("\n", " ") for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", text)]


def dotted_names(page: str) -> list[str]:
    names = []
    for span in inline_code(page):
        match = DOTTED_NAME.fullmatch(span.strip())
        if not match:
            continue
        name = match.group(1)
        parts = name.split(".")
        if parts[-1] in FILE_EXTENSIONS or parts[0] in NOT_PYTHON or name in NOT_PYTHON_NAMES:
            continue
        names.append(name)
    return names


def _project_modules() -> dict[str, list[str]]:
    """Short name -> full names of the project's modules (igpo_rewards/ and reference_trainer/)."""
    short: dict[str, list[str]] = {}
    for folder, package in ((ROOT / "igpo_rewards", "igpo_rewards"), (ROOT / "reference_trainer",
                                                                     "igpo_rewards.reference_trainer")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts:
                short.setdefault(parts[-1], []).append(".".join([package, *parts]))
    short.setdefault("reference_trainer", []).append("igpo_rewards.reference_trainer")
    return short


def _attribute(owner, name: str):
    """``getattr``, or the type of a dataclass field (a field with a default factory is no class attribute)."""
    import dataclasses
    import typing

    if hasattr(owner, name):
        return getattr(owner, name)
    if isinstance(owner, type) and dataclasses.is_dataclass(owner) and name in {f.name for f in dataclasses.fields(owner)}:
        return typing.get_type_hints(owner)[name]
    raise AttributeError(f"{owner!r} has no attribute or field {name!r}")


def _follow(owner, parts: list[str]):
    for part in parts:
        owner = _attribute(owner, part)
    return owner


def _import_longest_prefix(parts: list[str]):
    import importlib

    for end in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        return _follow(module, parts[end:])
    raise ImportError(f"no prefix of {'.'.join(parts)} is an importable module")


def _object(path: str):
    return _import_longest_prefix(path.split("."))


def resolve(name: str, modules: dict[str, list[str]]):
    """The object ``name`` stands for, by the rule above; raises when nothing resolves it."""
    import builtins

    first, *rest = name.split(".")
    attempts: list[tuple[str, object]] = []
    if first in ALIASES or first in ("igpo_rewards", "torch", "jax", "numpy", "einops", "trl", "verl", "transformers",
                                     "os", "sys", "time", "string", "typing"):
        attempts.append(("module", lambda: _import_longest_prefix([*ALIASES.get(first, first).split("."), *rest])))
    if hasattr(builtins, first):
        attempts.append(("builtin", lambda: _follow(getattr(builtins, first), rest)))
    for module in modules.get(first, []):
        attempts.append((module, lambda module=module: _import_longest_prefix([*module.split("."), *rest])))
    attempts.append(("trainer config", lambda: _follow(_object("igpo_rewards.reference_trainer.config.RunConfig"), [first, *rest])))
    if first[:1].isupper():
        homes = [module for names in modules.values() for module in names]
        attempts += [(f"class in {module}", lambda module=module: _follow(_object(f"{module}.{first}"), rest))
                     for module in homes]
    if first in THIRD_PARTY_CLASSES:
        attempts.append(("third-party class", lambda: _follow(_object(THIRD_PARTY_CLASSES[first]), rest)))
    if first in EXAMPLE_OBJECTS:
        attempts.append(("example object", lambda: _follow(_object(EXAMPLE_OBJECTS[first]), rest)))
    errors = []
    for where, attempt in attempts:
        try:
            return attempt()
        except (ImportError, AttributeError, KeyError, TypeError) as error:
            errors.append(f"{where}: {type(error).__name__}: {error}")
    raise LookupError(f"{name} does not resolve ({'; '.join(errors[:4]) or 'no rule applies'})")


def test_every_dotted_name_in_the_docs_resolves():
    modules = _project_modules()
    unresolved, checked = [], 0
    for page in DOC_PAGES:
        for name in dotted_names(page):
            checked += 1
            try:
                resolve(name, modules)
            except LookupError as error:
                unresolved.append(f"{page}: {error}")
    assert checked > 150, checked
    assert not unresolved, "\n".join(unresolved)


@pytest.mark.parametrize("span, expected", [
    ("igpo_rewards.agent.probes.score_probes", ["igpo_rewards.agent.probes.score_probes"]),
    ('igpo_rewards.agent.probes.probe_forward(probe_layout="kv_cache")', ["igpo_rewards.agent.probes.probe_forward"]),
    ("np.unique(..., return_inverse=True)[1]", ["np.unique"]),
    ("trainer.use_v1=False", []), ("algorithm.igpo.gamma", []), ("--rl.igpo.eps 1e-8", []), ("settings.py", []),
    ("tests/benchmarks/step_profile.py", []), ("rl.algorithm grpo", []),
])
def test_what_counts_as_a_dotted_name(tmp_path, monkeypatch, span, expected):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "page.md").write_text(f"Text `{span}` and\n```python\nimport igpo_rewards.not_checked\n```\n")
    assert dotted_names("page.md") == expected


@pytest.mark.parametrize("name", ["igpo_rewards.agent.packed_forward", "igpo_rewards.reference_trainer.retrieval",
                                  "training.no_such_function", "rl.no_such_field", "NoSuchClass.method"])
def test_a_stale_name_does_not_resolve(name):
    with pytest.raises(LookupError):
        resolve(name, _project_modules())


# ---------------------------------------------------------------------------------------------
# Counts the docs quote are computed
# ---------------------------------------------------------------------------------------------

# page -> (pattern whose group is the quoted number, pytest arguments that collect what it counts)
QUOTED_COUNTS = {
    "docs/integrations/trl.md": [
        (r"and its tests: (\d+) of them", ["tests/integrations/test_trl.py", "tests/integrations/test_trl_search.py"]),
        (r"the tool-loop floor job's tests: (\d+) of them", ["tests/integrations/test_trl_tools.py"]),
    ],
    "docs/integrations/verl.md": [  # the verl-pins job's files (scripts/test_verl_pins.sh)
        (r"\d+ s for the job's (\d+) tests", sorted(str(path.relative_to(ROOT)) for pattern in (
            "tests/integrations/test_verl*.py", "igpo_rewards/integrations/*verl*.py") for path in ROOT.glob(pattern))),
    ],
    "docs/integrations/retrieval_server.md": [
        (r"bad requests \((\d+) cases\)", ["tests/integrations/test_retrieval_server.py",
                                           "-k", "test_bad_requests_get_4xx_with_a_message"]),
    ],
}
COUNT_PHRASE = re.compile(r"\b\d+ (?:tests?|test cases|cases|of them)\b")


def collected_tests(arguments: list[str]) -> int:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-n", "0",
                           *arguments], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return sum("::" in line for line in done.stdout.splitlines())


def test_every_test_count_the_docs_quote_is_in_the_table():
    """A page that quotes how many tests or cases something has must let QUOTED_COUNTS compute it."""
    unchecked = []
    for page in DOC_PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        covered = [match.span() for pattern, _ in QUOTED_COUNTS.get(page, []) for match in re.finditer(pattern, text)]
        for phrase in COUNT_PHRASE.finditer(text):
            if not any(start <= phrase.start() < end for start, end in covered):
                unchecked.append(f"{page}: {phrase.group()!r}")
    assert not unchecked, unchecked


def test_the_test_counts_the_docs_quote_are_the_collected_counts():
    for page, counts in QUOTED_COUNTS.items():
        text = (ROOT / page).read_text(encoding="utf-8")
        for pattern, arguments in counts:
            quoted = re.findall(pattern, text)
            assert len(quoted) == 1, (page, pattern, quoted)
            assert int(quoted[0]) == collected_tests(arguments), (page, pattern, arguments)


# ---------------------------------------------------------------------------------------------
# Install lines
# ---------------------------------------------------------------------------------------------
#
# igpo-rewards is on no registry, so every install line names it in the git-URL form
# `"igpo-rewards[extras] @ git+$IGPO_GIT"` (README, "Install") or, where the commands run files of a
# clone, as the clone itself (`pip install ".[extras]"`, `-e`). Every extra must exist, and a page
# must name every extra its own commands need: `igpo-train` / `igpo-retrieve` (the extra
# igpo_rewards._console names for each), the imports of its Python blocks and `python -c` lines,
# and what a repository script it runs imports or starts. A page whose commands run
# `bash scripts/setup.sh` has the `all` and `dev` extras (the project's .venv).

GIT_FORM = re.compile(r'"igpo-rewards(?:\[([\w,-]+)\])? @ git\+\$IGPO_GIT"')
CLONE_FORM = re.compile(r'(?:^|\s)(?:-e\s+)?(?:"\.(?:\[([\w,-]+)\])?"|\.(?=\s|$))')
THIRD_PARTY_EXTRA = {"torch": "torch", "jax": "jax", "hypothesis": "test", "pytest": "test", "trl": "trl",
                     "datasets": "trl", "transformers": "hf", "tokenizers": "hf", "verl": "verl", "fastapi": "server",
                     "bm25s": "server", "tyro": "trainer", "matplotlib": "trainer"}
# longest prefix wins; None: pure Python, no extra
MODULE_EXTRA = {
    "igpo_rewards.integrations.trl": "trl", "igpo_rewards.integrations.verl": "verl",
    "igpo_rewards.agent.rollout": "hf", "igpo_rewards.agent.probes": "hf", "igpo_rewards.agent.bm25": "server",
    "igpo_rewards.agent.retrieval_server": "server", "igpo_rewards.testing.tiny": "hf",
    "igpo_rewards.testing.strategies": "test", "igpo_rewards.reference_trainer": "trainer",
    "igpo_rewards.reference_trainer.world": None, "igpo_rewards.reference_trainer.files": None,
}


def pyproject_extras() -> dict[str, set[str]]:
    """Extra -> the distribution names it installs, with `igpo-rewards[...]` references expanded."""
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(extra: str) -> set[str]:
        found = set()
        for requirement in declared[extra]:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group().lower()
            if name == "igpo-rewards":
                for inner in re.search(r"\[([^\]]+)\]", requirement).group(1).split(","):
                    found |= names(inner.strip())
            else:
                found.add(name)
        return found

    return {extra: names(extra) for extra in declared}


def install_commands(page: str) -> list[str]:
    text = (ROOT / page).read_text(encoding="utf-8")
    return [command.strip() for command in re.findall(r"pip install ([^\n`#]*)", text)]


def installed_extras(command: str) -> list[str] | None:
    """The extras an install command gives igpo-rewards ([] for none), or None when it does not install it."""
    match = GIT_FORM.search(command) or CLONE_FORM.search(command)
    if not match:
        return None
    return [extra.strip() for extra in (match.group(1) or "").split(",") if extra.strip()]


def test_every_install_line_uses_the_git_form_or_the_clone_and_existing_extras():
    extras = pyproject_extras()
    problems, seen = [], 0
    for page in DOC_PAGES:
        for command in install_commands(page):
            if "igpo-rewards" in command and not GIT_FORM.search(command):
                problems.append(f"{page}: {command!r} names igpo-rewards without the git-URL form")
                continue
            named = installed_extras(command)
            if named is None:
                continue
            seen += 1
            problems += [f"{page}: {command!r}: no extra {extra!r} in pyproject" for extra in named if extra not in extras]
    assert seen >= 6, seen
    assert not problems, "\n".join(problems)


# The code's own messages and docstrings name the same form: a bare `pip install 'igpo-rewards[x]'`
# fails for every user (no registry has the package).
CODE_FILES = ("igpo_rewards/**/*.py", "backends/*.py", "reference_trainer/*.py", "examples/*.py", "scripts/*.sh", ".ci/run",
              "pyproject.toml")
PIP_INSTALL = re.compile(r"pip install ([^\n]*)")


def bare_installs(text: str) -> list[str]:
    """The `pip install ...` lines of ``text`` that name igpo-rewards without the git-URL form."""
    return [match.group(0) for match in PIP_INSTALL.finditer(text)
            if "igpo-rewards" in match.group(1) and "igpo-rewards" in match.group(1).split("@ git+$IGPO_GIT")[-1]]


def test_the_code_names_no_bare_install_of_the_package():
    offenders, checked = [], 0
    for pattern in CODE_FILES:
        for path in sorted(ROOT.glob(pattern)):
            checked += 1
            offenders += [f"{path.relative_to(ROOT)}: {line}" for line in bare_installs(path.read_text(encoding="utf-8"))]
    assert checked > 50, checked
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("line, bare", [
    ("install it with: pip install 'igpo-rewards[trainer]'", True),
    ("Needs ``pip install igpo-rewards[verl]``.", True),
    ('(``pip install "igpo-rewards[server]"``; also', True),
    ('pip install "igpo-rewards[hf] @ git+$IGPO_GIT" (README)', False),
    ("f'pip install \"igpo-rewards[{extra}] @ git+$IGPO_GIT\"'", False),
    ('pip install ".[server]" in a clone', False), ("pip install hypothesis", False),
])
def test_what_counts_as_a_bare_install(line, bare):
    assert bool(bare_installs(line)) is bare


def _imports(code: str) -> set[str]:
    import ast

    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return modules


def _extra_of_module(module: str) -> str | None:
    top = module.split(".")[0]
    if top != "igpo_rewards":
        return THIRD_PARTY_EXTRA.get(top)
    owners = [prefix for prefix in MODULE_EXTRA if module == prefix or module.startswith(prefix + ".")
              or module.startswith(prefix + "_")]
    return MODULE_EXTRA[max(owners, key=len)] if owners else None


def needed_extras(page: str) -> set[str]:
    """The extras the page's own commands need (see the rule above)."""
    from igpo_rewards._console import _EXTRA_OF_COMMAND

    text = (ROOT / page).read_text(encoding="utf-8")
    code = python_blocks(page)
    needed = set()
    for block in re.findall(r"^```(?:bash|sh|console)\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.splitlines():
            words = line.split()
            if words and words[0] in _EXTRA_OF_COMMAND:
                needed.add(_EXTRA_OF_COMMAND[words[0]][1])
            code += re.findall(r'python3? -c "([^"]+)"', line)
            for script in re.findall(r"python3? ((?:examples|tests|scripts)/\S+\.py)", line):
                source = (ROOT / script).read_text(encoding="utf-8")
                code.append(source)
                needed |= {extra for command, (_, extra) in _EXTRA_OF_COMMAND.items() if f'"{command}"' in source}
    for snippet in code:
        needed |= {extra for extra in map(_extra_of_module, _imports(snippet)) if extra}
    return needed


def test_every_page_names_the_extras_its_commands_need():
    extras = pyproject_extras()
    missing = []
    for page in DOC_PAGES:
        provided = set()
        named = [extra for command in install_commands(page) for extra in installed_extras(command) or []]
        if re.search(r"^bash scripts/setup\.sh", (ROOT / page).read_text(encoding="utf-8"), flags=re.M):
            named += ["all", "dev"]
        for extra in named:
            provided |= extras.get(extra, set())
        missing += [f"{page} needs the {extra!r} extra but names no install line that provides it"
                    for extra in sorted(needed_extras(page)) if not extras[extra] <= provided]
    assert not missing, "\n".join(missing)


def test_the_extras_check_sees_what_a_page_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "run.py").write_text('import trl\nCOMMAND = ["igpo-retrieve", "serve"]\n')
    (tmp_path / "page.md").write_text(
        '```bash\npip install "igpo-rewards[trl] @ git+$IGPO_GIT"\nigpo-train demo\npython examples/run.py\n```\n'
        '```python\nimport jax\nfrom igpo_rewards.agent.probes import score_probes\n'
        'from igpo_rewards.reference_trainer.world import build_world\n```\n')
    assert needed_extras("page.md") == {"trainer", "server", "trl", "jax", "hf"}
    assert [installed_extras(c) for c in install_commands("page.md")] == [["trl"]]


# ---------------------------------------------------------------------------------------------
# The install lines work: in a fresh venv, and without replacing an installed torch
# ---------------------------------------------------------------------------------------------
#
# IGPO_GIT points at a git repository made from this checkout's files as they are now (committed
# or not), so the lines are run exactly as the README writes them. About 30 s each, most of it
# pip's isolated build of the package.

README_LINE = re.compile(r'^pip install "igpo-rewards(?:\[[\w,]+\])? @ git\+\$IGPO_GIT".*$', flags=re.M)


@pytest.fixture(scope="module")
def igpo_git(tmp_path_factory) -> str:
    import shutil

    repository = tmp_path_factory.mktemp("igpo_git")
    for name in ("pyproject.toml", "README.md", "igpo_rewards", "backends", "reference_trainer"):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, repository / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(path, repository / name)
    git = ["git", "-c", "user.name=igpo-tests", "-c", "user.email=tests@localhost", "-c", "init.defaultBranch=main"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot of the checkout under test"]):
        subprocess.run([*git, *command], cwd=repository, check=True, capture_output=True, timeout=120)
    # file://localhost/...: pip before 23.3 refuses a git+file URL without a host (file:///...); git takes both
    return f"file://localhost{repository.as_posix()}"


def _readme_install(extras: str) -> str:
    lines = [line.split("#")[0].strip() for line in README_LINE.findall((ROOT / "README.md").read_text())]
    wanted = f'pip install "igpo-rewards{extras} @ git+$IGPO_GIT"'
    assert wanted in lines, (wanted, lines)
    return wanted


def _run_line(line: str, *, bin_dir: Path, igpo_git: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**{key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")},
           "IGPO_GIT": igpo_git, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_the_readme_install_line_works_in_a_fresh_venv(igpo_git, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    done = _run_line(_readme_install("") + " --quiet", bin_dir=venv / "bin", igpo_git=igpo_git, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    python = str(venv / "bin" / "python")
    for number, block in enumerate(python_blocks("README.md")):
        ran = run_cold(block, python=python, cwd=tmp_path)
        assert ran.returncode == 0, f"README python block {number} in the fresh venv:\n{ran.stderr[-3000:]}"
    where = run_cold("import igpo_rewards.backends as b; print(b.__file__)", python=python, cwd=tmp_path)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr


def test_the_torch_line_keeps_an_installed_cpu_torch(igpo_git, tmp_path):
    """README's CPU route: with torch installed first (this environment's CPU wheel), the `torch`
    extra's line installs igpo-rewards and leaves torch alone (pip's dry-run report)."""
    import json
    from importlib import metadata

    torch_version = metadata.version("torch")
    report = tmp_path / "report.json"
    line = _readme_install("[torch]") + f" --dry-run --quiet --report {report}"
    done = _run_line(line, bin_dir=Path(sys.executable).parent, igpo_git=igpo_git, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    installs = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "igpo-rewards" in installs and "torch" not in installs, (torch_version, installs)
