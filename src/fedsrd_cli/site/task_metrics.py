"""Task metrics: what a data record's `task` field asks for, and the pure math that scores it.

A record of the real-task suite (suites/real_suite.py) carries, beside its training fields, a `task`
object that says how to score the model on it (docs/real-tasks.md):

    {"kind": "mc", "choices": [str, ...], "gold": int}      multiple choice (MedQA, MMLU)
    {"kind": "gsm8k", "answer": str}                        a number (GSM8K)
    {"kind": "mbpp", "tests": [str, ...], "setup": str}     a Python function and its asserts (MBPP)

Scores:
    mc     accuracy: the choice with the highest log-likelihood given the prompt (the sum of its
           tokens' log-probabilities) is the model's answer. accuracy_norm divides each sum by
           the choice's length in characters first (reported beside, not instead).
    gsm8k  exact match of the final answer: the number after the last "####" of the greedy
           generation, else its last number, equal as a decimal to the gold number.
    mbpp   pass@1: the greedy generation's code, run with the record's setup and asserts in a
           sandbox (sandbox.py), passes every assert.

Nothing here imports torch or transformers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from fedsrd_cli.errors import DataError

TASK_KINDS = ("mc", "gsm8k", "mbpp")
# The metric each kind reports, under this name in eval's and simulate's results.
METRIC_OF_KIND = {"mc": "accuracy", "gsm8k": "exact_match", "mbpp": "pass_at_1"}

_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FENCE = re.compile(r"```(?:[A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


@dataclass(frozen=True)
class TaskSpec:
    """How one record is scored (one of TASK_KINDS); the fields of the other kinds stay empty."""

    kind: str
    choices: tuple[str, ...] = ()
    gold: int = -1
    answer: str = ""
    tests: tuple[str, ...] = ()
    setup: str = ""

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise DataError(f"task kind must be one of {', '.join(TASK_KINDS)}, got {self.kind!r}")
        if self.kind == "mc":
            if len(self.choices) < 2 or any(not c for c in self.choices):
                raise DataError("a multiple-choice task needs at least two non-empty 'choices'")
            if not 0 <= self.gold < len(self.choices):
                raise DataError(f"'gold' must index 'choices' (0..{len(self.choices) - 1}), got {self.gold}")
        if self.kind == "gsm8k" and parse_number(self.answer) is None:
            raise DataError(f"a gsm8k task's 'answer' must be a number, got {self.answer!r}")
        if self.kind == "mbpp" and not self.tests:
            raise DataError("an mbpp task needs at least one entry in 'tests'")

    @property
    def metric(self) -> str:
        return METRIC_OF_KIND[self.kind]

    def record(self) -> dict[str, Any]:
        """The JSON object of the record's `task` field."""
        if self.kind == "mc":
            return {"kind": "mc", "choices": list(self.choices), "gold": self.gold}
        if self.kind == "gsm8k":
            return {"kind": "gsm8k", "answer": self.answer}
        return {"kind": "mbpp", "tests": list(self.tests), "setup": self.setup}


def parse_task(value: Any, where: str) -> TaskSpec:
    """A record's `task` field as a TaskSpec; DataError names `where` (file:line) and the problem."""
    if not isinstance(value, dict):
        raise DataError(f"{where}: field 'task' must be an object, got {type(value).__name__}")
    kind = value.get("kind")

    def strings(key: str) -> tuple[str, ...]:
        items = value.get(key)
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise DataError(f"{where}: task field {key!r} must be a list of strings")
        return tuple(items)

    def string(key: str, default: str | None = None) -> str:
        item = value.get(key, default)
        if not isinstance(item, str):
            raise DataError(f"{where}: task field {key!r} must be a string")
        return item

    try:
        if kind == "mc":
            gold = value.get("gold")
            if not isinstance(gold, int) or isinstance(gold, bool):
                raise DataError(f"{where}: task field 'gold' must be an integer (the index of the answer)")
            return TaskSpec("mc", choices=strings("choices"), gold=gold)
        if kind == "gsm8k":
            return TaskSpec("gsm8k", answer=string("answer"))
        if kind == "mbpp":
            return TaskSpec("mbpp", tests=strings("tests"), setup=string("setup", ""))
        return TaskSpec(str(kind))  # raises: an unknown kind
    except DataError as err:
        message = str(err)
        raise DataError(message if message.startswith(where) else f"{where}: {message}") from None


# --------------------------------------------------------------------------- multiple choice


def mc_prediction(logliks: Sequence[float], choices: Sequence[str] | None = None) -> int:
    """The index of the most likely choice (the first of equal ones). With `choices`, each
    log-likelihood is divided by its choice's length in characters first (accuracy_norm)."""
    if not logliks:
        raise ValueError("no choices to score")
    scores = list(logliks)
    if choices is not None:
        scores = [score / max(1, len(choice)) for score, choice in zip(scores, choices, strict=True)]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def mc_accuracy(all_logliks: Sequence[Sequence[float]], tasks: Sequence[TaskSpec]) -> dict[str, float]:
    """{"accuracy", "accuracy_norm"} over multiple-choice tasks, from each task's per-choice
    log-likelihoods (in the order of its choices)."""
    if not tasks:
        raise ValueError("no multiple-choice tasks to score")
    hits = sum(mc_prediction(ll) == t.gold for ll, t in zip(all_logliks, tasks, strict=True))
    norm = sum(mc_prediction(ll, t.choices) == t.gold for ll, t in zip(all_logliks, tasks, strict=True))
    return {"accuracy": hits / len(tasks), "accuracy_norm": norm / len(tasks)}


# --------------------------------------------------------------------------- GSM8K


def parse_number(text: str) -> Decimal | None:
    """A number as GSM8K writes one ("1,234", "$18", "-3", "0.5", "18."), else None."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not cleaned:
        return None
    try:
        number = Decimal(cleaned)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def extract_final_answer(text: str) -> Decimal | None:
    """The final answer of a GSM8K solution: the first number after the last "####", else the
    last number anywhere in the text; None when there is none."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        found = _NUMBER.search(tail)
        if found is not None:
            return parse_number(found.group())
    numbers = _NUMBER.findall(text)
    for candidate in reversed(numbers):
        number = parse_number(candidate)
        if number is not None:
            return number
    return None


def gsm8k_correct(generation: str, answer: str) -> bool:
    """Whether a generation's final answer equals the gold number."""
    found, gold = extract_final_answer(generation), parse_number(answer)
    return found is not None and gold is not None and found == gold


def gsm8k_exact_match(generations: Sequence[str], tasks: Sequence[TaskSpec]) -> float:
    """The fraction of generations whose final answer is their task's gold number."""
    if not tasks:
        raise ValueError("no GSM8K tasks to score")
    hits = sum(gsm8k_correct(g, t.answer) for g, t in zip(generations, tasks, strict=True))
    return hits / len(tasks)


# --------------------------------------------------------------------------- MBPP


def extract_code(generation: str) -> str:
    """The Python code of a generation: the first fenced block (```python ... ```) when there is
    one, else the whole text; Windows line ends become "\\n"."""
    text = generation.replace("\r\n", "\n")
    fenced = _FENCE.search(text)
    return (fenced.group(1) if fenced else text).strip("\n") + "\n"


def mbpp_program(code: str, task: TaskSpec) -> str:
    """The program the sandbox runs for one MBPP task: setup, the generated code, the asserts."""
    parts = [task.setup.replace("\r\n", "\n"), code, *task.tests]
    return "\n".join(part for part in parts if part.strip()) + "\n"


def pass_at_1(passed: Sequence[bool]) -> float:
    """pass@1 of one greedy sample per problem: the fraction of problems whose sample passed."""
    if not passed:
        raise ValueError("no problems to score")
    return sum(bool(p) for p in passed) / len(passed)


def mean_of(values: Sequence[float]) -> float:
    """The plain mean (the per-organisation figures' "mean"); NaN for none."""
    return math.fsum(values) / len(values) if values else math.nan
