"""Tests for igpo_rewards.reference_trainer.world: the seeded world and the parquet QA loader (the corpus
jsonl files are tested in tests/agent/test_retrieval.py)."""

import os
import re
from collections import Counter
from pathlib import Path

import pytest

from igpo_rewards.agent.bm25 import BM25Retriever
from igpo_rewards.reference_trainer.config import preset_config
from igpo_rewards.reference_trainer.world import QAExample, build_world, load_qa_parquet, write_qa_parquet

SHARED_PARQUET = Path(
    os.environ.get("IGPO_DEV_PARQUET")
    or Path(__file__).resolve().parents[1] / "data" / "search_qa_dev_sample.parquet"
)


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0)


# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------


def test_default_sizes(world):
    assert (len(world.train), len(world.heldout)) == (300, 100)
    # 150 + 50 people, 8 countries with 4 cities each, 16 organisations: one document each.
    assert len(world.corpus) == 200 + 8 * (4 + 1) + 16
    assert Counter(example.hops for example in world.train) == {1: 100, 2: 100, 3: 100}
    assert Counter(example.hops for example in world.heldout) == {1: 34, 2: 33, 3: 33}
    assert [doc.id for doc in world.corpus] == [str(index) for index in range(len(world.corpus))]


def test_same_seed_same_world_other_seed_other_world(world):
    again = build_world(seed=0)
    assert (again.train, again.heldout, again.corpus) == (world.train, world.heldout, world.corpus)
    other = build_world(seed=1)
    assert {doc.title for doc in other.corpus} != {doc.title for doc in world.corpus}


def test_titles_unique_and_questions_distinct(world):
    titles = [doc.title for doc in world.corpus]
    assert len(set(titles)) == len(titles)
    questions = [example.question for example in world.train + world.heldout]
    assert len(set(questions)) == len(questions)


def test_heldout_subjects_never_appear_in_training_questions(world):
    heldout_subjects = {example.gold_queries[0] for example in world.heldout}
    assert heldout_subjects
    for example in world.train:
        assert not any(subject in example.question for subject in heldout_subjects)


def test_gold_chain_is_consistent(world):
    for example in world.train + world.heldout:
        assert example.data_source == "world"
        assert len(example.gold_queries) == len(example.gold_bridge_answers) == example.hops
        assert example.gold_queries[0] in example.question
        assert example.gold_queries[1:] == example.gold_bridge_answers[:-1]
        assert example.answers == (example.gold_bridge_answers[-1],)
        assert example.answers[0] not in example.question
        # A 3-hop question is never answerable by its first bridge (born in the capital).
        assert len(set(example.gold_bridge_answers)) == example.hops


def _solve_from_corpus(question: str, docs: dict[str, str]) -> tuple[str, list[str]]:
    """An independent reader: answer a world question by following the documents' sentences."""

    def fact(title: str, pattern: str) -> str:
        match = re.search(pattern.format(re.escape(title)), docs[title])
        assert match, (title, pattern, docs[title])
        return match.group(1)

    born = r"{} was born in (\w+)\."
    works = r"{} works for ([\w ]+?)\."
    country = r"{} is a city in (\w+)\."
    capital = r"The capital of {} is (\w+)\."
    based = r"{} is an organisation based in (\w+)\."
    chains = [(r"Where was (.+) born\?", [born]),
              (r"Which organisation does (.+) work for\?", [works]),
              (r"In which country was (.+) born\?", [born, country]),
              (r"In which city is the employer of (.+) based\?", [works, based]),
              (r"What is the capital of the country where (.+) was born\?", [born, country, capital]),
              (r"In which country is the employer of (.+) based\?", [works, based, country]),
              (r"What is the capital of the country where the employer of (.+) is based\?", [works, based, country, capital])]
    for question_pattern, steps in chains:
        match = re.fullmatch(question_pattern, question)
        if match:
            entity, visited = match.group(1), []
            for step in steps:
                visited.append(entity)
                entity = fact(entity, step)
            return entity, visited
    raise AssertionError(f"unknown question form: {question}")


@pytest.mark.parametrize("name", ["world", "sparse_world"])
def test_every_question_is_answered_by_reading_the_corpus(request, name):
    world = request.getfixturevalue(name)
    docs = {doc.title: doc.text for doc in world.corpus}
    for example in world.train + world.heldout:
        answer, visited = _solve_from_corpus(example.question, docs)
        assert answer == example.answers[0]
        assert tuple(visited) == example.gold_queries


def test_distractors_share_names_and_cities(world):
    people = [example.gold_queries[0] for example in world.train + world.heldout]
    surnames = Counter(name.split()[1] for name in set(people))
    assert max(surnames.values()) >= 3  # several people per surname
    birthplace = next(example.gold_bridge_answers[0] for example in world.train if "born" in example.question)
    mentions = [doc.title for doc in world.corpus if re.search(rf"\b{birthplace}\b", doc.text)]
    assert birthplace in mentions and len(mentions) >= 3  # its own document and others mentioning it


def test_bm25_top3_retrieves_the_gold_document_for_every_gold_query(world):
    retriever = BM25Retriever(world.corpus)
    steps = [(example, hop) for example in world.train + world.heldout for hop in range(example.hops)]
    results = retriever.search([example.gold_queries[hop] for example, hop in steps], topk=3)
    for (example, hop), docs in zip(steps, results):
        titles = [doc.title for doc in docs]
        assert example.gold_queries[hop] in titles, (example.question, hop, titles)
        # and that document states the bridge answer
        gold_doc = docs[titles.index(example.gold_queries[hop])]
        assert example.gold_bridge_answers[hop] in gold_doc.text


def _preset_world(preset):
    w = preset_config(preset).world
    return build_world(w.seed, num_train=w.num_train, num_heldout=w.num_heldout, num_countries=w.num_countries,
                       cities_per_country=w.cities_per_country, num_organisations=w.num_organisations,
                       max_hops=w.max_hops, people_per_first_name=w.people_per_first_name,
                       people_per_surname=w.people_per_surname)


@pytest.fixture(scope="module")
def sparse_world():
    return _preset_world("sparse")


def test_sparse_preset_hop_counts(sparse_world):
    config = preset_config("sparse")
    assert Counter(example.hops for example in sparse_world.train) == {1: 250, 2: 250, 3: 250, 4: 250}
    assert Counter(example.hops for example in sparse_world.heldout) == {1: 30, 2: 30, 3: 30, 4: 30}
    assert len(sparse_world.heldout) == config.world.num_heldout
    four_hop = [example for example in sparse_world.train if example.hops == 4]
    assert {example.question.split(" of ")[0] for example in four_hop} == {"What is the capital"}
    for example in sparse_world.train + sparse_world.heldout:
        assert len(example.gold_queries) == len(example.gold_bridge_answers) == example.hops
        assert example.gold_queries[1:] == example.gold_bridge_answers[:-1]
        assert len(set(example.gold_bridge_answers)) == example.hops  # no chain through a capital


def test_credit_preset_holds_100_heldout_questions_per_hop_with_their_sub_goals():
    """The credit preset is the sparse world with 400 held-out questions: 100 per hop count (the
    experiment's per-hop resolution), each chain's bridges (the sub-goal targets,
    ``gold_bridge_answers[:-1]``) distinct from each other and from the answer."""
    world = _preset_world("credit")
    assert Counter(example.hops for example in world.heldout) == {1: 100, 2: 100, 3: 100, 4: 100}
    assert Counter(example.hops for example in world.train) == {1: 250, 2: 250, 3: 250, 4: 250}
    for example in world.train + world.heldout:
        bridges = example.gold_bridge_answers[:-1]
        assert len(bridges) == example.hops - 1 and example.answers[0] not in bridges
        assert example.gold_queries[1:] == bridges
    assert not {example.question for example in world.heldout} & {example.question for example in world.train}


def test_sparse_preset_shares_more_names(world, sparse_world):
    def people_per_name(w, part):
        people = {example.gold_queries[0] for example in w.train + w.heldout}
        counts = Counter(name.split()[part] for name in people)
        return sum(counts.values()) / len(counts)

    for part in (0, 1):  # first names, surnames: about twice as many people share each
        assert people_per_name(sparse_world, part) > 1.6 * people_per_name(world, part)


def test_sparse_preset_every_gold_query_retrieves_its_document_in_the_top_k(sparse_world):
    topk = preset_config("sparse").rl.topk
    retriever = BM25Retriever(sparse_world.corpus)
    steps = [(example, hop) for example in sparse_world.train + sparse_world.heldout for hop in range(example.hops)]
    results = retriever.search([example.gold_queries[hop] for example, hop in steps], topk=topk)
    for (example, hop), docs in zip(steps, results):
        titles = [doc.title for doc in docs]
        assert example.gold_queries[hop] in titles, (example.question, hop, titles)
        assert example.gold_bridge_answers[hop] in docs[titles.index(example.gold_queries[hop])].text


def test_default_world_is_unchanged_by_the_sparse_options():
    # max_hops=3 and the default name sharing reproduce the world the demo's measured numbers came from
    assert build_world(seed=0, max_hops=3, people_per_first_name=2.5, people_per_surname=3.3) == build_world(seed=0)
    default = _preset_world("default")
    assert Counter(example.hops for example in default.train) == {1: 334, 2: 333, 3: 333}


def test_small_world_and_sizes_are_configurable():
    small = build_world(seed=3, num_train=12, num_heldout=6, num_people=20, num_countries=3,
                        cities_per_country=3, num_organisations=2)
    assert (len(small.train), len(small.heldout), len(small.corpus)) == (12, 6, 20 + 3 * 4 + 2)
    assert small.seed == 3
    no_heldout = build_world(seed=0, num_train=3, num_heldout=0)
    assert no_heldout.heldout == [] and len(no_heldout.train) == 3


@pytest.mark.parametrize("num_train, num_heldout", [(1, 0), (2, 1), (3, 3), (6, 3), (7, 2), (20, 10)])
def test_tiny_worlds_are_complete(num_train, num_heldout):
    tiny = build_world(seed=num_train, num_train=num_train, num_heldout=num_heldout, num_countries=2,
                       cities_per_country=2, num_organisations=1)
    assert (len(tiny.train), len(tiny.heldout)) == (num_train, num_heldout)
    docs = {doc.title: doc.text for doc in tiny.corpus}
    for example in tiny.train + tiny.heldout:
        assert _solve_from_corpus(example.question, docs)[0] == example.answers[0]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"num_train": 0}, ValueError, "num_train must be >= 1, got 0"),
    ({"num_train": "3"}, TypeError, "num_train must be an int, got str"),
    ({"num_heldout": -1}, ValueError, "num_heldout must be >= 0, got -1"),
    ({"num_countries": 1}, ValueError, "num_countries must be >= 2, got 1"),
    ({"cities_per_country": 1}, ValueError, "cities_per_country must be >= 2, got 1"),
    ({"num_organisations": 2.0}, TypeError, "num_organisations must be an int, got float"),
    ({"num_train": 30, "num_heldout": 3, "num_people": 4}, ValueError, "cannot draw 10 distinct 1-hop train questions"),
    ({"max_hops": 5}, ValueError, "max_hops must be <= 4"),
    ({"max_hops": 0}, ValueError, "max_hops must be >= 1, got 0"),
    ({"people_per_surname": 0.5}, ValueError, "people_per_surname must be a finite number >= 1, got 0.5"),
    ({"people_per_first_name": "2"}, TypeError, "people_per_first_name must be a number, got str"),
])
def test_bad_sizes_raise(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        build_world(**kwargs)


# ---------------------------------------------------------------------------------------------
# Parquet questions
# ---------------------------------------------------------------------------------------------


def _write_rows(path, rows, **extra_columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {key: [row[key] for row in rows] for key in rows[0]} if rows else extra_columns
    pq.write_table(pa.table(columns), path)


def test_load_search_r1_template_and_target_lists(tmp_path):
    template = ("Answer the given question. You must conduct reasoning inside <think> and </think> first. "
                "For example, <answer> Beijing </answer>. Question: {}\n")
    rows = [
        {"data_source": "nq", "prompt": [{"role": "user", "content": template.format("who wrote hamlet?")}],
         "reward_model": {"ground_truth": {"target": ["William Shakespeare", "Shakespeare"]}, "style": "rule"}},
        {"data_source": "hotpotqa", "prompt": [{"role": "user", "content": template.format("what is 2+2?")}],
         "reward_model": {"ground_truth": {"target": ["4"]}, "style": "rule"}},
    ]
    path = tmp_path / "search_r1.parquet"
    _write_rows(path, rows)
    assert load_qa_parquet(path) == [
        QAExample("who wrote hamlet?", ("William Shakespeare", "Shakespeare"), 0, "nq"),
        QAExample("what is 2+2?", ("4",), 0, "hotpotqa"),
    ]


def test_load_answer_split_string_and_system_message(tmp_path):
    rows = [{"data_source": "popqa",
             "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "  Capital of Columbia County? "}],
             "reward_model": {"ground_truth": "Bloomsburg<|answer_split|> Eyersburg <|answer_split|>", "style": "unknown"}}]
    path = tmp_path / "q.parquet"
    _write_rows(path, rows)
    assert load_qa_parquet(path) == [QAExample("Capital of Columbia County?", ("Bloomsburg", "Eyersburg"), 0, "popqa")]


def test_write_and_load_qa_parquet_round_trip(tmp_path, world):
    examples = world.heldout[:10]
    path = write_qa_parquet(examples, tmp_path / "heldout.parquet", split="test")
    assert load_qa_parquet(path) == examples
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    assert table.column("extra_info").to_pylist()[3]["split"] == "test"
    assert table.column("reward_model").to_pylist()[0]["ground_truth"] == examples[0].answers[0]


@pytest.mark.skipif(not SHARED_PARQUET.is_file(), reason="the shared dev parquet is only on the development machine")
def test_load_shared_dev_parquet():
    examples = load_qa_parquet(SHARED_PARQUET)
    assert len(examples) == 305
    assert Counter(example.data_source for example in examples)["Bamboogle"] == 125
    assert examples[0] == QAExample("What is the date of birth of Millicent Leveson-Gower, Duchess Of Sutherland's husband?",
                                    ("20 July 1851",), 0, "2wiki")
    assert examples[1].answers == ("Bloomsburg", "The Only Town in Pennsylvania", "Eyersburg")


def test_load_qa_parquet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="question file not found"):
        load_qa_parquet(tmp_path / "missing.parquet")

    not_parquet = tmp_path / "bad.parquet"
    not_parquet.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match="is not a readable parquet file"):
        load_qa_parquet(not_parquet)

    no_prompt = tmp_path / "no_prompt.parquet"
    _write_rows(no_prompt, [{"data_source": "nq", "reward_model": {"ground_truth": "a", "style": "x"}}])
    with pytest.raises(ValueError, match=re.escape("missing column(s) ['prompt']")):
        load_qa_parquet(no_prompt)

    import pyarrow as pa

    empty = tmp_path / "empty.parquet"
    _write_rows(empty, [], data_source=pa.array([], pa.string()), prompt=pa.array([], pa.list_(pa.string())),
                reward_model=pa.array([], pa.string()))
    with pytest.raises(ValueError, match=r"holds no questions \(0 rows\)"):
        load_qa_parquet(empty)

    no_answer = tmp_path / "no_answer.parquet"
    _write_rows(no_answer, [{"data_source": "nq", "prompt": [{"role": "user", "content": "q?"}],
                             "reward_model": {"ground_truth": " <|answer_split|> ", "style": "x"}}])
    with pytest.raises(ValueError, match="row 0: reward_model.ground_truth holds no answer"):
        load_qa_parquet(no_answer)

    no_user = tmp_path / "no_user.parquet"
    _write_rows(no_user, [{"data_source": "nq", "prompt": [{"role": "system", "content": "q?"}],
                           "reward_model": {"ground_truth": "a", "style": "x"}}])
    with pytest.raises(ValueError, match="row 0: prompt has no user message"):
        load_qa_parquet(no_user)


def test_write_qa_parquet_errors(tmp_path):
    with pytest.raises(ValueError, match="examples is empty"):
        write_qa_parquet([], tmp_path / "x.parquet")
    with pytest.raises(TypeError, match=r"examples\[0\] must be a QAExample, got str"):
        write_qa_parquet(["q"], tmp_path / "x.parquet")
