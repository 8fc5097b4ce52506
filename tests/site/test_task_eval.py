"""Task metrics on a tiny model: option log-likelihoods against a brute-force reference, and the
generation tasks' scoring from hand-made answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsrd_cli.errors import DataError
from fedsrd_cli.site import data as data_mod
from fedsrd_cli.site import task_eval
from fedsrd_cli.site import task_metrics as tm
from fedsrd_cli.site.evaluation import evaluate
from fedsrd_cli.site.model import load_base

from ..conftest import write_jsonl

MC_RECORDS = [
    {
        "instruction": f"What is {a} + {b}?\nA. {a + b}\nB. {a + b + 1}\nC. {a * b}",
        "output": str(a + b),
        "task": {"kind": "mc", "choices": [str(a + b), str(a + b + 1), f"{a * b} apples"], "gold": gold},
    }
    for a, b, gold in [(1, 2, 0), (3, 4, 1), (5, 6, 2), (7, 8, 0), (2, 9, 1)]
]


@pytest.fixture(scope="module")
def model(tiny_model: Path):
    torch.set_num_threads(1)
    return load_base(tiny_model, "cpu", "fp32")


def brute_force_logliks(model, example: data_mod.Example) -> list[float]:
    """Each choice alone: one unpadded forward pass over prompt + choice, log-softmax summed."""
    out = []
    prompt = data_mod.prompt_ids(model.tokenizer, example)
    for choice in example.task.choices:
        ids = model.tokenizer(choice, add_special_tokens=False)["input_ids"]
        full = torch.tensor([prompt + ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model.model(input_ids=full).logits[0].float(), dim=-1)
        out.append(sum(float(logprobs[len(prompt) + i - 1, token]) for i, token in enumerate(ids)))
    return out


def row_alone(model, ids: list[int], labels: list[int]) -> float:
    """One encoded row, unpadded, in one forward pass: its labelled tokens' log-probabilities summed."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logprobs[i - 1, t]) for i, t in enumerate(labels) if t != data_mod.IGNORE_INDEX)


@pytest.fixture(scope="module")
def gemma3_model(tiny_gemma3_gguf: Path):
    return load_base(tiny_gemma3_gguf, "cpu", "fp32")


@pytest.mark.parametrize("which", ["model", "gemma3_model"])  # Llama; Gemma-3's sliding-window cache
def test_option_logliks_match_a_brute_force_reference(which, request, tmp_path: Path, monkeypatch) -> None:
    model = request.getfixturevalue(which)
    shared = []
    real = task_eval._shared_prompt_logliks
    monkeypatch.setattr(task_eval, "_shared_prompt_logliks", lambda *a: shared.append(1) or real(*a))
    ds = data_mod.read_jsonl(write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS))
    reference = [brute_force_logliks(model, ex) for ex in ds.examples]
    found = task_eval.choice_logliks(model, ds.examples, 4, max_length=512)
    assert len(shared) == len(MC_RECORDS)  # every prompt ran once, its choices on its cache
    assert [len(row) for row in found] == [len(row) for row in reference]
    flat = [value for row in found for value in row]
    assert flat == pytest.approx([value for row in reference for value in row], abs=1e-4)
    tasks = [ex.task for ex in ds.examples]
    scored = task_eval.score_tasks(model, ds, batch_size=4, max_length=512)
    expected = tm.mc_accuracy(reference, tasks)
    assert scored == {
        "kind": "mc",
        "metric": "accuracy",
        "examples": 5,
        "score": expected["accuracy"],
        "accuracy_norm": expected["accuracy_norm"],
    }


def test_option_logliks_of_cut_prompts_match_each_row_alone(model, tmp_path: Path) -> None:
    # Long and short prompts: at this max_length the long ones lose different numbers of tokens
    # per choice (their choices differ in length), so they take the padded batches; the short
    # ones keep one prompt and share it. Both in one call, indices interleaved.
    records = [
        {**record, "instruction": record["instruction"] + (" Think it over carefully." * 6 if i % 2 else "")}
        for i, record in enumerate(MC_RECORDS)
    ]
    ds = data_mod.read_jsonl(write_jsonl(tmp_path / "mc-long.jsonl", records))
    tokenizer = model.tokenizer
    lengths = [len(data_mod.prompt_ids(tokenizer, ex)) for ex in ds.examples]
    max_length = (max(lengths[0::2]) + min(lengths[1::2])) // 2 + 2
    encoded = [
        [data_mod.encode_continuation(tokenizer, ex, c, max_length) for c in ex.task.choices]
        for ex in ds.examples
    ]
    cut = [len({tuple(ids[: lab.count(-100)]) for ids, lab in rows}) > 1 for rows in encoded]
    assert cut == [False, True, False, True, False]  # the shapes this test is about
    reference = [[row_alone(model, ids, labels) for ids, labels in rows] for rows in encoded]
    for batch_size in (1, 3):  # 3: choices of different examples and lengths share a padded batch
        found = task_eval.choice_logliks(model, ds.examples, batch_size, max_length)
        assert [len(row) for row in found] == [len(row) for row in reference]
        flat = [value for row in found for value in row]
        assert flat == pytest.approx([value for row in reference for value in row], abs=1e-4)


def test_gsm8k_scoring_from_hand_made_answers(model, tmp_path: Path, monkeypatch) -> None:
    records = [
        {"instruction": f"q{i}", "output": f"#### {answer}", "task": {"kind": "gsm8k", "answer": answer}}
        for i, answer in enumerate(["4", "6", "1,000", "7"])
    ]
    ds = data_mod.read_jsonl(write_jsonl(tmp_path / "gsm8k.jsonl", records))
    answers = [
        "2 + 2 = 4\n#### 4",
        "The answer is 5.",
        "It is 1000 in all. #### 1,000",
        "3 + 4 = 7\n#### 7\n\n### Instruction:\nAnother one #### 9",  # cut where the template repeats
    ]
    monkeypatch.setattr(task_eval, "generate_answers", lambda *args: answers)
    scored = task_eval.score_tasks(model, ds, batch_size=2, max_length=128)
    assert scored == {"kind": "gsm8k", "metric": "exact_match", "examples": 4, "score": 0.75}


def test_mbpp_scoring_runs_each_answer_in_the_sandbox(model, tmp_path: Path, monkeypatch) -> None:
    task = {"kind": "mbpp", "tests": ["assert double(2) == 4", "assert double(0) == 0"], "setup": ""}
    records = [
        {"instruction": f"p{i}", "output": "def double(x): return 2 * x", "task": task} for i in range(4)
    ]
    ds = data_mod.read_jsonl(write_jsonl(tmp_path / "mbpp.jsonl", records))
    answers = [
        "```python\ndef double(x):\n    return 2 * x\n```\nDone.",
        "def double(x):\n    return x + 2",
        "def double(x):\n    while True:\n        pass",
        "def double(x):\n    return x * 2\nassert double(1) == 3",  # its own wrong assert is cut off
    ]
    monkeypatch.setattr(task_eval, "generate_answers", lambda *args: answers)
    monkeypatch.setattr(task_eval, "SANDBOX_TIMEOUT_S", 2.0)
    scored = task_eval.score_tasks(model, ds, batch_size=2, max_length=128)
    assert scored["score"] == 0.5
    assert scored["outcomes"] == {"failed": 1, "passed": 2, "timeout": 1}


def test_evaluate_reports_task_scores_per_file_and_their_mean(model, tmp_path: Path) -> None:
    mc = write_jsonl(tmp_path / "law.jsonl", MC_RECORDS)
    gsm8k = write_jsonl(
        tmp_path / "math.jsonl",
        [{"instruction": "What is 1 + 2?", "output": "#### 3", "task": {"kind": "gsm8k", "answer": "3"}}],
    )
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    datasets = [data_mod.read_jsonl(p) for p in (mc, gsm8k, plain)]
    result = evaluate(model, datasets, batch_size=4, max_length=128, tasks=True, task_max_new_tokens=4)
    files = result["files"]
    assert files["law"]["task"]["metric"] == "accuracy"
    assert files["math"]["task"]["score"] in (0.0, 1.0)  # the real greedy path ran
    assert "task" not in files["plain"]
    assert result["mean"]["task_score"] == pytest.approx(
        (files["law"]["task"]["score"] + files["math"]["task"]["score"]) / 2
    )
    assert "task_score" not in evaluate(model, datasets[:1], 4, 128)["mean"]


def test_a_file_of_mixed_task_kinds_is_refused(model, tmp_path: Path) -> None:
    mixed = [
        MC_RECORDS[0],
        {"instruction": "q", "output": "#### 1", "task": {"kind": "gsm8k", "answer": "1"}},
    ]
    ds = data_mod.read_jsonl(write_jsonl(tmp_path / "mixed.jsonl", mixed))
    with pytest.raises(DataError, match="several kinds"):
        task_eval.score_tasks(model, ds, 2, 128)
