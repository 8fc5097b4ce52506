"""Task metrics' pure math: GSM8K answers (20 real solutions), multiple choice, pass@1, task records."""

from __future__ import annotations

import json
import math
import random
from decimal import Decimal
from pathlib import Path

import pytest

from fedsrd_cli.errors import DataError
from fedsrd_cli.site import task_metrics as tm
from fedsrd_cli.site.data import read_jsonl

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def gsm8k_records() -> list[dict]:
    lines = (FIXTURES / "gsm8k-test-20.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_gsm8k_answers_of_20_real_solutions() -> None:
    records = gsm8k_records()
    assert len(records) == 20
    for record in records:
        assert tm.extract_final_answer(record["answer"]) == tm.parse_number(record["short_answer"])
        assert tm.gsm8k_correct(record["answer"], record["short_answer"])
        # the solution without its "####" line: the last number of the working is the answer
        working = record["answer"].rsplit("####", 1)[0]
        assert tm.gsm8k_correct(
            working + " The answer is " + record["short_answer"] + ".", record["short_answer"]
        )
    # thousands separators (2,125, 1,450,000) are one number, not several
    assert tm.parse_number("1,450,000") == Decimal(1450000)
    # another problem's answer is wrong: a parser that returned a constant would fail here
    answers = [r["short_answer"] for r in records]
    wrong = sum(tm.gsm8k_correct(r["answer"], answers[(i + 1) % 20]) for i, r in enumerate(records))
    assert wrong <= 1  # only where two neighbours share an answer


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", Decimal(18)),
        ("#### 18\n\nQuestion: next one has 7 eggs", Decimal(18)),  # after the last ####
        ("3 + 4 = 7, so 7 * 2 = 14. The answer is 14.", Decimal(14)),  # last number
        ("It costs $1,234.50 in total.", Decimal("1234.50")),
        ("The temperature is -3 degrees.", Decimal(-3)),
        ("#### 5\nlater #### 6", Decimal(6)),
        ("no number here", None),
        ("####", None),
        ("", None),
    ],
)
def test_final_answer_extraction(generation: str, expected: Decimal | None) -> None:
    assert tm.extract_final_answer(generation) == expected


def test_gsm8k_compares_numbers_not_strings() -> None:
    assert tm.gsm8k_correct("#### 18.00", "18")
    assert tm.gsm8k_correct("#### 2125", "2,125")
    assert not tm.gsm8k_correct("#### 181", "18")
    assert not tm.gsm8k_correct("nothing", "18")
    assert tm.gsm8k_exact_match(["#### 1", "#### 3"], [tm.TaskSpec("gsm8k", answer="1")] * 2) == 0.5


def brute_force_prediction(logliks: list[float]) -> int:
    """The reference: compare every pair; the first of the best wins."""
    for i, value in enumerate(logliks):
        if all(value > other for other in logliks[:i]) and all(value >= other for other in logliks[i:]):
            return i
    raise AssertionError("unreachable")


def test_mc_prediction_matches_a_brute_force_reference() -> None:
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(2, 6)
        logliks = [rng.choice([-1.0, -2.0, -3.5, rng.uniform(-50, 0)]) for _ in range(n)]
        assert tm.mc_prediction(logliks) == brute_force_prediction(logliks)
        choices = ["x" * rng.randint(1, 9) for _ in range(n)]
        normed = [ll / len(c) for ll, c in zip(logliks, choices, strict=True)]
        assert tm.mc_prediction(logliks, choices) == brute_force_prediction(normed)


def test_mc_accuracy_and_its_length_normalisation() -> None:
    tasks = [
        tm.TaskSpec("mc", choices=("a", "bbbbbbbb"), gold=1),
        tm.TaskSpec("mc", choices=("x", "y"), gold=0),
    ]
    # the long right choice loses on its sum, wins per character
    scores = tm.mc_accuracy([[-2.0, -4.0], [-1.0, -3.0]], tasks)
    assert scores == {"accuracy": 0.5, "accuracy_norm": 1.0}


def test_pass_at_1_and_code_extraction() -> None:
    assert tm.pass_at_1([True, False, False, True]) == 0.5
    with pytest.raises(ValueError):
        tm.pass_at_1([])
    fenced = "Here it is:\n```python\ndef f(x):\n    return x\n```\nThat was it."
    assert tm.extract_code(fenced) == "def f(x):\n    return x\n"
    assert tm.extract_code("def f(x):\r\n    return x") == "def f(x):\n    return x\n"
    task = tm.TaskSpec("mbpp", tests=("assert f(1) == 1",), setup="import math")
    assert tm.mbpp_program("def f(x):\n    return x\n", task) == (
        "import math\ndef f(x):\n    return x\n\nassert f(1) == 1\n"
    )
    assert math.isnan(tm.mean_of([]))


def test_task_records_are_read_and_checked(tmp_path: Path) -> None:
    good = [
        {"instruction": "Q?", "output": "yes", "task": {"kind": "mc", "choices": ["yes", "no"], "gold": 0}},
        {"instruction": "2+2?", "output": "#### 4", "task": {"kind": "gsm8k", "answer": "4"}},
        {
            "instruction": "f",
            "output": "def f(): pass",
            "task": {"kind": "mbpp", "tests": ["assert f() is None"]},
        },
        {"instruction": "no task", "output": "ok"},
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good))
    examples = read_jsonl(path).examples
    assert [ex.task.kind if ex.task else None for ex in examples] == ["mc", "gsm8k", "mbpp", None]
    assert examples[0].task == tm.TaskSpec("mc", choices=("yes", "no"), gold=0)
    assert examples[2].task.setup == ""
    for task, message in [
        ({"kind": "mc", "choices": ["a", "b"], "gold": 2}, "'gold' must index"),
        ({"kind": "mc", "choices": ["a"], "gold": 0}, "at least two"),
        ({"kind": "mc", "choices": ["a", "b"], "gold": True}, "must be an integer"),
        ({"kind": "gsm8k", "answer": "many"}, "must be a number"),
        ({"kind": "mbpp", "tests": []}, "at least one"),
        ({"kind": "essay"}, "task kind must be one of"),
        (["mc"], "must be an object"),
    ]:
        path.write_text(json.dumps({"instruction": "q", "output": "a", "task": task}) + "\n")
        with pytest.raises(DataError, match=message) as err:
            read_jsonl(path)
        assert str(err.value).startswith(f"{path}:1: ")
    # the record object round-trips
    for spec in (examples[0].task, examples[1].task, examples[2].task):
        assert tm.parse_task(spec.record(), "x") == spec
