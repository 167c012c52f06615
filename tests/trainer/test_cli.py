"""igpo-train: config precedence, clear errors, and the --model/--data/--corpus path with a tiny pretrained model."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types

import pytest
import torch

from igpo_rewards import IGPOSettings
from igpo_rewards.agent.retrieval import write_corpus_jsonl
from igpo_rewards.reference_trainer.cli import (
    COMMANDS,
    RUNNERS,
    DemoCommand,
    UsageError,
    _budgeted_config,
    DiagnoseCommand,
    EvalCommand,
    ExperimentCommand,
    ReportCommand,
    TrainCommand,
    WarmStartCommand,
    main,
    parse,
)
from igpo_rewards.reference_trainer.config import (
    BUDGETS,
    PRESETS,
    SUBCOMMAND_READS,
    FieldTypeError,
    FieldValueError,
    RunConfig,
    field_paths,
    budget_config,
    load_config_file,
    preset_config,
    quick_config,
    subcommand_values,
    to_dict,
    validate_config,
)
from igpo_rewards.reference_trainer.world import QAExample, build_world, write_qa_parquet
from igpo_rewards.testing.tiny import make_tiny_pretrained


# --- configuration ---------------------------------------------------------------------------------


def test_defaults_and_subcommands():
    command = parse(["demo"])
    assert isinstance(command, DemoCommand) and command.rl.algorithm == "igpo" and command.rl.group_size == 8
    assert command.rl.max_turns == 4 and command.rl.clip_ratio == 0.2 and command.rl.kl_coef == 0.001
    assert isinstance(parse(["train", "--rl.algorithm", "grpo"]), TrainCommand)
    assert parse(["train", "--rl.algorithm", "grpo"]).rl.algorithm == "grpo"
    assert isinstance(parse(["eval"]), EvalCommand)
    report = parse(["report", "--out", "x", "--runs", "A=a", "B=b"])
    assert isinstance(report, ReportCommand) and report.runs == ("A=a", "B=b")


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('out = "from_file"\n[rl]\nsteps = 7\ngroup_size = 4\n[world]\nnum_train = 33\n')
    command = parse(["train", "--config", str(toml), "--rl.steps", "3"])
    assert command.rl.steps == 3  # flag
    assert command.rl.group_size == 4 and command.world.num_train == 33 and command.out == "from_file"  # file
    assert command.rl.max_turns == 4  # default
    yaml = tmp_path / "run.yaml"
    yaml.write_text("rl:\n  algorithm: grpo\n")
    assert load_config_file(yaml).rl.algorithm == "grpo"


def test_world_preset_sets_defaults_that_the_file_and_flags_override(tmp_path):
    sparse = parse(["train", "--world.preset", "sparse"])
    assert sparse.world.preset == "sparse"
    for section, values in PRESETS["sparse"].items():
        for name, value in values.items():
            assert getattr(getattr(sparse, section), name) == value, (section, name)
    assert sparse.rl.group_size == RunConfig().rl.group_size  # what the preset leaves alone
    assert parse(["train", "--world.preset=sparse", "--rl.max-turns", "5"]).rl.max_turns == 5  # flag over preset
    toml = tmp_path / "sparse.toml"
    toml.write_text('[world]\npreset = "sparse"\n[warm_start]\nmax_hops = 3\n')
    from_file = parse(["demo", "--config", str(toml)])
    assert (from_file.world.max_hops, from_file.warm_start.max_hops, from_file.rl.max_turns) == (4, 3, 6)
    loaded = load_config_file(toml)
    assert (loaded.world.max_hops, loaded.warm_start.max_hops, loaded.rl.max_turns) == (4, 3, 6)
    assert parse(["demo", "--config", str(toml), "--world.preset", "default"]).rl.max_turns == 4  # the flag's preset
    default = parse(["train"])
    assert (default.world.preset, default.world.max_hops, default.warm_start.max_hops, default.rl.max_turns) == ("default", 3, 0, 4)


def test_experiment_defaults_to_the_credit_preset_and_three_methods():
    command = parse(["experiment"])
    assert isinstance(command, ExperimentCommand) and command.world.preset == "credit" and command.rl.max_turns == 6
    assert command.seeds == 5 and command.workers == 2 and command.out == "runs/experiment"
    assert command.methods == ("grpo", "igpo", "igpo_subgoals")
    assert (command.world.num_heldout, command.warm_start.max_hops, command.warm_start.steps) == (400, 3, 1000)
    assert (command.rl.steps, command.rl.questions_per_step, command.rl.group_size, command.rl.eval_every) == (100, 8, 16, 20)
    assert parse(["experiment", "--world.preset", "default"]).rl.max_turns == 4
    assert parse(["experiment", "--methods", "grpo", "igpo_a2tgpo"]).methods == ("grpo", "igpo_a2tgpo")
    assert isinstance(parse(["warm-start"]), WarmStartCommand) and isinstance(parse(["diagnose"]), DiagnoseCommand)


def test_quick_config_shrinks_the_preset_budget():
    quick = quick_config(preset_config("sparse"))
    validate_config(quick)
    assert quick.world.max_hops == 4 and quick.warm_start.max_hops == 2 and quick.rl.max_turns == 6  # the preset's
    assert quick.world.num_train == 30 and quick.rl.steps == 2  # the quick budget
    credit = quick_config(preset_config("credit"))
    assert (credit.world.num_heldout, credit.warm_start.steps, credit.rl.steps, credit.rl.group_size) == (12, 150, 2, 4)
    assert credit.warm_start.max_hops == 3 and credit.world.max_hops == 4  # the preset's, not budget
    with pytest.raises(ValueError, match=r"world.preset must be one of \('default', 'sparse', 'credit'\), got 'dense'"):
        preset_config("dense")


def test_demo_budget_sets_its_sizes_and_flags_override_them():
    """--budget NAME applies config.BUDGETS[NAME] over the (preset's) defaults; a flag the user gives wins."""
    for name in ("full", "mid", "quick"):
        config = _budgeted_config(parse(["demo", "--budget", name]))
        for section, values in BUDGETS[name].items():
            for field, value in values.items():
                assert getattr(getattr(config, section), field) == value, (name, section, field)
    full = _budgeted_config(parse(["demo"]))
    assert to_dict(full) == to_dict(validate_config(RunConfig()))  # full is the defaults
    mid = _budgeted_config(parse(["demo", "--budget", "mid"]))
    # the default world, model and warm start (the full demo's weights), a third of the RL steps
    assert (mid.world, mid.tiny, mid.warm_start) == (RunConfig().world, RunConfig().tiny, RunConfig().warm_start)
    defaults = to_dict(validate_config(RunConfig()))
    assert to_dict(mid) == defaults | {"rl": defaults["rl"] | {"steps": 10}}
    assert _budgeted_config(parse(["demo", "--budget", "mid", "--rl.steps", "7"])).rl.steps == 7
    assert to_dict(_budgeted_config(parse(["demo", "--quick"]))) == to_dict(_budgeted_config(parse(["demo", "--budget", "quick"])))
    assert to_dict(budget_config(preset_config("sparse"), "quick")) == to_dict(quick_config(preset_config("sparse")))
    with pytest.raises(UsageError, match="--quick is short for --budget quick; give one of them, not --quick with --budget mid"):
        _budgeted_config(parse(["demo", "--quick", "--budget", "mid"]))
    with pytest.raises(ValueError, match=r"budget must be one of \('full', 'mid', 'quick'\), got 'large'"):
        budget_config(RunConfig(), "large")


def test_a_bad_budget_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:  # tyro's choice error, under the subcommand's name
        main(["demo", "--budget", "large"])
    err = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2 and "invalid choice 'large' for argument '--budget'" in err
    assert "('full', 'mid', 'quick')" in err and "igpo-train demo --help" in err
    assert main(["demo", "--quick", "--budget", "mid", "--out", "unused"]) == 2
    assert "--quick is short for --budget quick" in capsys.readouterr().err


def test_every_igpo_option_is_a_flag_and_a_config_key(tmp_path):
    """RLConfig.igpo is igpo_rewards.IGPOSettings: each option of igpo_advantages / grpo_advantages,
    under the library's name, from a flag (--rl.igpo.NAME) or a config file ([rl.igpo])."""
    settings = IGPOSettings(gamma=0.5, kind="log_prob", mode="separate", weighting="trajectory", scale="none", eps=0.25,
                            ddof=1, ig_weight=0.5, outcome_weight=3.0, log_prob_floor=-7.0)
    flags = [item for field in dataclasses.fields(IGPOSettings) if field.name not in ("max_turns", "allow_outcome_only")
             for item in (f"--rl.igpo.{field.name.replace('_', '-')}", str(getattr(settings, field.name)))]
    assert parse(["train", *flags]).rl.igpo == settings
    toml = tmp_path / "igpo.toml"
    toml.write_text('[rl.igpo]\neps = 0.25\nlog_prob_floor = -7.0\nkind = "log_prob"\n')
    assert load_config_file(toml).rl.igpo == IGPOSettings(eps=0.25, log_prob_floor=-7.0, kind="log_prob")
    # the old trainer-only names are gone: one name per option
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['ig_kind'\]"):
        load_config_file(_write(tmp_path / "old.toml", '[rl]\nig_kind = "prob"\n'))


def test_a_bad_igpo_flag_exits_2_naming_the_flag(capsys):
    """What the settings object refuses is reported under the user's flag, not tyro's internal
    name (``__tyro-dummy-inner__.rl.igpo``), with the subcommand's own --help."""
    assert main(["train", "--rl.igpo.gamma", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("igpo-train train: error: --rl.igpo.gamma 1.5: gamma must be in [0, 1], got 1.5\n")
    assert "`igpo-train train --help`" in err and "tyro" not in err and "dummy" not in err
    assert main(["diagnose", "--rl.igpo.kind=logp", "--rl.igpo.gamma", "0.5"]) == 2
    assert "--rl.igpo.kind logp: igpo settings: kind must be one of ['prob', 'log_prob'], got 'logp'" in capsys.readouterr().err


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        ("[rl]\nstepz = 3\n", "unknown key(s) ['stepz']"),
        ("[rl]\ngroup_size = 0\n", "bad.toml: rl.group_size must be >= 1, got 0"),
        ('[rl]\ngroup_size = "8"\n', "bad.toml: rl.group_size must be an int, got str '8'"),
        ("[rl]\nclip_ratio = 1.5\n", "rl.clip_ratio must be in (0.0, 1.0], got 1.5"),
        ("[rl]\nlearning_rate = 0\n", "rl.learning_rate must be > 0.0, got 0"),
        ('out = ""\n', "out must be a non-empty string, got ''"),
        ("[tiny]\nhidden_size = 30\n", "tiny.hidden_size (30) / tiny.num_heads (4) must be an even integer"),
        ("rl = 3\n", "must be a table/mapping"),
        ("[rl\n", "cannot parse config file"),
        ('[world]\npreset = "dense"\n', "world.preset must be one of ('default', 'sparse', 'credit'), got 'dense'"),
        ("[world]\nmax_hops = 5\n", "world.max_hops must be in [1, 4], got 5"),
        ("[warm_start]\nmax_hops = -1\n", "warm_start.max_hops must be >= 0, got -1"),
        ('[rl.igpo]\nkind = "logp"\n', "igpo settings: kind must be one of ['prob', 'log_prob'], got 'logp'"),
        ("[rl.igpo]\ngama = 0.9\n", "unknown key(s) ['gama'] (did you mean 'gamma' for 'gama'?)"),
    ],
)
def test_bad_config_files_exit_2_with_the_reason(tmp_path, capsys, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    assert main(["demo", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err
    path.write_text('[rl]\nalgorithm = "ppo"\n')  # demo does not read rl.algorithm: train does
    assert main(["train", "--config", str(path)]) == 2
    assert "rl.algorithm must be one of ['igpo', 'grpo'], got 'ppo'" in capsys.readouterr().err


def test_validate_config_and_quick():
    with pytest.raises(FieldValueError, match=r"rl.minibatches \(9\) must be <= rl.questions_per_step \(8\)"):
        config = RunConfig()
        config.rl.minibatches = 9
        validate_config(config)
    with pytest.raises(FieldValueError, match=r"rl.igpo.allow_outcome_only is the verl integration's opt-in"):
        config = RunConfig()
        config.rl.igpo = IGPOSettings(allow_outcome_only=True)
        validate_config(config)
    quick = quick_config(RunConfig())
    assert quick.rl.steps < RunConfig().rl.steps and quick.warm_start.steps < RunConfig().warm_start.steps
    custom = RunConfig()
    custom.rl.steps = 5
    assert quick_config(custom).rl.steps == 5  # a value the user chose is kept
    validate_config(quick)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train"], "train needs --init DIR"),
        (["train", "--init", "/nonexistent/warm"], "directory not found: /nonexistent/warm"),
        (["eval"], "eval needs --init DIR"),
        (["eval", "--init", "/nonexistent/model"], "is not a directory"),
        (["train", "--config", "/nonexistent.toml"], "config file not found: /nonexistent.toml"),
        (["demo", "--corpus", "c.jsonl"], "--corpus needs --data"),
        (["report", "--out", "/nonexistent/run"], "not found"),
        (["report", "--runs", "nolabel"], "LABEL=DIR"),
    ],
)
def test_bad_paths_exit_2_with_the_reason(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# --- real-data path: --model + --data + --corpus ------------------------------------------------------


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    """A tiny random pretrained chat model, a Search-R1 corpus and verl parquet questions."""
    root = tmp_path_factory.mktemp("real")
    world = build_world(seed=4, num_train=8, num_heldout=3, num_countries=2, cities_per_country=2, num_organisations=2)
    model_dir = make_tiny_pretrained(root / "model", texts=[doc.contents for doc in world.corpus] * 2)
    corpus = write_corpus_jsonl(world.corpus, root / "corpus.jsonl")
    questions = [QAExample(e.question, e.answers, 0, source, (), ()) for e, source in zip(world.train, ["nq", "hotpotqa"] * 4)]
    data = write_qa_parquet(questions, root / "train.parquet")
    return root, model_dir, corpus, data


def test_data_errors(real_files, tmp_path, capsys):
    root, model_dir, corpus, data = real_files
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    not_parquet = tmp_path / "bad.parquet"
    not_parquet.write_text("not parquet")
    cases = [
        (["eval", "--model", str(model_dir), "--data", str(data)], "--data needs a retrieval corpus"),
        (["eval", "--model", str(model_dir), "--data", str(data), "--corpus", str(tmp_path / "none.jsonl")], "--corpus: file not found"),
        (["eval", "--model", str(model_dir), "--data", str(data), "--corpus", str(empty)], "is empty"),
        (["eval", "--model", str(model_dir), "--data", str(not_parquet), "--corpus", str(corpus)], "not a readable parquet file"),
        (["eval", "--model", str(model_dir), "--data", str(tmp_path / "none.parquet"), "--corpus", str(corpus)], "question file not found"),
        (["demo", "--data", str(data), "--corpus", str(corpus), "--out", str(tmp_path / "d")], "a pretrained model is needed"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_train_and_eval_with_a_pretrained_model_and_parquet_data(real_files, tmp_path, capsys):
    root, model_dir, corpus, data = real_files
    run = tmp_path / "run"
    common = ["--data", str(data), "--corpus", str(corpus), "--threads", "1", "--no-progress", "--eval-fraction", "0.25"]
    argv = ["train", "--model", str(model_dir), "--out", str(run), *common,
            "--rl.steps", "2", "--rl.questions-per-step", "2", "--rl.group-size", "2", "--rl.max-new-tokens", "4",
            "--rl.minibatches", "1", "--rl.eval-every", "1"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all("heldout_em" in r for r in records) and "reward_mean" in records[1]
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == str(model_dir) and config["rl"]["steps"] == 2
    final = json.loads((run / "eval.json").read_text())
    assert final["n"] == 2 and set(final["by_data_source"]) <= {"nq", "hotpotqa"}
    assert (run / "checkpoints" / "step_000002" / "model.safetensors").is_file()

    out = tmp_path / "eval"
    assert main(["eval", "--init", str(run / "checkpoints" / "step_000002"), "--out", str(out), *common]) == 0
    printed = capsys.readouterr().out
    assert "| EM |" in printed and "NQ" in printed
    assert json.loads((out / "eval.json").read_text())["n"] == 2


# --- the command line a user types: help, suggestions, refused flags (issue 23, item 8 and 11) -----------


def _help(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # tyro wraps lines inside boxes


def test_help_names_every_subcommand(capsys):
    text = _help(capsys, ["--help"])
    names = ("demo", "train", "eval", "warm-start", "diagnose", "experiment", "report")
    assert set(COMMANDS) == set(names) and set(RUNNERS) == set(COMMANDS.values())
    assert f"the console script ({', '.join(names)})" in text  # the description names all seven
    assert "{" + ",".join(names) + "}" in text  # and tyro's usage line


def test_experiment_help_describes_the_credit_preset(capsys):
    text = _help(capsys, ["experiment", "--help"])
    assert "questions of 1-4 hops (balanced)" in text and "demonstrates questions of at most 3 hops (1000 SFT steps)" in text
    assert "hops 1/2/3" not in text
    assert "--world.max-hops INT Longest question chains (1..4)" in text
    assert text.split("--world.max-hops", 1)[1].split("--world.people")[0].rstrip(" │").endswith("(default: 4)")
    assert text.split("--rl.max-turns", 1)[1].split("--rl.max-new-tokens")[0].rstrip(" │").endswith("(default: 6)")
    assert text.split("--rl.group-size", 1)[1].split("--rl.max-turns")[0].rstrip(" │").endswith("(default: 16)")
    assert "--methods" in text and "igpo_subgoals" in text


def test_experiment_refuses_unknown_methods_and_a_list_without_grpo(capsys):
    with pytest.raises(SystemExit) as exit_:  # tyro's own refusal of a value outside the choices
        main(["experiment", "--methods", "grpo", "ppo"])
    assert exit_.value.code == 2 and "invalid choice 'ppo' for argument '--methods'" in capsys.readouterr().err
    assert main(["experiment", "--methods", "igpo", "igpo_subgoals", "--out", "/nonexistent/never"]) == 2
    err = capsys.readouterr().err
    assert "methods must include 'grpo', the baseline of the paired differences, got ['igpo', 'igpo_subgoals']" in err


@pytest.mark.parametrize("argv, message", [
    (["train", "--rl.grup-size", "3"], "unknown flag --rl.grup-size; did you mean --rl.group-size"),
    (["train", "--rl.igpo.gama", "0.5"], "unknown flag --rl.igpo.gama; did you mean --rl.igpo.gamma"),
    (["eval", "--warmstart.steps", "3"], "unknown flag --warmstart.steps; did you mean --warm-start.steps"),
    (["report", "--outt", "x"], "unknown flag --outt; did you mean --out?"),
    (["trian"], "unknown subcommand 'trian'; did you mean train?"),
])
def test_misspelled_flags_get_suggestions(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    prog = "igpo-train" if argv[0] == "trian" else f"igpo-train {argv[0]}"
    assert err.startswith(f"{prog}: error: {message}") and f"(`{prog} --help` lists" in err


def test_a_bad_value_names_the_users_flag_and_the_subcommands_help(capsys):
    assert main(["train", "--rl.group_size", "0"]) == 2  # the flag as typed (tyro accepts both spellings)
    assert capsys.readouterr().err == ("igpo-train train: error: --rl.group_size must be >= 1, got 0\n"
                                       "(`igpo-train train --help` lists its flags)\n")
    assert main(["warm-start", "--diagnose-steps", "-1"]) == 2
    assert "igpo-train warm-start: error: --diagnose-steps must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a value of the wrong type: tyro's message, the subcommand's help
        main(["eval", "--eval.batch-size", "x"])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--eval.batch-size" in err and "igpo-train eval --help" in err and "tyro" not in err


@pytest.mark.parametrize("argv, flag, why", [
    (["experiment", "--rl.algorithm", "grpo"], "--rl.algorithm", "it runs the methods of --methods"),
    (["experiment", "--rl.eval-at-start"], "--rl.eval-at-start", "every run's step 0 is its seed's warm-start evaluation"),
    (["eval", "--rl.steps", "5"], "--rl.steps", "it runs no RL step"),
    (["demo", "--rl.algorithm=grpo"], "--rl.algorithm", "it trains both IGPO and GRPO"),
    (["train", "--tiny.hidden-size", "64"], "--tiny.hidden-size", "the model is loaded from --init/--model"),
    (["experiment", "--model", "m"], "--model", "it runs on the embedded world and the tiny model"),
    (["diagnose", "--no-resume"], "--no-resume", "only train resumes a run"),
])
def test_flags_a_subcommand_would_ignore_are_refused(capsys, argv, flag, why):
    assert main(argv) == 2
    err = capsys.readouterr().err
    name = argv[0]
    assert err.startswith(f"igpo-train {name}: error: {flag} is refused: {name} does not read ") and f"({why})" in err


def test_config_file_values_a_subcommand_would_ignore_are_refused(tmp_path, capsys):
    path = _write(tmp_path / "run.toml", "[rl]\nsteps = 5\n")
    assert main(["eval", "--config", str(path)]) == 2
    assert f"{path}: rl.steps = 5 is refused: eval does not read rl.steps" in capsys.readouterr().err
    assert parse(["train", "--config", str(path)]).rl.steps == 5  # train reads it
    # a resolved config (every field) passes wherever the fields a subcommand ignores keep their defaults
    resolved = to_dict(RunConfig())
    resolved["rl"]["max_turns"], resolved["eval"]["batch_size"] = 3, 8
    path = _write(tmp_path / "config.json", json.dumps(resolved))
    command = parse(["eval", "--config", str(path)])
    assert (command.rl.max_turns, command.eval.batch_size) == (3, 8)


def test_the_config_file_of_a_child_job_holds_what_its_subcommand_reads(tmp_path):
    config = preset_config("sparse")
    config.warm_start.steps, config.rl.steps, config.tiny.hidden_size, config.rl.igpo = 50, 7, 64, IGPOSettings(gamma=0.5)
    for name in ("train", "warm-start"):
        values = subcommand_values(config, name)
        path = _write(tmp_path / f"{name}.json", json.dumps(values))
        command = parse([name, "--config", str(path)])
        for path_, _ in field_paths().items():
            value = functools.reduce(getattr, path_.split("."), command)
            expected = functools.reduce(getattr, path_.split("."), config if SUBCOMMAND_READS[name].covers(path_) else preset_config("sparse"))
            assert value == expected, (name, path_)
    assert "tiny" not in subcommand_values(config, "train") and "steps" not in subcommand_values(config, "warm-start")["rl"]


def test_igpo_settings_from_the_file_and_from_flags_merge(tmp_path):
    path = _write(tmp_path / "igpo.toml", "[rl.igpo]\ngamma = 0.5\n")
    assert parse(["train", "--config", str(path), "--rl.igpo.kind", "log_prob"]).rl.igpo == IGPOSettings(gamma=0.5, kind="log_prob")
    assert type(parse(["train"]).rl.igpo) is IGPOSettings


# --- validation declared once, with the fields (issue 18, item 4) ---------------------------------------


def _bad_values(annotation):
    """A value of the wrong type and one out of range for a field, from its declared type alone."""
    import typing

    from igpo_rewards.reference_trainer.config import Bounds, NonEmpty

    constraints = typing.get_args(annotation)[1:] if typing.get_origin(annotation) is typing.Annotated else ()
    base = typing.get_args(annotation)[0] if constraints else annotation
    kinds = [k for k in typing.get_args(base) if k is not type(None)] if typing.get_origin(base) in (typing.Union, types.UnionType) else [base]
    kind = kinds[0]
    if typing.get_origin(kind) is typing.Literal:
        return [(FieldTypeError, 3), (FieldValueError, "not-a-choice")]
    wrong = {bool: (FieldTypeError, "yes"), int: (FieldTypeError, 1.5), float: (FieldTypeError, "0.5"), str: (FieldTypeError, 3)}[kind]
    cases = [wrong]
    for constraint in constraints:
        if isinstance(constraint, Bounds) and constraint.low > -math.inf:
            cases.append((FieldValueError, constraint.low if constraint.open_low else constraint.low - 1))
        if isinstance(constraint, Bounds) and constraint.high < math.inf:
            cases.append((FieldValueError, constraint.high + 1))
        if isinstance(constraint, NonEmpty):
            cases.append((FieldValueError, ""))
    return cases


def test_every_field_is_checked_against_its_declared_type():
    """validate_config checks each field from its declaration: a wrong type or a value out of the
    declared range raises, naming the field's dotted path (IGPOSettings checks its own fields)."""
    checked = 0
    for path, annotation in field_paths().items():
        if path.startswith("rl.igpo."):
            continue
        for error_type, value in _bad_values(annotation):
            config = RunConfig()
            *sections, name = path.split(".")
            setattr(functools.reduce(getattr, sections, config), name, value)
            with pytest.raises(error_type) as error:
                validate_config(config)
            assert error.value.field == path and str(error.value).startswith(path), (path, value)
            checked += 1
    assert checked > 2 * len([p for p in field_paths() if not p.startswith("rl.igpo.")])
    validate_config(RunConfig())
