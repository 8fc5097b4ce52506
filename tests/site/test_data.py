"""JSON-lines parsing, format detection, error messages with line numbers, tokenization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsrd_cli.errors import DataError
from fedsrd_cli.site import data


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_detects_each_format(tmp_path: Path) -> None:
    inst = write_lines(
        tmp_path / "i.jsonl",
        [
            json.dumps({"instruction": "Add", "input": "1 2", "output": "3"}),
            "",
            json.dumps({"instruction": "x", "output": "y"}),
        ],
    )
    chat = write_lines(
        tmp_path / "c.jsonl",
        [
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
            )
        ],
    )
    text = write_lines(tmp_path / "t.jsonl", [json.dumps({"text": "plain words"})])
    ds = data.read_jsonl(inst)
    assert ds.format == "instruction" and len(ds.examples) == 2
    assert ds.examples[0].prompt == data.PROMPT_TEMPLATE_WITH_INPUT.format(instruction="Add", input="1 2")
    assert ds.examples[1].prompt == data.PROMPT_TEMPLATE.format(instruction="x")
    c = data.read_jsonl(chat)
    assert c.format == "chat" and c.examples[0].response == "yo"
    assert c.examples[0].prompt == "<|user|>\nhi\n<|assistant|>\n"
    assert data.read_jsonl(text).examples[0] == data.Example("", "plain words", "text")


@pytest.mark.parametrize(
    ("lines", "line_no", "words"),
    [
        (['{"text": "a"}', "{not json"], 2, "not valid JSON"),
        (['{"instruction": "a", "output": "b"}', '{"instruction": "a"}'], 2, "missing field 'output'"),
        (['{"text": "a"}', '{"instruction": "a", "output": "b"}'], 2, "instruction record in a text file"),
        (['{"text": "a"}', "[1, 2]"], 2, "expected a JSON object"),
        (['{"prompt": "a"}'], 1, "unknown record format"),
        (['{"text": "a"}', "", '{"text": 3}'], 3, "must be a string"),
        (['{"messages": [{"role": "user", "content": "q"}]}'], 1, "role 'assistant'"),
        (['{"messages": [{"role": "assistant"}]}'], 1, "missing field 'content'"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, lines: list[str], line_no: int, words: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        data.read_jsonl(path)
    assert f"{path}:{line_no}:" in str(err.value)
    assert words in str(err.value)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="empty data file"):
        data.read_jsonl(empty)
    with pytest.raises(DataError, match="no such data file"):
        data.read_jsonl(tmp_path / "absent.jsonl")


class CharTokenizer:
    """One id per character (+3), BOS 1 added with special tokens, EOS 2, pad 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [ord(ch) + 3 for ch in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_encode_masks_prompt_and_keeps_response() -> None:
    tok = CharTokenizer()
    example = data.Example("ab", "xyz", "instruction")
    ids, labels = data.encode(tok, example, max_length=64)
    assert ids == [1, ord("a") + 3, ord("b") + 3, ord("x") + 3, ord("y") + 3, ord("z") + 3, 2]
    assert labels == [-100, -100, -100, ord("x") + 3, ord("y") + 3, ord("z") + 3, 2]
    text_ids, text_labels = data.encode(tok, data.Example("", "hi", "text"), 64)
    assert text_ids == [1, ord("h") + 3, ord("i") + 3, 2] and text_labels == [-100, *text_ids[1:]]


def test_encode_truncates_prompt_from_the_left() -> None:
    tok = CharTokenizer()
    ids, labels = data.encode(tok, data.Example("abcdef", "xy", "instruction"), max_length=5)
    assert len(ids) == 5
    assert ids[-3:] == [ord("x") + 3, ord("y") + 3, 2]
    assert ids[:2] == [ord("e") + 3, ord("f") + 3]
    assert labels[:2] == [-100, -100]


def test_collate_pads_right_and_left() -> None:
    batch = data.collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = data.collate([([5, 6], [5, 6]), ([8], [8])], pad=0, left=True)
    assert left["input_ids"].tolist() == [[5, 6], [0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1], [0, 1]]


class TemplateTokenizer(CharTokenizer):
    """A CharTokenizer with a chat template: '[role]content' per message, '[assistant]' to answer."""

    chat_template = "stub"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False) -> str:
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        return text + ("[assistant]" if add_generation_prompt else "")


def test_chat_uses_the_tokenizer_template_when_it_has_one(tmp_path: Path) -> None:
    record = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]
    }
    example = data.read_jsonl(write_lines(tmp_path / "c.jsonl", [json.dumps(record)])).examples[0]
    ids, labels = data.encode(TemplateTokenizer(), example, 64)
    prompt = "[system]s[user]q[assistant]"
    assert ids == [ord(ch) + 3 for ch in prompt] + [ord("a") + 3, 2]
    assert labels == [-100] * len(prompt) + [ord("a") + 3, 2]
    plain_ids, _ = data.encode(CharTokenizer(), example, 64)
    assert plain_ids[0] == 1 and plain_ids[1:-2] == [
        ord(ch) + 3 for ch in "<|system|>\ns\n<|user|>\nq\n<|assistant|>\n"
    ]
