"""Scoring a loaded model on data files: loss, perplexity, exact match, answers, task metrics.

`evaluate(base, datasets)` scores whatever `base` holds (the base alone, a global state or an
adapter; model.py) on each data file: the loss and perplexity on response tokens
(model.token_losses), and on request the exact match of its greedy answers, the first few
answers themselves (generation.generate_answers) and the file's task metric
(task_eval.score_tasks); "mean" averages the per-file figures. `file_labels` names each file
in the report.

The dependencies go one way: evaluation imports task_eval and generation, task_eval imports
generation, and generation imports neither. transformers is not imported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedsrd_cli.errors import DataError, UsageError
from fedsrd_cli.site import data as data_mod
from fedsrd_cli.site.generation import generate_answers
from fedsrd_cli.site.model import BaseModel, token_losses
from fedsrd_cli.site.task_eval import score_tasks


@torch.no_grad()
def evaluate(
    base: BaseModel,
    datasets: Sequence[data_mod.Dataset],
    batch_size: int = 8,
    max_length: int = 512,
    generate: bool = False,
    max_new_tokens: int = 32,
    on_batch: Callable[[], None] | None = None,
    answers: int = 0,
    tasks: bool = False,
    task_max_new_tokens: int = 256,
) -> dict[str, Any]:
    """Loss and perplexity on response tokens, per file and their mean; exact match with generate.

    loss(file) = sum of token cross-entropies over response tokens / their count;
    perplexity = exp(loss); "mean" averages the per-file figures (one file per domain).
    exact_match: greedy generation from the prompt, compared with the reference after strip().
    answers: also the greedy answers to the first `answers` examples of each file, as
    {"prompt", "reference", "answer"} records under the file's "answers".
    tasks: also each file's task metric (task_eval.score_tasks) under its "task", and their
    mean over the files that have one as "mean"'s "task_score"; generation tasks get at most
    task_max_new_tokens tokens.
    """
    if answers < 0:
        raise UsageError("--answers must be >= 0")
    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    model, tokenizer = base.model, base.tokenizer
    model.eval()
    pad = data_mod.pad_id(tokenizer)
    files: dict[str, dict[str, Any]] = {}
    names = file_labels([ds.path for ds in datasets])
    for index, ds in enumerate(datasets):
        encoded = [data_mod.encode(tokenizer, ex, max_length) for ex in ds.examples]
        total_loss, total_tokens = 0.0, 0
        for start in range(0, len(encoded), batch_size):
            batch = data_mod.collate(encoded[start : start + batch_size], pad)
            batch = {k: v.to(base.device) for k, v in batch.items()}
            loss, count = token_losses(model, batch)
            total_loss += float(loss)
            total_tokens += count
            if on_batch is not None:
                on_batch()
        if total_tokens == 0:
            raise DataError(f"{ds.path}: no response token within --max-length to score")
        mean = total_loss / total_tokens
        metrics: dict[str, Any] = {
            "path": str(ds.path),
            "format": ds.format,
            "examples": len(ds.examples),
            "tokens": total_tokens,
            "loss": mean,
            "perplexity": math.exp(min(mean, 700.0)),
        }
        if generate and ds.format != "text":
            metrics["exact_match"] = _exact_match(base, ds, batch_size, max_length, max_new_tokens, pad)
        if answers:
            shown = ds.examples[:answers]
            texts = generate_answers(base, shown, batch_size, max_length, max_new_tokens, pad)
            metrics["answers"] = [
                {"prompt": ex.prompt, "reference": ex.response, "answer": text}
                for ex, text in zip(shown, texts, strict=True)
            ]
        if tasks:
            scored = score_tasks(base, ds, batch_size, max_length, task_max_new_tokens, on_batch)
            if scored is not None:
                metrics["task"] = scored
        files[names[index]] = metrics
    result: dict[str, Any] = {"files": files}
    result["mean"] = {
        key: sum(m[key] for m in files.values()) / len(files)
        for key in ("loss", "perplexity", "exact_match")
        if all(key in m for m in files.values())
    }
    task_scores = [m["task"]["score"] for m in files.values() if "task" in m]
    if task_scores:
        result["mean"]["task_score"] = sum(task_scores) / len(task_scores)
    return result


def file_labels(paths: Sequence[Path]) -> list[str]:
    """A short unique label per data file: its stem, or parent/stem when stems repeat
    (clients/code/eval.jsonl -> "code/eval"), else the whole path."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    labels = [f"{p.parent.name}/{p.stem}" for p in paths]
    if len(set(labels)) == len(labels):
        return labels
    return [str(p) for p in paths]


def _exact_match(
    base: BaseModel, ds: data_mod.Dataset, batch_size: int, max_length: int, max_new_tokens: int, pad: int
) -> float:
    answers = generate_answers(base, ds.examples, batch_size, max_length, max_new_tokens, pad)
    hits = sum(a.strip() == ex.response.strip() for a, ex in zip(answers, ds.examples, strict=True))
    return hits / len(ds.examples)
