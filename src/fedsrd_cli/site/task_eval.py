"""Task metrics on a loaded model: option log-likelihoods, greedy answers, sandboxed tests.

`score_tasks(base, dataset)` scores the records of one data file that carry a `task`
(task_metrics.py says what each kind means):
    mc     every choice's log-likelihood after the record's prompt (the prompt's pass shared);
    gsm8k  a greedy answer of at most max_new_tokens tokens, its final number;
    mbpp   a greedy answer, its code run against the record's asserts in sandbox.run_program.
The model is whatever `base` holds (the base alone, a global state, an adapter);
transformers is never imported here (model.py loads the model; generation.py generates).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from fedsrd_cli.errors import DataError, UsageError
from fedsrd_cli.site import data as data_mod
from fedsrd_cli.site import task_metrics as tm
from fedsrd_cli.site.generation import generate_answers

DEFAULT_MAX_NEW_TOKENS = 256  # GSM8K's worked solutions and MBPP's functions fit in it
SANDBOX_TIMEOUT_S = 10.0  # wall-clock seconds per MBPP program (its asserts take milliseconds)
# A generation ends where the prompt template's next block would begin (a model that has not
# learnt to stop goes on with another "### Instruction:").
STOP_MARKERS = ("\n### ", "### Instruction:", "### Response:")
# MBPP: the code ends where the model starts its own tests or prints (the usual MBPP stops).
CODE_STOP_MARKERS = ("\nassert ", "\nprint(", '\nif __name__ == "__main__"', "\nif __name__ == '__main__'")


def cut_at(text: str, markers: Sequence[str]) -> str:
    """`text` up to the first of `markers` (all of it when none occurs)."""
    end = len(text)
    for marker in markers:
        found = text.find(marker)
        if found != -1:
            end = min(end, found)
    return text[:end]


@torch.no_grad()
def choice_logliks(
    base: Any,
    examples: Sequence[data_mod.Example],
    batch_size: int,
    max_length: int,
    on_batch: Callable[[], None] | None = None,
    share_prompt: bool = True,
) -> list[list[float]]:
    """Per example, per choice: the sum of the choice's token log-probabilities after the prompt
    (data.encode_continuation: the prompt is cut from the left to fit max_length),

        loglik(c) = sum_k log p(c_k | prompt, c_<k).

    An example whose choices all follow the same prompt tokens (no choice made the cut differ)
    runs its prompt once and its choices on a copy of the prompt's key/value cache
    (`_shared_prompt_logliks`); the prompt is most of an MC record (hundreds of tokens against a
    few per option), so this costs about one forward pass per example instead of one per choice.
    The others (all, with share_prompt=False) run every prompt + choice row in padded batches of
    `batch_size`."""
    tokenizer, model = base.tokenizer, base.model
    pad = data_mod.pad_id(tokenizer)
    out: list[list[float]] = [[] for _ in examples]
    rows: list[tuple[int, int, tuple[list[int], list[int]]]] = []  # (example, choice, encoded)
    for index, example in enumerate(examples):
        assert example.task is not None and example.task.kind == "mc"
        encoded = [
            data_mod.encode_continuation(tokenizer, example, choice, max_length)
            for choice in example.task.choices
        ]
        heads = {tuple(ids[: labels.count(data_mod.IGNORE_INDEX)]) for ids, labels in encoded}
        bodies = [ids[labels.count(data_mod.IGNORE_INDEX) :] for ids, labels in encoded]
        if share_prompt and len(heads) == 1 and next(iter(heads)) and all(bodies):
            out[index] = _shared_prompt_logliks(base, list(next(iter(heads))), bodies, pad)
            if on_batch is not None:
                on_batch()
        else:
            out[index] = [0.0] * len(encoded)
            rows.extend((index, choice, pair) for choice, pair in enumerate(encoded))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = data_mod.collate([pair for _, _, pair in chunk], pad)
        batch = {k: v.to(base.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logprobs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)  # (rows, T-1, V)
        labels = batch["labels"][:, 1:]
        mask = labels != data_mod.IGNORE_INDEX
        picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        for (index, choice, _), value in zip(chunk, (picked * mask).sum(dim=1), strict=True):
            out[index][choice] = float(value)
        if on_batch is not None:
            on_batch()
    return out


def _shared_prompt_logliks(base: Any, head: list[int], bodies: list[list[int]], pad: int) -> list[float]:
    """The log-likelihood of each body (n choices, len >= 1) after the one prompt `head` (P
    tokens): the prompt's forward pass once, its cache repeated n times, the bodies right-padded
    after it. The prompt's last logits predict every body's first token."""
    model, device = base.model, base.device
    prompt = model(input_ids=torch.tensor([head], device=device), use_cache=True)
    first = torch.log_softmax(prompt.logits[0, -1].float(), dim=-1)  # (V,)
    # transformers 5.24 names the cache `cache` (in and out); earlier 5.x `past_key_values`.
    cache_name = "cache" if "cache" in prompt else "past_key_values"
    cache = prompt[cache_name]
    n, width = len(bodies), max(len(body) for body in bodies)
    cache.batch_repeat_interleave(n)
    ids = torch.full((n, width), pad, dtype=torch.long)  # (n, W), right-padded
    mask = torch.zeros((n, len(head) + width), dtype=torch.long)  # (n, P + W)
    mask[:, : len(head)] = 1
    for row, body in enumerate(bodies):
        ids[row, : len(body)] = torch.tensor(body)
        mask[row, len(head) : len(head) + len(body)] = 1
    logits = model(
        input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, **{cache_name: cache}
    ).logits  # (n, W, V): position k predicts body token k + 1
    logprobs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)  # (n, W-1, V)
    sums = []
    for row, body in enumerate(bodies):
        rest = torch.tensor(body[1:], device=logprobs.device)
        picked = logprobs[row, : len(body) - 1].gather(-1, rest.unsqueeze(-1)).sum()
        sums.append(float(first[body[0]] + picked))
    return sums


def file_kind(ds: data_mod.Dataset) -> str | None:
    """The one task kind of a file's records that carry a task; None when none does."""
    kinds = sorted({ex.task.kind for ex in ds.examples if ex.task is not None})
    if len(kinds) > 1:
        raise DataError(f"{ds.path}: holds tasks of several kinds ({', '.join(kinds)}); keep one per file")
    return kinds[0] if kinds else None


def score_tasks(
    base: Any,
    ds: data_mod.Dataset,
    batch_size: int,
    max_length: int,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, Any] | None:
    """The task metric of one file (None when no record has a task):
    {"kind", "metric", "score", "examples"} and, per kind, accuracy_norm (mc) or the sandbox's
    outcomes (mbpp: {"passed": n, "failed": n, "timeout": n, ...})."""
    if max_new_tokens < 1:
        raise UsageError("--metrics-max-new-tokens must be >= 1")
    kind = file_kind(ds)
    if kind is None:
        return None
    examples = [ex for ex in ds.examples if ex.task is not None]
    tasks = [ex.task for ex in examples]
    assert all(t is not None for t in tasks)
    result: dict[str, Any] = {"kind": kind, "metric": tm.METRIC_OF_KIND[kind], "examples": len(examples)}
    if kind == "mc":
        scores = tm.mc_accuracy(choice_logliks(base, examples, batch_size, max_length, on_batch), tasks)
        result["score"] = scores["accuracy"]
        result["accuracy_norm"] = scores["accuracy_norm"]
        return result
    pad = data_mod.pad_id(base.tokenizer)
    answers = [
        cut_at(text, STOP_MARKERS)
        for text in generate_answers(base, examples, batch_size, max_length, max_new_tokens, pad)
    ]
    if kind == "gsm8k":
        result["score"] = tm.gsm8k_exact_match(answers, tasks)
        return result
    from fedsrd_cli.site.sandbox import run_program

    outcomes = []
    for answer, task in zip(answers, tasks, strict=True):
        code = cut_at(tm.extract_code(answer), CODE_STOP_MARKERS)
        outcomes.append(run_program(tm.mbpp_program(code, task), timeout_s=SANDBOX_TIMEOUT_S))
    result["score"] = tm.pass_at_1([o.passed for o in outcomes])
    result["outcomes"] = dict(sorted(Counter(o.status for o in outcomes).items()))
    return result


def sandbox_note(datasets: Sequence[data_mod.Dataset]) -> str | None:
    """The sandbox's one line on the confinement layers it has on this machine
    (sandbox.sandbox_statement) when a file holds MBPP tasks, whose answers it will run; else None."""
    if not any(file_kind(ds) == "mbpp" for ds in datasets):
        return None
    from fedsrd_cli.site.sandbox import sandbox_statement

    return sandbox_statement()


@contextlib.contextmanager
def base_only(base: Any) -> Iterator[None]:
    """The loaded base model without its LoRA (PEFT's disable_adapter) inside the block: the
    round-0 model, whose B factors are zero. A model without an adapter is left as it is."""
    disable = getattr(base.model, "disable_adapter", None)
    if disable is None:
        yield
        return
    with disable():
        yield


def base_task_scores(
    base: Any,
    datasets: Sequence[data_mod.Dataset],
    names: Sequence[str],
    batch_size: int,
    max_length: int,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """The base model's task scores (its LoRA disabled) beside a state's: {"files": {name:
    score}, "mean": score} over the files with task records."""
    files: dict[str, float] = {}
    with base_only(base):
        for name, ds in zip(names, datasets, strict=True):
            scored = score_tasks(base, ds, batch_size, max_length, max_new_tokens)
            if scored is not None:
                files[name] = scored["score"]
    return {"files": files, "mean": tm.mean_of(list(files.values()))}
