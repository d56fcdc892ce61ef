"""Offline task generators: every prompt is built from word lists and a seed, nothing is
downloaded.

* ``passkey``: one 5-digit pass key hidden at a relative ``depth`` of a haystack of
  ``length`` tokens (the paper's needle-in-a-haystack, scored by exact match, no LLM judge).
* ``multikey``: two pass keys, one per coloured door, at random depths; the question asks for
  one door, so the key must stay together with its door's name.
* ``multidoc``: four short documents about different people; the question asks for one
  person's job and city, so "<name> is a <job> who lives in <city>" must survive as a phrase.

(The default model, SmolLM2-135M, answers most prompts right with the full cache at these
sizes; with four keys or six documents it mostly fails even then, and compression would be
measured against noise.)
* ``vartrack``: variable tracking (RULER's): ``VAR XQT = 48213.``, then ``hops`` assignments
  ``VAR MBA = VAR XQT.`` along a chain, and a distractor chain with another value, at random
  depths; the question asks for the chain's last variable. The default is no hop (the 135M
  default model follows none with the full cache: 0 of 6 at 1K-3K tokens), so the question
  names the assigned variable among distractor assignments, and the assignment must survive.
* ``fewshot``: in-context classification with arbitrary labels: items of two categories
  (animals, fruits, tools, ...) labelled with two random words, the exemplars in one block at
  a random depth of the filler; the question gives a new item, which only the exemplars'
  mapping can label.
* ``arithmetic`` (optional): 8 chain-of-thought exemplars in the style of the paper's GSM8K
  prompt, then a new problem; generated numbers, scored on "The answer is N".

A generator returns :class:`Example` objects: the same ``seed`` gives the same examples, and the
answer always appears in the prompt (arithmetic: it follows from numbers in the prompt).

The first generated token comes from the prefill, which every policy computes over the whole
prompt; so each prompt ends with an answer prefix after which the answer is not the first token
(SmolLM2's tokenizer writes " 71432" as " ", "7", "1", ...; the city follows "<name> is a <job>
who lives in").
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .. import prompts

TASKS = ("passkey", "multikey", "multidoc", "vartrack", "fewshot", "arithmetic")
# Question-aware: the question is inside the compressed prompt. Question-agnostic: the context
# alone is compressed, the question read afterwards (kvpress's pipeline, integrations.pipeline).
SETTINGS = ("question-aware", "question-agnostic")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

SUBJECTS = (
    "The old lighthouse",
    "A quiet village",
    "The river",
    "My neighbour",
    "The city library",
    "A small bakery",
    "The mountain trail",
    "The museum",
    "An old sailor",
    "The school garden",
    "The night train",
    "A travelling musician",
    "The harbour market",
    "The forest ranger",
    "Our football team",
    "The village council",
    "A young painter",
    "The clock tower",
    "The weather station",
    "A family of farmers",
)
PREDICATES = (
    "was built long before the railway arrived",
    "opens early on most weekday mornings",
    "attracts visitors from the nearby towns",
    "was repaired after the storm last winter",
    "keeps a record of every event in a thick notebook",
    "is known for its patient staff",
    "changes its schedule when the season turns",
    "has a view over the green valley",
    "collected money for a new roof",
    "was painted blue a few years ago",
    "hosts a small festival every autumn",
    "runs slowly when it rains",
    "sells bread, cheese and dried fruit",
    "moved to a larger building in the spring",
    "needs more volunteers for the summer",
    "received a prize for its careful work",
    "stays quiet during the long afternoons",
    "was mentioned in the regional newspaper",
    "trains new apprentices every year",
    "lends old maps to curious students",
)
CLAUSES = (
    "",
    "",
    "",
    " according to the locals",
    " without much fuss",
    " as everyone expected",
    " despite the cold weather",
    " for reasons nobody remembers",
    " in the early days",
)
COLOURS = (
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "silver",
    "golden",
    "white",
    "black",
)
NAMES = (
    "Alice",
    "Bruno",
    "Carmen",
    "Dmitri",
    "Elena",
    "Farid",
    "Greta",
    "Hiroshi",
    "Ines",
    "Jonas",
    "Kamala",
    "Lars",
    "Mona",
    "Nikolai",
    "Olga",
    "Pedro",
    "Quentin",
    "Rosa",
    "Sven",
    "Tariq",
)
CITIES = (
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Lima",
    "Dublin",
    "Vienna",
    "Hanoi",
    "Cairo",
    "Quito",
    "Prague",
    "Madrid",
    "Helsinki",
    "Seoul",
    "Athens",
    "Warsaw",
    "Havana",
    "Tunis",
    "Bern",
    "Riga",
    "Manila",
)
JOBS = (
    "teacher",
    "baker",
    "nurse",
    "pilot",
    "carpenter",
    "chemist",
    "gardener",
    "lawyer",
    "engineer",
    "librarian",
)
HOBBIES = (
    "chess",
    "sailing",
    "painting",
    "cycling",
    "birdwatching",
    "pottery",
    "climbing",
    "knitting",
    "photography",
    "gardening",
)
ITEMS = ("apples", "pencils", "marbles", "stamps", "cookies", "books", "shells", "candles")


@dataclass(frozen=True)
class Example:
    """One prompt and its expected answer.

    ``length`` is the requested prompt length in tokens (the measured one is recorded with the
    result); ``depth`` is the relative position of the fact asked about (``None``: not
    applicable). ``scoring`` is how :func:`triton_chunkkv.eval.metrics.is_correct` reads the
    answer: ``"first_number"``, ``"candidate"`` (the first of ``candidates`` mentioned) or
    ``"answer_is"`` (the number after "The answer is").
    """

    task: str
    example_id: str
    context: str
    question: str
    answer_prefix: str
    answer: str
    scoring: str
    length: int
    depth: float | None
    seed: int
    max_new_tokens: int
    candidates: tuple[str, ...] = field(default=())


def example_rng(seed: int, *parts) -> random.Random:
    """A generator of its own for one example: examples never depend on each other's order."""
    return random.Random("-".join(str(p) for p in (seed, *parts)))


def filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(PREDICATES)}{rng.choice(CLAUSES)}."


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def haystack(rng, tokenizer, num_tokens: int) -> list[str]:
    """Filler sentences adding up to at most ``num_tokens`` tokens (as close as a sentence
    allows)."""
    sentences, total = [], 0
    while True:
        sentence = filler_sentence(rng)
        cost = count_tokens(tokenizer, " " + sentence)
        if total + cost > num_tokens:
            return sentences
        sentences.append(sentence)
        total += cost


def join_sentences(sentences: list[str], per_paragraph: int = 6) -> str:
    paragraphs = [
        " ".join(sentences[i : i + per_paragraph]) for i in range(0, len(sentences), per_paragraph)
    ]
    return "\n\n".join(paragraphs)


def insert_at_depths(sentences: list[str], needles: list[tuple[float, str]]) -> list[str]:
    """``sentences`` with each needle inserted at its relative depth (0: first, 1: last)."""
    out = list(sentences)
    for depth, needle in sorted(needles, key=lambda item: -item[0]):
        out.insert(round(depth * len(sentences)), needle)
    return out


PASSKEY_INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it."
)
PASSKEY_QUESTION = "What is the pass key? Answer with the number only."
PASSKEY_PREFIX = "The pass key is"


def passkey_needle(rng) -> tuple[str, str]:
    """A 5-digit pass key and the sentence stating it (the demo's prompt draws it too)."""
    key = str(rng.randint(10000, 99999))
    return key, f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_context(needle: str, sentences: list[str], depth: float) -> str:
    """The instructions, then ``sentences`` with ``needle`` at ``depth``, in paragraphs."""
    return PASSKEY_INTRO + "\n\n" + join_sentences(insert_at_depths(sentences, [(depth, needle)]))


def passkey(
    tokenizer, *, length: int, depth: float, index: int, seed: int, overhead: int
) -> Example:
    rng = example_rng(seed, "passkey", length, depth, index)
    key, needle = passkey_needle(rng)
    budget = length - overhead - count_tokens(tokenizer, PASSKEY_INTRO + " " + needle)
    return Example(
        task="passkey",
        example_id=f"passkey-{length}-d{depth:g}-{index}",
        context=passkey_context(needle, haystack(rng, tokenizer, budget), depth),
        question=PASSKEY_QUESTION,
        answer_prefix=PASSKEY_PREFIX,
        answer=key,
        scoring="first_number",
        length=length,
        depth=depth,
        seed=seed,
        max_new_tokens=8,
    )


def multikey(
    tokenizer, *, length: int, index: int, seed: int, overhead: int, num_keys: int = 2
) -> Example:
    rng = example_rng(seed, "multikey", length, index)
    colours = rng.sample(COLOURS, num_keys)
    keys = [str(k) for k in rng.sample(range(10000, 100000), num_keys)]
    needles = [f"The pass key for the {c} door is {k}." for c, k in zip(colours, keys)]
    depths = [rng.random() for _ in needles]
    asked = rng.randrange(num_keys)
    intro = (
        "Several pass keys, one for each coloured door, are hidden inside a lot of "
        "irrelevant text. Memorize them."
    )
    budget = length - overhead - count_tokens(tokenizer, intro + " " + " ".join(needles))
    sentences = insert_at_depths(haystack(rng, tokenizer, budget), list(zip(depths, needles)))
    return Example(
        task="multikey",
        example_id=f"multikey-{length}-{index}",
        context=intro + "\n\n" + join_sentences(sentences),
        question=f"What is the pass key for the {colours[asked]} door? Answer with the number "
        "only.",
        answer_prefix=f"The pass key for the {colours[asked]} door is",
        answer=keys[asked],
        scoring="first_number",
        length=length,
        depth=round(depths[asked], 3),
        seed=seed,
        max_new_tokens=8,
    )


def multidoc(
    tokenizer, *, length: int, index: int, seed: int, overhead: int, num_docs: int = 4
) -> Example:
    rng = example_rng(seed, "multidoc", length, index)
    people = rng.sample(NAMES, num_docs)
    cities = rng.sample(CITIES, num_docs)
    jobs = rng.sample(JOBS, num_docs)
    facts = [
        f"{name} is a {job} who lives in {city}. {name} enjoys {rng.choice(HOBBIES)}."
        for name, job, city in zip(people, jobs, cities)
    ]
    asked = rng.randrange(num_docs)
    budget = length - overhead - count_tokens(tokenizer, " ".join(facts)) - 8 * num_docs
    per_doc = max(budget // num_docs, 0)
    docs = []
    for number, fact in enumerate(facts, start=1):
        filler = haystack(rng, tokenizer, per_doc)
        at = rng.randint(0, len(filler))
        docs.append(f"Document {number}:\n" + " ".join(filler[:at] + [fact] + filler[at:]))
    name = people[asked]
    # The answer prefix makes the city come a few tokens into the answer: the first generated
    # token comes from the uncompressed prefill, so it must not be the answer itself.
    return Example(
        task="multidoc",
        example_id=f"multidoc-{length}-{index}",
        context="\n\n".join(docs),
        question=f"What is {name}'s job, and in which city does {name} live? Answer in one "
        "sentence.",
        answer_prefix=f"{name} is a",
        answer=cities[asked],
        scoring="candidate",
        length=length,
        depth=round(asked / max(num_docs - 1, 1), 3),
        seed=seed,
        max_new_tokens=10,
        candidates=tuple(cities),
    )


def variable_name(rng) -> str:
    return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3))


def vartrack(
    tokenizer, *, length: int, index: int, seed: int, overhead: int, hops: int = 0
) -> Example:
    rng = example_rng(seed, "vartrack", length, index, hops)
    chain = [variable_name(rng) for _ in range(hops + 1)]
    others = [variable_name(rng) for _ in range(hops + 1)]
    value, distractor = (str(v) for v in rng.sample(range(10000, 100000), 2))
    statements = [f"VAR {chain[0]} = {value}.", f"VAR {others[0]} = {distractor}."]
    for names in (chain, others):
        statements += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    # Assignments come in chain order, the two chains interleaved at random depths.
    depths = sorted(rng.random() for _ in statements)
    order = sorted(range(len(statements)), key=lambda i: (i >= 2, i % 2 if i >= 2 else i))
    needles = [(depths[rank], statements[i]) for rank, i in enumerate(order)]
    intro = "Memorize the values of the variables assigned in the text below."
    text = intro + " " + " ".join(statements)
    budget = length - overhead - count_tokens(tokenizer, text)
    sentences = insert_at_depths(haystack(rng, tokenizer, budget), needles)
    asked = chain[-1]
    return Example(
        task="vartrack",
        example_id=f"vartrack-{length}-{index}",
        context=intro + "\n\n" + join_sentences(sentences),
        question=f"What is the value of VAR {asked}? Answer with the number only.",
        answer_prefix=f"The value of VAR {asked} is",
        answer=value,
        scoring="first_number",
        length=length,
        depth=round(depths[0], 3),
        seed=seed,
        max_new_tokens=8,
    )


CATEGORIES = {
    "animal": ("lion", "horse", "rabbit", "tiger", "sheep", "wolf", "camel", "mouse", "goat"),
    "fruit": ("apple", "banana", "cherry", "mango", "peach", "lemon", "grape", "melon", "plum"),
    "tool": ("hammer", "saw", "drill", "wrench", "chisel", "shovel", "rake", "axe", "pliers"),
    "colour": ("red", "green", "purple", "orange", "brown", "pink", "grey", "violet", "navy"),
    "vehicle": ("car", "bus", "truck", "bicycle", "train", "tram", "scooter", "van", "boat"),
}
LABELS = ("zorp", "blick", "mavo", "tresh", "quill", "dax", "fep", "wug", "lorn", "kiv")


def fewshot(
    tokenizer, *, length: int, index: int, seed: int, overhead: int, shots: int = 10
) -> Example:
    rng = example_rng(seed, "fewshot", length, index)
    categories = rng.sample(sorted(CATEGORIES), 2)
    labels = rng.sample(LABELS, 2)
    pools = [list(CATEGORIES[c]) for c in categories]
    for pool in pools:
        rng.shuffle(pool)
    asked = rng.randrange(2)
    item = pools[asked].pop()
    exemplars = []
    for shot in range(shots):
        kind = shot % 2
        exemplars.append(f"Item: {pools[kind][shot // 2]}. Label: {labels[kind]}.")
    rng.shuffle(exemplars)
    intro = "Each item below is given a label. Learn which label goes with which kind of item."
    block = " ".join(exemplars)
    budget = length - overhead - count_tokens(tokenizer, intro + " " + block)
    depth = rng.random()
    sentences = insert_at_depths(haystack(rng, tokenizer, budget), [(depth, block)])
    return Example(
        task="fewshot",
        example_id=f"fewshot-{length}-{index}",
        context=intro + "\n\n" + join_sentences(sentences),
        question=f"Which label goes with this item? Item: {item}.",
        answer_prefix=f"Item: {item}. Label:",
        answer=labels[asked],
        scoring="candidate",
        length=length,
        depth=None,
        seed=seed,
        max_new_tokens=6,
        candidates=tuple(labels),
    )


def arithmetic_problem(rng) -> tuple[str, str, int]:
    """A two-step word problem: ``(question, chain-of-thought answer, result)``."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    boxes, per_box = rng.randint(2, 9), rng.randint(3, 12)
    total = boxes * per_box
    if rng.random() < 0.5:
        given = rng.randint(1, total - 1)
        result = total - given
        question = (
            f"{name} has {boxes} boxes with {per_box} {item} in each box. {name} gives "
            f"away {given} {item}. How many {item} does {name} have left?"
        )
        reasoning = (
            f"{name} starts with {boxes} * {per_box} = {total} {item}. After giving "
            f"away {given}, {name} has {total} - {given} = {result} {item}."
        )
    else:
        extra = rng.randint(1, 20)
        result = total + extra
        question = (
            f"{name} has {boxes} boxes with {per_box} {item} in each box and finds "
            f"{extra} more {item}. How many {item} does {name} have in total?"
        )
        reasoning = (
            f"{name} has {boxes} * {per_box} = {total} {item} in boxes. With the "
            f"{extra} found, {name} has {total} + {extra} = {result} {item}."
        )
    return question, f"{reasoning} The answer is {result}.", result


def arithmetic(tokenizer, *, index: int, seed: int, shots: int = 8, **_) -> Example:
    rng = example_rng(seed, "arithmetic", index)
    exemplars = []
    for _ in range(shots):
        question, reasoning, _ = arithmetic_problem(rng)
        exemplars.append(f"Q: {question}\nA: {reasoning}")
    question, _, result = arithmetic_problem(rng)
    context = (
        'Solve each problem step by step, then write "The answer is" and the number.\n\n'
        + "\n\n".join(exemplars)
    )
    return Example(
        task="arithmetic",
        example_id=f"arithmetic-{shots}shot-{index}",
        context=context,
        question=f"Q: {question}",
        answer_prefix="A:",
        answer=str(result),
        scoring="answer_is",
        length=count_tokens(tokenizer, context),
        depth=None,
        seed=seed,
        max_new_tokens=48,
    )


def render_prompt(example: Example, tokenizer, chat: bool = True) -> str:
    """The prompt text: the user turn (context, then question) and the start of the answer.

    With ``chat`` and a tokenizer that has a chat template, the template wraps the user turn and
    the answer prefix opens the assistant turn; otherwise plain text.
    """
    return "".join(_segments(example, tokenizer, chat))


def prompt_ids(example: Example, tokenizer, chat: bool = True) -> list[int]:
    """Token ids of :func:`render_prompt`; a chat template already holds its special tokens."""
    templated = chat and getattr(tokenizer, "chat_template", None)
    return tokenizer.encode(
        render_prompt(example, tokenizer, chat), add_special_tokens=not templated
    )


def segment_ids(example: Example, tokenizer, chat: bool = True) -> tuple[list[int], list[int]]:
    """The question-agnostic setting's token ids: the context segment (the prompt up to and
    including the context) and the question segment (the rest), tokenized apart as
    ``integrations.pipeline`` does."""
    context, question = _segments(example, tokenizer, chat)
    return (
        prompts.segment_ids(tokenizer, context, first=True, chat=chat)[0].tolist(),
        prompts.segment_ids(tokenizer, question, first=False, chat=chat)[0].tolist(),
    )


def _segments(example: Example, tokenizer, chat: bool) -> tuple[str, str]:
    return prompts.prompt_segments(
        tokenizer, example.context, example.question, example.answer_prefix, chat=chat
    )


GENERATORS = {
    "passkey": passkey,
    "multikey": multikey,
    "multidoc": multidoc,
    "vartrack": vartrack,
    "fewshot": fewshot,
}


def build_examples(
    tokenizer, tasks, *, lengths, depths=DEFAULT_DEPTHS, per_cell: int, seed: int, chat: bool = True
) -> list[Example]:
    """Every example of ``tasks``: ``per_cell`` per length for each task (the pass-key ones
    take their depths from ``depths`` in turn), ``per_cell`` in all for arithmetic.

    A prompt's total length (template and question included) comes within a sentence or so of
    the requested length.
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"tasks must be among {list(TASKS)}, got {unknown}")
    examples = []
    for task in tasks:
        if task == "arithmetic":
            examples += [arithmetic(tokenizer, index=i, seed=seed) for i in range(per_cell)]
            continue
        generator = GENERATORS[task]
        cells = [
            {"depth": depths[index % len(depths)]} if task == "passkey" else {}
            for index in range(per_cell)
        ]
        # The tokens around the context: a bare example (no filler) rendered as a prompt.
        bare = generator(tokenizer, length=0, index=0, seed=seed, overhead=0, **cells[0])
        overhead = len(prompt_ids(bare, tokenizer, chat)) - count_tokens(tokenizer, bare.context)
        examples += [
            generator(
                tokenizer, length=length, index=index, seed=seed, overhead=overhead, **cells[index]
            )
            for length in lengths
            for index in range(per_cell)
        ]
    return examples
