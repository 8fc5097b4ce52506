"""The embedded default: synthetic domains and demo-assets (with a reduced pretraining recipe)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsrd_cli import demo
from fedsrd_cli.cli import app
from fedsrd_cli.data import read_jsonl

runner = CliRunner()


def test_domains_are_deterministic_and_distinct() -> None:
    for domain in demo.DOMAINS:
        first = demo.domain_records(domain, 20, seed=5)
        assert first == demo.domain_records(domain, 20, seed=5)
        assert first != demo.domain_records(domain, 20, seed=6)
    instructions = {d: {r["instruction"][:12] for r in demo.domain_records(d, 50, 1)} for d in demo.DOMAINS}
    for a in demo.DOMAINS:
        for b in demo.DOMAINS:
            if a != b:
                assert not instructions[a] & instructions[b]


def test_arithmetic_answers_are_right() -> None:
    for record in demo.domain_records("arithmetic", 50, seed=0):
        expression = record["instruction"].removeprefix("What is ").removesuffix("?")
        assert str(eval(expression)) == record["output"]  # noqa: S307 - our own generated text


def test_cache_root_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDSRD_CACHE", str(tmp_path / "a"))
    assert demo.cache_root() == tmp_path / "a"
    monkeypatch.delenv("FEDSRD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert demo.cache_root() == tmp_path / "x" / "fedsrd"


@pytest.mark.slow
def test_demo_assets_reduced_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDSRD_CACHE", str(tmp_path / "cache"))
    first = runner.invoke(
        app, ["demo-assets", "--out", str(tmp_path / "one"), "--pretrain-steps", "2", "--json"]
    )
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["base_was_cached"] is False
    assert report["recipe"]["pretrain_steps"] == 2
    second = runner.invoke(
        app, ["demo-assets", "--out", str(tmp_path / "two"), "--pretrain-steps", "2", "--json"]
    )
    assert json.loads(second.stdout)["base_was_cached"] is True
    for name in report["files"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    for domain in demo.DOMAINS:
        train = read_jsonl(tmp_path / "one" / "clients" / domain / "train.jsonl")
        held_out = read_jsonl(tmp_path / "one" / "clients" / domain / "eval.jsonl")
        assert train.format == "instruction"
        assert len(train.examples) == demo.DEFAULT_RECIPE["train_examples"]
        assert len(held_out.examples) == demo.DEFAULT_RECIPE["eval_examples"]
    base = tmp_path / "one" / "base"
    assert (base / "config.json").is_file() and (base / "tokenizer.json").is_file()
    refused = runner.invoke(app, ["demo-assets", "--out", str(tmp_path / "one"), "--pretrain-steps", "2"])
    assert refused.exit_code == 5
    from fedsrd_cli.training import load_base

    model = load_base(base, "cpu", "fp32")
    ids = model.tokenizer("What is 12 + 7?")["input_ids"]
    assert ids[0] == model.tokenizer.bos_token_id
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == "What is 12 + 7?"
