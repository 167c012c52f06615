"""The embedded default world: a seeded synthetic knowledge base, its corpus and its questions.

The demo trains a tiny model on 2 CPU cores, so the world is small and templated: invented
entities with pronounceable made-up names (so no pretrained knowledge can help), a handful of
relations, one short document per entity, and questions of 1, 2 and 3 hops (up to 4 with
``max_hops=4``, the sparse-reward preset) whose answers need chained searches.

Entities and relations (``build_world``):

    person        -> birthplace (city), residence (another city), employer (organisation), profession
    organisation  -> headquarters (city), product
    city          -> country, feature
    country       -> capital (one of its cities), neighbour (another country)

Documents (one per entity, title = the entity's name):

    person:        "{P} was born in {city}. {P} lives in {city2}. {P} works for {org}. {P} is a/an {profession}."
    city:          "{C} is a city in {country}. {C} is known for its {feature}." (+ "{C} is the capital of {country}.")
    country:       "{K} is a country. The capital of {K} is {city}. {K} borders {country2}."
    organisation:  "{O} is an organisation based in {city}. {O} is known for its {product}."

Distractors come for free: people share first names and surnames (``people_per_first_name``,
``people_per_surname``: more sharing, more near-miss documents per name), every city is
mentioned by the documents of the people born or living there, the residence city sits next to
the birthplace, and every country is mentioned by the documents of its cities and of its
neighbours.

Questions (the subject is always a person; ``gold_queries[k]`` is the search a perfect agent
issues at hop k and ``gold_bridge_answers[k]`` the entity that search reveals, so
``gold_queries[k + 1] == gold_bridge_answers[k]`` and ``gold_bridge_answers[-1]`` is the answer):

    hops  kind              question                                                  chain
    1     birthplace        Where was {P} born?                                       P -> city
    1     employer          Which organisation does {P} work for?                     P -> org
    2     birth_country     In which country was {P} born?                            P -> city -> country
    2     employer_city     In which city is the employer of {P} based?               P -> org -> city
    3     birth_capital     What is the capital of the country where {P} was born?    P -> city -> country -> capital
    3     employer_country  In which country is the employer of {P} based?            P -> org -> city -> country
    4     employer_capital  What is the capital of the country where the employer     P -> org -> city -> country
                            of {P} is based?                                            -> capital

4-hop questions are only asked with ``max_hops=4`` (the sparse-reward preset). ``birth_capital``
and ``employer_capital`` are only asked when the chain's city is not its country's capital
(otherwise the answer would be an earlier bridge). (No question follows "borders": a country
document names the country it borders, but the country bordering it from the other side names
it too, so "the country that borders K" would have two right answers.) Train and held-out questions are about disjoint sets of
people: no held-out subject appears in any training question. Every gold query retrieves the
document it targets among BM25's top 3 (tests/trainer/test_world.py checks it on the default).

File layouts, so a user can swap in real data:

- corpus: Search-R1 jsonl, one ``{"id": str, "contents": "\\"Title\\"\\ntext"}`` per line
  (``igpo_rewards.agent.retrieval.write_corpus_jsonl`` / ``read_corpus_jsonl``).
- questions: verl/Search-R1 parquet with columns ``data_source``, ``prompt`` ([{role, content}]),
  ``ability``, ``reward_model`` ({ground_truth: aliases joined by "<|answer_split|>", style}),
  ``extra_info`` ({index, split, ...}) (``write_qa_parquet`` / ``load_qa_parquet``).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from igpo_rewards.agent.protocol import user_message
from igpo_rewards.agent.retrieval import Document
from igpo_rewards.scoring import ANSWER_SPLIT, split_ground_truth

WORLD_DATA_SOURCE = "world"
"""``QAExample.data_source`` of every question of the synthetic world."""


# ---------------------------------------------------------------------------------------------
# Shared data types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QAExample:
    """One question with its ground-truth answer aliases.

    Attributes:
        question: the question text, without any prompt template.
        answers: the ground-truth aliases (at least one).
        hops: number of searches a perfect agent needs (0 when unknown, e.g. real datasets).
        data_source: the dataset the question comes from ("world", "nq", "hotpotqa", ...).
        gold_queries: the search queries a perfect agent issues, in order (synthetic world only).
        gold_bridge_answers: the entity each gold query reveals, aligned with ``gold_queries``;
            the last one is the answer (the synthetic world's chains, or a parquet's
            ``extra_info.gold_bridge_answers``, e.g. a dataset's decomposition sub-answers).
    """

    question: str
    answers: tuple[str, ...]
    hops: int
    data_source: str
    gold_queries: tuple[str, ...] = ()
    gold_bridge_answers: tuple[str, ...] = ()

    @property
    def subgoals(self) -> tuple[str, ...]:
        """The sub-goal targets of the question's probes: the gold chain's bridge entities,
        ``gold_bridge_answers[:-1]`` (empty for a 1-hop question or one without a chain).

        Example:
            >>> QAExample("Capital of the country where Ilsa Marr was born?", ("Oslo",), 3, "world",
            ...           gold_bridge_answers=("Kelm", "Tovia", "Oslo")).subgoals
            ('Kelm', 'Tovia')
        """
        return tuple(self.gold_bridge_answers[:-1])


@dataclass
class World:
    """A generated world: training and held-out questions over one corpus."""

    train: list[QAExample]
    heldout: list[QAExample]
    corpus: list[Document]
    seed: int


# ---------------------------------------------------------------------------------------------
# Names: a seeded syllable generator
# ---------------------------------------------------------------------------------------------

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "st", "sh")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "r", "l", "s")
_COUNTRY_ENDINGS = ("ia", "ria", "or", "and", "ene")
_ORG_SUFFIXES = ("Group", "Labs", "Foundry", "Partners", "Institute", "Guild")
_PROFESSIONS = ("teacher", "farmer", "painter", "engineer", "doctor", "sailor", "baker", "writer")
_CITY_FEATURES = ("bridges", "markets", "gardens", "harbour", "towers", "festivals", "canals", "museums")
_PRODUCTS = ("ships", "software", "textiles", "medicine", "machines", "books", "glass", "bicycles")

_PERSON_TEMPLATE = "{p} was born in {birth}. {p} lives in {home}. {p} works for {org}. {p} is {profession}."
_CITY_TEMPLATE = "{c} is a city in {country}. {c} is known for its {feature}."
_CAPITAL_SENTENCE = " {c} is the capital of {country}."
_COUNTRY_TEMPLATE = "{k} is a country. The capital of {k} is {capital}. {k} borders {neighbour}."
_ORG_TEMPLATE = "{o} is an organisation based in {city}. {o} is known for its {product}."

_QUESTIONS = {  # kind -> (hops, template)
    "birthplace": (1, "Where was {p} born?"),
    "employer": (1, "Which organisation does {p} work for?"),
    "birth_country": (2, "In which country was {p} born?"),
    "employer_city": (2, "In which city is the employer of {p} based?"),
    "birth_capital": (3, "What is the capital of the country where {p} was born?"),
    "employer_country": (3, "In which country is the employer of {p} based?"),
    "employer_capital": (4, "What is the capital of the country where the employer of {p} is based?"),
}
MAX_HOPS = max(hops for hops, _ in _QUESTIONS.values())
"""The longest gold search chain a world question can have."""


def _template_words() -> set[str]:
    """Every lowercase word of the fixed texts, so that no invented name can collide with one."""
    texts = [_PERSON_TEMPLATE, _CITY_TEMPLATE, _CAPITAL_SENTENCE, _COUNTRY_TEMPLATE, _ORG_TEMPLATE,
             *(template for _, template in _QUESTIONS.values()), *_ORG_SUFFIXES, *_PROFESSIONS,
             *_CITY_FEATURES, *_PRODUCTS]
    return {word for text in texts for word in re.findall(r"[a-z]+", text.lower())}


class _NameGenerator:
    """Unique pronounceable words (onset + vowel syllables); no word is ever produced twice."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used = _template_words()

    def word(self, syllables: tuple[int, int], ending: Sequence[str] = ("",)) -> str:
        for _ in range(10_000):
            count = self.rng.randint(*syllables)
            parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(count)]
            word = "".join(parts) + self.rng.choice(_CODAS) + self.rng.choice(ending)
            if len(word) >= 4 and word not in self.used:
                self.used.add(word)
                return word.capitalize()
        raise RuntimeError("the syllable generator ran out of unique names; lower the world sizes")

    def words(self, count: int, syllables: tuple[int, int], ending: Sequence[str] = ("",)) -> list[str]:
        return [self.word(syllables, ending) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# The world generator
# ---------------------------------------------------------------------------------------------


@dataclass
class _Person:
    name: str
    birthplace: str
    residence: str
    employer: str
    profession: str


@dataclass
class _Entities:
    country_of: dict[str, str] = field(default_factory=dict)     # city -> country
    capital_of: dict[str, str] = field(default_factory=dict)     # country -> capital city
    neighbour_of: dict[str, str] = field(default_factory=dict)   # country -> another country
    feature_of: dict[str, str] = field(default_factory=dict)     # city -> feature
    city_of_org: dict[str, str] = field(default_factory=dict)    # organisation -> headquarters city
    product_of: dict[str, str] = field(default_factory=dict)     # organisation -> product
    people: list[_Person] = field(default_factory=list)


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _make_entities(rng: random.Random, *, num_people: int, num_countries: int, cities_per_country: int,
                   num_organisations: int, people_per_first_name: float, people_per_surname: float) -> _Entities:
    names = _NameGenerator(rng)
    world = _Entities()

    countries = names.words(num_countries, (2, 2), _COUNTRY_ENDINGS)
    cities_by_country = {country: names.words(cities_per_country, (2, 3)) for country in countries}
    for index, country in enumerate(countries):
        world.capital_of[country] = cities_by_country[country][0]
        world.neighbour_of[country] = countries[(index + 1) % num_countries]
        for city in cities_by_country[country]:
            world.country_of[city] = country
            world.feature_of[city] = rng.choice(_CITY_FEATURES)
    cities = list(world.country_of)

    organisations = [f"{stem} {rng.choice(_ORG_SUFFIXES)}" for stem in names.words(num_organisations, (2, 3))]
    for organisation in organisations:
        world.city_of_org[organisation] = rng.choice(cities)
        world.product_of[organisation] = rng.choice(_PRODUCTS)

    # Shared first names and surnames (people_per_first_name and people_per_surname people each)
    # make near-miss distractors. At least twice as many name combinations as people, so that
    # drawing distinct ones is quick.
    num_first = max(2, math.ceil(num_people / people_per_first_name))
    num_last = max(2, math.ceil(num_people / people_per_surname))
    while num_first * num_last < 2 * num_people:
        num_first, num_last = num_first + 1, num_last + 1
    first_names, surnames = names.words(num_first, (2, 2)), names.words(num_last, (2, 3))
    full_names: set[str] = set()
    while len(world.people) < num_people:
        name = f"{rng.choice(first_names)} {rng.choice(surnames)}"
        if name in full_names:
            continue
        full_names.add(name)
        birthplace, residence = rng.sample(cities, 2)
        world.people.append(_Person(name=name, birthplace=birthplace, residence=residence,
                                    employer=rng.choice(organisations), profession=rng.choice(_PROFESSIONS)))
    return world


def _documents(world: _Entities, rng: random.Random) -> list[Document]:
    texts: list[tuple[str, str]] = []
    for person in world.people:
        article = "an" if person.profession[0] in "aeiou" else "a"
        texts.append((person.name, _PERSON_TEMPLATE.format(
            p=person.name, birth=person.birthplace, home=person.residence,
            org=person.employer, profession=f"{article} {person.profession}")))
    for city, country in world.country_of.items():
        text = _CITY_TEMPLATE.format(c=city, country=country, feature=world.feature_of[city])
        if world.capital_of[country] == city:
            text += _CAPITAL_SENTENCE.format(c=city, country=country)
        texts.append((city, text))
    for country, capital in world.capital_of.items():
        texts.append((country, _COUNTRY_TEMPLATE.format(k=country, capital=capital,
                                                        neighbour=world.neighbour_of[country])))
    for organisation, city in world.city_of_org.items():
        texts.append((organisation, _ORG_TEMPLATE.format(o=organisation, city=city,
                                                         product=world.product_of[organisation])))
    rng.shuffle(texts)  # ids must not reveal the entity type
    return [Document(id=str(index), title=title, text=text) for index, (title, text) in enumerate(texts)]


def _question(world: _Entities, person: _Person, kind: str) -> QAExample:
    """The QAExample of one question kind about one person, with its gold search chain."""
    bridges = _bridges(world, person)[kind]
    hops, template = _QUESTIONS[kind]
    return QAExample(question=template.format(p=person.name), answers=(bridges[-1],), hops=hops,
                     data_source=WORLD_DATA_SOURCE, gold_queries=(person.name, *bridges[:-1]),
                     gold_bridge_answers=bridges)


def _bridges(world: _Entities, person: _Person) -> dict[str, tuple[str, ...]]:
    """Question kind -> the entities its gold chain reveals about ``person``, hop by hop."""
    birth_country = world.country_of[person.birthplace]
    org_city = world.city_of_org[person.employer]
    org_country = world.country_of[org_city]
    return {
        "birthplace": (person.birthplace,),
        "employer": (person.employer,),
        "birth_country": (person.birthplace, birth_country),
        "employer_city": (person.employer, org_city),
        "birth_capital": (person.birthplace, birth_country, world.capital_of[birth_country]),
        "employer_country": (person.employer, org_city, org_country),
        "employer_capital": (person.employer, org_city, org_country, world.capital_of[org_country]),
    }


def _askable(world: _Entities, person: _Person, kind: str) -> bool:
    """False when the answer would repeat an earlier bridge (a chain through a capital city)."""
    bridges = _bridges(world, person)[kind]
    return len(set(bridges)) == len(bridges)


def _questions(world: _Entities, people: list[_Person], count: int, rng: random.Random,
               split: str, max_hops: int) -> list[QAExample]:
    """``count`` distinct questions about ``people``, hop counts 1..``max_hops`` as balanced as
    possible (1, 2, 3, 1, ... for ``max_hops=3``)."""
    per_hop = [count // max_hops + (1 if hop < count % max_hops else 0) for hop in range(max_hops)]
    chosen: list[QAExample] = []
    for hops, wanted in zip(range(1, max_hops + 1), per_hop):
        pool = [(person, kind) for person in people for kind, (kind_hops, _) in _QUESTIONS.items()
                if kind_hops == hops and _askable(world, person, kind)]
        if wanted > len(pool):
            raise ValueError(f"cannot draw {wanted} distinct {hops}-hop {split} questions from "
                             f"{len(people)} people (only {len(pool)} exist); raise num_people")
        chosen += [_question(world, person, kind) for person, kind in rng.sample(pool, wanted)]
    rng.shuffle(chosen)
    return chosen


def build_world(seed: int = 0, *, num_train: int = 300, num_heldout: int = 100,
                num_people: int | None = None, num_countries: int = 8, cities_per_country: int = 4,
                num_organisations: int = 16, max_hops: int = 3, people_per_first_name: float = 2.5,
                people_per_surname: float = 3.3) -> World:
    """Generate the default world: entities, one document per entity, and train/held-out questions.

    The same arguments always give the same world (Python's ``random.Random(seed)``).

    Args:
        seed: the generator's seed.
        num_train: number of training questions (hop counts 1..``max_hops`` balanced).
        num_heldout: number of held-out questions, about people never asked about in training.
        num_people: people in the world; default ``ceil(num_train / 2) + ceil(num_heldout / 2)``
            (two questions per subject on average). The split gives the two question sets
            people in proportion to ``num_train : num_heldout``.
        num_countries: countries (>= 2: every country borders another one).
        cities_per_country: cities per country (>= 2: the capital and at least one other city).
        num_organisations: organisations.
        max_hops: the longest question chains, 1..4 (4 adds ``employer_capital``).
        people_per_first_name, people_per_surname: about how many people share a first name and
            a surname (>= 1; more sharing, more near-miss documents for every name query).

    Returns:
        A ``World`` whose corpus holds ``num_people + num_countries * (cities_per_country + 1)
        + num_organisations`` documents with ids "0", "1", ... in a shuffled order.

    Raises:
        TypeError / ValueError: a size of the wrong type or out of range, or too few people
        for the requested number of distinct questions.

    Example:
        >>> world = build_world(seed=0, num_train=6, num_heldout=3, num_countries=2,
        ...                     cities_per_country=2, num_organisations=2)
        >>> len(world.train), len(world.heldout), sorted(example.hops for example in world.heldout)
        (6, 3, [1, 2, 3])
        >>> example = world.train[0]
        >>> example.gold_bridge_answers[-1] == example.answers[0]
        True
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}: {seed!r}")
    _check_count("num_train", num_train, 1)
    _check_count("num_heldout", num_heldout, 0)
    _check_count("num_countries", num_countries, 2)
    _check_count("cities_per_country", cities_per_country, 2)
    _check_count("num_organisations", num_organisations, 1)
    _check_count("max_hops", max_hops, 1)
    if max_hops > MAX_HOPS:
        raise ValueError(f"max_hops must be <= {MAX_HOPS} (the longest question kind), got {max_hops}")
    for name, value in (("people_per_first_name", people_per_first_name), ("people_per_surname", people_per_surname)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
        if not 1.0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 1, got {value!r}")
    if num_people is None:
        num_people = math.ceil(num_train / 2) + math.ceil(num_heldout / 2)
    _check_count("num_people", num_people, 2 if num_heldout > 0 else 1)

    rng = random.Random(seed)
    world = _make_entities(rng, num_people=num_people, num_countries=num_countries,
                           cities_per_country=cities_per_country, num_organisations=num_organisations,
                           people_per_first_name=people_per_first_name, people_per_surname=people_per_surname)
    corpus = _documents(world, rng)

    # Disjoint subjects: the held-out people are never asked about in training.
    people = list(world.people)
    rng.shuffle(people)
    num_heldout_people = 0
    if num_heldout > 0:
        share = round(num_people * num_heldout / (num_train + num_heldout))
        num_heldout_people = min(max(1, share), num_people - 1)
    heldout_people, train_people = people[:num_heldout_people], people[num_heldout_people:]
    train = _questions(world, train_people, num_train, rng, "train", max_hops)
    heldout = _questions(world, heldout_people, num_heldout, rng, "held-out", max_hops)
    return World(train=train, heldout=heldout, corpus=corpus, seed=seed)


# ---------------------------------------------------------------------------------------------
# Questions (verl / Search-R1 parquet layout)
# ---------------------------------------------------------------------------------------------

_REQUIRED_QA_COLUMNS = ("data_source", "prompt", "reward_model")


def _question_from_prompt(prompt: Any, row: int, path: Path) -> str:
    """The question inside a chat prompt: the text after the last "Question:" of the last user
    message (Search-R1's template ends with "Question: {question}"), else the whole message."""
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError(f"{path}: row {row}: prompt must be a non-empty list of {{role, content}}, got {prompt!r:.120}")
    user_messages = [message for message in prompt
                     if isinstance(message, dict) and message.get("role") == "user"]
    if not user_messages or not isinstance(user_messages[-1].get("content"), str):
        raise ValueError(f"{path}: row {row}: prompt has no user message with string content: {prompt!r:.120}")
    content = user_messages[-1]["content"]
    marker = content.rfind("Question:")
    question = (content[marker + len("Question:"):] if marker >= 0 else content).strip()
    if not question:
        raise ValueError(f"{path}: row {row}: the user message holds no question: {content!r:.120}")
    return question


def _answers_from_ground_truth(ground_truth: Any, row: int, path: Path) -> tuple[str, ...]:
    """Aliases from a ground truth as ``igpo_rewards.split_ground_truth`` reads it (a
    "<|answer_split|>"-joined string, a list of strings), or Search-R1's ``{"target": [...]}``."""
    if isinstance(ground_truth, dict) and "target" in ground_truth:
        ground_truth = ground_truth["target"]
    try:
        return split_ground_truth(ground_truth)
    except ValueError:
        raise ValueError(f"{path}: row {row}: reward_model.ground_truth holds no answer: {ground_truth!r:.120}") from None
    except TypeError:
        raise ValueError(f"{path}: row {row}: reward_model.ground_truth must be a string, a list of strings "
                         f"or {{'target': [...]}}, got {ground_truth!r:.120}") from None


def load_qa_parquet(path: str | Path) -> list[QAExample]:
    """Read questions from a verl/Search-R1 parquet file.

    Columns used: ``data_source`` (str), ``prompt`` (list of {role, content}; the question is
    recovered from the last user message, see ``_question_from_prompt``), ``reward_model``
    ({ground_truth: aliases joined by "<|answer_split|>" (or a list, or {"target": [...]})}).
    Optional ``extra_info`` keys ``hops`` (int), ``gold_queries`` and ``gold_bridge_answers``
    (lists of str), as written by ``write_qa_parquet``, are read back; otherwise hops is 0.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a parquet file, a required column is missing, no rows, or a row whose
            prompt or ground truth cannot be read (the message gives the row number).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path} is not a readable parquet file: {error}") from None
    missing = [column for column in _REQUIRED_QA_COLUMNS if column not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; columns present: {table.column_names} "
                         f"(expected the verl/Search-R1 layout: {list(_REQUIRED_QA_COLUMNS)} [+ extra_info])")
    if table.num_rows == 0:
        raise ValueError(f"{path} holds no questions (0 rows)")

    columns = {name: table.column(name).to_pylist() for name in _REQUIRED_QA_COLUMNS}
    extra_infos = (table.column("extra_info").to_pylist() if "extra_info" in table.column_names
                   else [None] * table.num_rows)
    examples = []
    for row in range(table.num_rows):
        reward_model = columns["reward_model"][row]
        if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
            raise ValueError(f"{path}: row {row}: reward_model must be a struct with ground_truth, got {reward_model!r:.120}")
        extra = extra_infos[row] if isinstance(extra_infos[row], dict) else {}
        data_source = columns["data_source"][row]
        examples.append(QAExample(
            question=_question_from_prompt(columns["prompt"][row], row, path),
            answers=_answers_from_ground_truth(reward_model["ground_truth"], row, path),
            hops=int(extra.get("hops") or 0),
            data_source=str(data_source) if data_source is not None else "unknown",
            gold_queries=tuple(extra.get("gold_queries") or ()),
            gold_bridge_answers=tuple(extra.get("gold_bridge_answers") or ()),
        ))
    return examples


def write_qa_parquet(examples: Sequence[QAExample], path: str | Path, *, split: str = "train") -> Path:
    """Write questions in the verl/Search-R1 parquet layout that ``load_qa_parquet`` reads.

    The prompt is the one the trainer rolls out from: one user message holding the Search-R1
    instruction with the question (``igpo_rewards.agent.protocol.user_message``), so verl or TRL
    trains on the same text when it reads the file as is (the chat template goes around it, as
    ``build_prompt`` does); ``load_qa_parquet`` reads the question back from after its
    "Question:". Hops and the gold search chain go to ``extra_info`` so a round trip is lossless.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not examples:
        raise ValueError("examples is empty: nothing to write")
    for position, example in enumerate(examples):
        if not isinstance(example, QAExample):
            raise TypeError(f"examples[{position}] must be a QAExample, got {type(example).__name__}")
    table = pa.table({
        "data_source": [example.data_source for example in examples],
        "prompt": [[{"role": "user", "content": user_message(example.question)}] for example in examples],
        "ability": ["fact-reasoning"] * len(examples),
        "reward_model": [{"ground_truth": ANSWER_SPLIT.join(example.answers), "style": "rule"} for example in examples],
        "extra_info": [{"index": str(index), "split": split, "hops": example.hops,
                        "gold_queries": list(example.gold_queries),
                        "gold_bridge_answers": list(example.gold_bridge_answers)}
                       for index, example in enumerate(examples)],
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
