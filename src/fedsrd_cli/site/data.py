"""Training and evaluation data: JSON-lines files, tokenization, batches.

Each file holds one of three formats, detected from the first record and then
required of every line (a mixed file is an error, not a skip):

    instruction  {"instruction": str, "input": str (optional), "output": str}
    chat         {"messages": [{"role": str, "content": str}, ...]}  (last message: assistant)
    text         {"text": str}

Instruction records become a prompt (PROMPT_TEMPLATE below) and a response
(`output`); chat records become a prompt (every message but the last, through
the tokenizer's chat template when it has one, else CHAT_TEMPLATE below) and a
response (the last, assistant message). The loss covers the response tokens and
the end-of-sequence token only (labels are -100 elsewhere). Text records are
trained on every token.

Any record may also carry a `task` object: how to score the model on it beyond the loss
(multiple choice, a GSM8K answer, MBPP tests; task_metrics.py). It is kept on the Example and
does not change what is trained.

Nothing here imports transformers: a tokenizer is any object with `__call__`
(returning "input_ids"), `eos_token_id`, `pad_token_id`, and optionally
`chat_template` / `apply_chat_template`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fedsrd_cli.errors import DataError, UsageError, a_or_an
from fedsrd_cli.site.task_metrics import TaskSpec, parse_task

FORMATS = ("instruction", "chat", "text")
IGNORE_INDEX = -100

# The prompt of an instruction record; the "### Input" block only when `input` is non-empty.
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
# Chat without a tokenizer chat template: one block per message, then the assistant's header.
CHAT_TEMPLATE_TURN = "<|{role}|>\n{content}\n"
CHAT_TEMPLATE_REPLY = "<|assistant|>\n"


@dataclass(frozen=True)
class Example:
    """One record: `prompt` (no loss) + `response` (loss); text records have an empty prompt.

    `messages` keeps the prompt turns of a chat record so the tokenizer's own template
    can render them. `task` says how to score the model on the record (task_metrics.py);
    None for a record without one.
    """

    prompt: str
    response: str
    format: str
    messages: tuple[tuple[str, str], ...] = ()
    task: TaskSpec | None = None


@dataclass(frozen=True)
class Dataset:
    """The examples of one JSON-lines file."""

    path: Path
    format: str
    examples: tuple[Example, ...]

    @property
    def name(self) -> str:
        return self.path.stem


def _detect(record: dict) -> str | None:
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "instruction"
    if "text" in record:
        return "text"
    return None


def _string_field(record: dict, key: str, where: str, required: bool = True) -> str:
    if key not in record:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _parse_record(record: dict, fmt: str, where: str) -> Example:
    example = _parse_fields(record, fmt, where)
    if "task" not in record:
        return example
    return replace(example, task=parse_task(record["task"], where))


def _parse_fields(record: dict, fmt: str, where: str) -> Example:
    if fmt == "instruction":
        instruction = _string_field(record, "instruction", where)
        extra = _string_field(record, "input", where, required=False)
        output = _string_field(record, "output", where)
        if not output:
            raise DataError(f"{where}: empty 'output' (nothing to learn or score)")
        template = PROMPT_TEMPLATE_WITH_INPUT if extra else PROMPT_TEMPLATE
        return Example(template.format(instruction=instruction, input=extra), output, fmt)
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or len(messages) < 1:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        turns = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise DataError(f"{where}: message {i} is not an object")
            role = _string_field(message, "role", f"{where}: message {i}")
            content = _string_field(message, "content", f"{where}: message {i}")
            turns.append((role, content))
        if turns[-1][0] != "assistant":
            raise DataError(f"{where}: the last message must have role 'assistant' (it is the response)")
        if not turns[-1][1]:
            raise DataError(f"{where}: empty assistant response")
        prompt = "".join(CHAT_TEMPLATE_TURN.format(role=r, content=c) for r, c in turns[:-1])
        return Example(prompt + CHAT_TEMPLATE_REPLY, turns[-1][1], fmt, tuple(turns[:-1]))
    text = _string_field(record, "text", where)
    if not text:
        raise DataError(f"{where}: empty 'text'")
    return Example("", text, fmt)


def _text_lines(path: Path) -> list[str]:
    """The file's lines as UTF-8 text; a byte-order mark (Excel, Notepad) is read and dropped.
    DataError names the line of the first byte that is not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: unreadable ({err.strerror or err})") from None
    try:
        return raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the file as UTF-8"
        ) from None


def read_jsonl(path: str | Path) -> Dataset:
    """Parse one JSON-lines file; DataError names the file and line of the first problem.

    Blank lines and a UTF-8 byte-order mark are allowed; an empty file, bytes that are not
    UTF-8, a line that is not a JSON object, a missing field or a line in another format than
    the first record's is an error.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give JSON-lines files (repeat --data for each file)")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    examples: list[Example] = []
    fmt: str | None = None
    for number, line in enumerate(_text_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DataError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        found = _detect(record)
        if found is None:
            raise DataError(
                f"{where}: unknown record format (expected 'instruction'+'output', 'messages' or 'text')"
            )
        if fmt is None:
            fmt = found
        elif found != fmt:
            raise DataError(f"{where}: {a_or_an(found)} record in {a_or_an(fmt)} file (one format per file)")
        examples.append(_parse_record(record, fmt, where))
    if not examples:
        raise DataError(f"{path}: no records (empty data file)")
    return Dataset(path, fmt or "text", tuple(examples))


def load_datasets(paths: Sequence[str | Path]) -> list[Dataset]:
    """Every --data file, read with read_jsonl; UsageError when none is given."""
    if not paths:
        raise UsageError("give at least one --data file")
    return [read_jsonl(p) for p in paths]


# --------------------------------------------------------------------------- tokenization


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_ids(tokenizer: Any, example: Example) -> list[int]:
    """Token ids of the prompt, with the tokenizer's leading special tokens (e.g. BOS)."""
    if example.format == "chat" and getattr(tokenizer, "chat_template", None):
        messages = [{"role": r, "content": c} for r, c in example.messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return _ids(tokenizer, text, special=False)
    if example.format == "text":
        bos = _bos(tokenizer)
        return [int(bos)] if bos is not None else []
    return _ids(tokenizer, example.prompt, special=True)


def _bos(tokenizer: Any) -> int | None:
    return getattr(tokenizer, "bos_token_id", None)


def encode(tokenizer: Any, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example, at most max_length tokens.

    input = prompt + response + EOS; labels = -100 over the prompt, the ids elsewhere.
    Too long: the prompt loses tokens from its left end first (the response and the
    tokens just before it matter most), then the response is cut at max_length.
    """
    head = prompt_ids(tokenizer, example)
    body = _ids(tokenizer, example.response, special=False)
    if tokenizer.eos_token_id is not None:
        body.append(int(tokenizer.eos_token_id))
    room = max(0, max_length - len(body))
    if len(head) > room:
        head = head[len(head) - room :] if room else []
    body = body[: max_length - len(head)]
    return head + body, [IGNORE_INDEX] * len(head) + body


def encode_continuation(
    tokenizer: Any, example: Example, continuation: str, max_length: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the example's prompt followed by `continuation` (no EOS), at most
    max_length tokens, truncated as `encode` truncates: labels cover the continuation only, so
    the sum of their log-probabilities is the continuation's log-likelihood given the prompt."""
    head = prompt_ids(tokenizer, example)
    body = _ids(tokenizer, continuation, special=False)
    room = max(0, max_length - len(body))
    if len(head) > room:
        head = head[len(head) - room :] if room else []
    body = body[: max_length - len(head)]
    return head + body, [IGNORE_INDEX] * len(head) + body


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def collate(
    encoded: list[tuple[list[int], list[int]]], pad: int, left: bool = False
) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence: input_ids, attention_mask and labels (-100 on padding)."""
    width = max(len(ids) for ids, _ in encoded)
    ids_rows, mask_rows, label_rows = [], [], []
    for ids, labels in encoded:
        fill = width - len(ids)
        if left:
            ids_rows.append([pad] * fill + ids)
            mask_rows.append([0] * fill + [1] * len(ids))
            label_rows.append([IGNORE_INDEX] * fill + labels)
        else:
            ids_rows.append(ids + [pad] * fill)
            mask_rows.append([1] * len(ids) + [0] * fill)
            label_rows.append(labels + [IGNORE_INDEX] * fill)
    return {
        "input_ids": torch.tensor(ids_rows, dtype=torch.long),
        "attention_mask": torch.tensor(mask_rows, dtype=torch.long),
        "labels": torch.tensor(label_rows, dtype=torch.long),
    }
