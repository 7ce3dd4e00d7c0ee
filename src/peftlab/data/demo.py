"""Built-in demo task for ``peftlab demo``: the invented "badge" format.

Each example asks the assistant to make a name badge for a person described
in one sentence (a first name, a job and a city, in one of several phrasings),
for instance::

    prompt: "Make a badge for Maria, a baker from Lisbon."
    answer: "[[BADGE: Lisbon / baker / Maria]]"

The answer format is invented for this demo: a ``[[BADGE: ...]]`` wrapper with
the three fields in *reverse* order (city, then job, then name) separated by
``" / "``, and nothing else -- no greeting, no explanation.  The base
SmolLM2-135M-Instruct model has never seen this format, and nothing in the
prompt spells it out, so it answers in free prose (or some badge of its own
design) and scores 0 % exact match on the held-out prompts.  The rule is
simple and purely positional (copy three words from the prompt into fixed
slots), so a LoRA adapter learns it within a couple of hundred examples.

Held-out prompts are genuinely held out: every held-out example uses a person
name that never occurs in the training set, so the (name, job, city) inputs are
disjoint from training and the adapter must apply the rule to new inputs
rather than recall memorised answers.

Everything is generated in code from fixed word lists with a seeded
:class:`random.Random`; no external text is used.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = [
    "DEMO_TASK_DESCRIPTION",
    "DemoExample",
    "RECOMMENDED",
    "BADGE_PREFIX",
    "BADGE_SUFFIX",
    "BADGE_SEPARATOR",
    "END_OF_TURN",
    "MAX_NEW_TOKENS",
    "NAMES",
    "JOBS",
    "CITIES",
    "TEMPLATES",
    "N_TRAIN",
    "N_HELDOUT",
    "make_answer",
    "normalize_prediction",
    "exact_match",
    "demo_task",
]

DEMO_TASK_DESCRIPTION: str = (
    "Invented badge format: asked for a person's badge, reply exactly "
    "'[[BADGE: <city> / <job> / <name>]]' (fields reversed), e.g. "
    "'Make a badge for Maria, a baker from Lisbon.' -> "
    "'[[BADGE: Lisbon / baker / Maria]]'."
)

BADGE_PREFIX = "[[BADGE: "
BADGE_SUFFIX = "]]"
BADGE_SEPARATOR = " / "

#: End-of-turn token of the SmolLM2 chat template; generation is cut there.
END_OF_TURN = "<|im_end|>"
_STOP_STRINGS = (END_OF_TURN, "<|endoftext|>")

# Fixed, mutually disjoint word lists (first names, jobs, cities).
NAMES: tuple[str, ...] = tuple(
    """Maria Ahmed Olga Kenji Fatima Lucas Priya Tomas Ingrid Omar Chloe Diego
    Hana Ivan Leila Marco Nadia Pablo Rosa Sven Yuki Zara Hugo Anika Felix Greta
    Jonas Mila Rahul Sofia Emil Lena Mateo Nora Oscar Paula Ravi Selma Theo Vera
    Anton Clara Dmitri Elena Farah Gustav Irene Karim Laura Noor Otto Rita Samir
    Tara Viktor Wanda Amir Bianca Carlos Julia""".split()
)
JOBS: tuple[str, ...] = tuple(
    """baker pilot nurse farmer teacher painter chef lawyer doctor dancer singer
    writer miner sailor tailor judge poet actor banker driver artist editor
    builder gardener""".split()
)
CITIES: tuple[str, ...] = tuple(
    """Lisbon Paris Berlin Madrid Rome Vienna Oslo Dublin Prague Warsaw Athens
    Cairo Tokyo Seoul Lima Quito Boston Denver Sydney Toronto Chicago Munich
    Milan Naples Porto Geneva Zurich London Moscow Delhi Mumbai Dallas Houston
    Phoenix Miami Nairobi""".split()
)

#: Prompt phrasings; ``{a}`` is the indefinite article matching ``{job}``.
TEMPLATES: tuple[str, ...] = (
    "Make a badge for {name}, {a} {job} from {city}.",
    "{name} is {a} {job} who lives in {city}. Make a badge for them.",
    "Badge request: {name}, {job}, {city}.",
    "Please create a name badge for {name}, {a} {job} based in {city}.",
    "I need a badge. Name: {name}. Job: {job}. City: {city}.",
    "Write the badge for {a} {job} from {city} called {name}.",
)

N_TRAIN = 256
N_HELDOUT = 40
_HELDOUT_NAME_FRACTION = 1 / 3

#: Hyperparameters validated on 2 CPU cores with Hugging Face ``peft`` LoRA
#: (``target_modules="all-linear"``, no dropout) on SmolLM2-135M-Instruct:
#: loss on the answer tokens plus the closing ``<|im_end|>`` only, AdamW
#: (no weight decay, grad-norm clip 1.0), batches drawn from reshuffled epochs
#: of the training set, constant LR (a 5-step warmup + linear decay works too).
#: Held-out exact match went from 0 % (base) to 100 % with these settings.
#: Steps take about 3-3.5 s each on 2 idle cores (sequences are ~52-67 tokens).
RECOMMENDED: dict = dict(
    lr=1e-3,
    steps=40,
    batch_size=8,
    r=8,
    lora_alpha=16,
    max_length=96,
    max_new_tokens=16,
)

#: Greedy decoding budget for answers; the longest possible answer is 15
#: tokens plus ``<|im_end|>``.
MAX_NEW_TOKENS: int = RECOMMENDED["max_new_tokens"]


@dataclass(frozen=True)
class DemoExample:
    """One chat turn: ``prompt`` is the user message, ``answer`` the reply."""

    prompt: str
    answer: str


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def make_answer(name: str, job: str, city: str) -> str:
    """The invented badge format: fields in reverse order inside ``[[BADGE: ...]]``."""
    return BADGE_PREFIX + BADGE_SEPARATOR.join((city, job, name)) + BADGE_SUFFIX


def _make_example(rng: random.Random, name: str) -> tuple[DemoExample, tuple[str, str, str]]:
    job = rng.choice(JOBS)
    city = rng.choice(CITIES)
    template = rng.choice(TEMPLATES)
    prompt = template.format(name=name, a=_article(job), job=job, city=city)
    return DemoExample(prompt=prompt, answer=make_answer(name, job, city)), (name, job, city)


def demo_task(seed: int = 0) -> tuple[list[DemoExample], list[DemoExample]]:
    """Return ``(train, heldout)`` examples of the badge task, deterministic in ``seed``.

    The name pool is split with the seeded RNG: held-out examples use only
    names that never appear in training, so held-out prompts and inputs are
    disjoint from the training set.  Within each split, (name, job, city)
    triples are unique.  ``len(train) == N_TRAIN``, ``len(heldout) == N_HELDOUT``.
    """
    rng = random.Random(f"peftlab-demo-{seed}")
    names = list(NAMES)
    rng.shuffle(names)
    n_held_names = round(len(names) * _HELDOUT_NAME_FRACTION)
    held_names, train_names = names[:n_held_names], names[n_held_names:]

    def sample(pool: list[str], n: int) -> list[DemoExample]:
        out: list[DemoExample] = []
        seen: set[tuple[str, str, str]] = set()
        i = 0
        while len(out) < n:
            # Cycle through the names so every name is used about equally often.
            if i % len(pool) == 0:
                rng.shuffle(pool)
            name = pool[i % len(pool)]
            i += 1
            ex, key = _make_example(rng, name)
            if key in seen:
                continue
            seen.add(key)
            out.append(ex)
        return out

    train = sample(train_names, N_TRAIN)
    heldout = sample(held_names, N_HELDOUT)
    return train, heldout


def normalize_prediction(prediction: str) -> str:
    """Cut a decoded generation at the first end-of-turn token and strip whitespace."""
    for stop in _STOP_STRINGS:
        idx = prediction.find(stop)
        if idx != -1:
            prediction = prediction[:idx]
    return prediction.strip()


def exact_match(prediction: str, answer: str) -> bool:
    """Exact match after cutting at ``<|im_end|>`` and stripping outer whitespace.

    Case, punctuation and inner spacing must match exactly.
    """
    return normalize_prediction(prediction) == answer.strip()
