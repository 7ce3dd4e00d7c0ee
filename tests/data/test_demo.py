import dataclasses
import re

import pytest

from peftlab.data import demo
from peftlab.data.demo import (
    DEMO_TASK_DESCRIPTION,
    RECOMMENDED,
    DemoExample,
    demo_task,
    exact_match,
)


def _fields(prompt: str) -> tuple[str, str, str]:
    """Independently recover (name, job, city) from a prompt via the word lists."""
    words = re.findall(r"[A-Za-z]+", prompt)
    names = [w for w in words if w in demo.NAMES]
    jobs = [w for w in words if w in demo.JOBS]
    cities = [w for w in words if w in demo.CITIES]
    assert len(names) == len(jobs) == len(cities) == 1, (prompt, names, jobs, cities)
    return names[0], jobs[0], cities[0]


def test_word_lists_are_disjoint_and_unique():
    for pool in (demo.NAMES, demo.JOBS, demo.CITIES):
        assert len(set(pool)) == len(pool)
    assert not set(demo.NAMES) & set(demo.JOBS)
    assert not set(demo.NAMES) & set(demo.CITIES)
    assert not set(demo.JOBS) & set(demo.CITIES)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_deterministic_for_seed(seed):
    assert demo_task(seed) == demo_task(seed)


def test_different_seeds_differ():
    assert demo_task(0) != demo_task(1)


@pytest.mark.parametrize("seed", [0, 1, 2, 123])
def test_sizes_and_types(seed):
    train, heldout = demo_task(seed)
    assert len(heldout) >= 30
    assert len(train) >= 100
    assert all(isinstance(ex, DemoExample) for ex in train + heldout)


@pytest.mark.parametrize("seed", [0, 1, 2, 123])
def test_train_and_heldout_disjoint(seed):
    train, heldout = demo_task(seed)
    # by prompt
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in heldout}
    # by underlying input: held-out people never appear in training at all
    train_inputs = {_fields(ex.prompt) for ex in train}
    held_inputs = {_fields(ex.prompt) for ex in heldout}
    assert not train_inputs & held_inputs
    assert not {n for n, _, _ in train_inputs} & {n for n, _, _ in held_inputs}
    # no duplicate inputs inside a split
    assert len(train_inputs) == len(train)
    assert len(held_inputs) == len(heldout)


@pytest.mark.parametrize("seed", [0, 1, 2, 123])
def test_answers_follow_rule(seed):
    train, heldout = demo_task(seed)
    for ex in train + heldout:
        name, job, city = _fields(ex.prompt)
        assert ex.answer == f"[[BADGE: {city} / {job} / {name}]]"
        assert "BADGE" not in ex.prompt and "[[" not in ex.prompt


@pytest.mark.parametrize("seed", [0, 1])
def test_prompts_use_several_phrasings_and_correct_articles(seed):
    train, heldout = demo_task(seed)
    assert len({re.sub(r"[A-Z][a-z]+", "X", ex.prompt)[:12] for ex in train}) >= 4
    for ex in train + heldout:
        for article, word in re.findall(r"\b(an?) ([a-z]+)", ex.prompt):
            if word in demo.JOBS:
                assert article == ("an" if word[0] in "aeiou" else "a"), ex.prompt


def test_example_is_frozen():
    ex = DemoExample(prompt="p", answer="a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ex.answer = "b"  # type: ignore[misc]


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("[[BADGE: Lisbon / baker / Maria]]", True),
        ("  [[BADGE: Lisbon / baker / Maria]]\n", True),
        ("[[BADGE: Lisbon / baker / Maria]]<|im_end|>", True),
        ("[[BADGE: Lisbon / baker / Maria]]<|im_end|><|im_end|>\n", True),
        ("[[BADGE: Lisbon / baker / Maria]]<|im_end|>trailing junk", True),
        ("\n[[BADGE: Lisbon / baker / Maria]] <|im_end|>", True),
        ("[[BADGE: Lisbon / baker / Maria]]<|endoftext|>", True),
        ("[[badge: lisbon / baker / maria]]", False),
        ("[[BADGE: Maria / baker / Lisbon]]", False),
        ("[[BADGE: Lisbon/baker/Maria]]", False),
        ("[[BADGE: Lisbon / baker / Maria]] Hope this helps!", False),
        ("Sure! [[BADGE: Lisbon / baker / Maria]]", False),
        ("[[BADGE: Lisbon / baker / Maria", False),
        ("", False),
        ("<|im_end|>[[BADGE: Lisbon / baker / Maria]]", False),
    ],
)
def test_exact_match(prediction, expected):
    assert exact_match(prediction, "[[BADGE: Lisbon / baker / Maria]]") is expected


def test_exact_match_strips_answer_too():
    assert exact_match("x", " x ")


def test_recommended_and_description():
    for key in ("lr", "steps", "batch_size", "r", "lora_alpha", "max_length", "max_new_tokens"):
        assert key in RECOMMENDED
    assert RECOMMENDED["lr"] > 0 and RECOMMENDED["steps"] > 0
    assert isinstance(DEMO_TASK_DESCRIPTION, str) and DEMO_TASK_DESCRIPTION.strip()
    assert "\n" not in DEMO_TASK_DESCRIPTION
