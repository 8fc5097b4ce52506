"""eval and export on a tiny real model (2-layer Llama, hidden 32): the loss against a forward
pass by hand, several files, an exported adapter scored like its state, the files' labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsrd_cli.files.artifacts import read_artifact
from fedsrd_cli.site.data import load_datasets
from fedsrd_cli.site.evaluation import evaluate
from fedsrd_cli.site.model import load_base, set_global

from ..conftest import TINY_RECORDS, write_jsonl
from .conftest import run_cli


def test_eval_loss_matches_hand_computed_forward(run_dir: Path, tiny_model: Path, tiny_data: Path) -> None:
    from fedsrd_cli.site import data

    local = read_artifact(run_dir / "local.safetensors", kind="state")
    base = load_base(tiny_model, "cpu", "fp32")
    set_global(base, local)
    datasets = load_datasets([tiny_data])
    metrics = evaluate(base, datasets, batch_size=4)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in datasets[0].examples:
            ids, labels = data.encode(base.tokenizer, example, 512)
            logits = base.model(input_ids=torch.tensor([ids])).logits[0]
            logp = torch.log_softmax(logits.double(), dim=-1)
            for pos in range(1, len(ids)):
                if labels[pos] != -100:
                    total -= float(logp[pos - 1, labels[pos]])
                    count += 1
    file_metrics = metrics["files"]["train"]
    assert file_metrics["tokens"] == count
    assert file_metrics["loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["mean"]["loss"] == pytest.approx(total / count, rel=1e-5)


def test_eval_cli_base_only_and_several_files(run_dir: Path, tiny_model: Path, tiny_data: Path) -> None:
    second = write_jsonl(run_dir / "second.jsonl", TINY_RECORDS[:3])
    report = run_cli(
        "eval",
        "--base",
        tiny_model,
        "--data",
        tiny_data,
        "--data",
        second,
        "--generate",
        "--max-new-tokens",
        "3",
        "--out",
        run_dir / "metrics.json",
        "--json",
    )
    assert report["base_only"] is True
    assert set(report["files"]) == {"train", "second"}
    losses = [m["loss"] for m in report["files"].values()]
    assert report["mean"]["loss"] == pytest.approx(sum(losses) / 2)
    assert 0.0 <= report["mean"]["exact_match"] <= 1.0
    assert json.loads((run_dir / "metrics.json").read_text())["mean"] == report["mean"]


def test_export_round_trips_through_peft(run_dir: Path, tiny_model: Path, tiny_data: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = run_dir / "adapter"
    run_cli(
        "export", "--global", run_dir / "local.safetensors", "--out", adapter, "--base", tiny_model, "--json"
    )
    run_cli("export", "--global", run_dir / "local.safetensors", "--out", adapter, code=5)
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
    peft_model = PeftModel.from_pretrained(plain, str(adapter))
    ours = load_base(tiny_model, "cpu", "fp32")
    set_global(ours, read_artifact(run_dir / "local.safetensors", kind="state"))
    with torch.no_grad():
        expected = ours.model(input_ids=ids).logits
        found = peft_model(input_ids=ids).logits
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-6)
    by_adapter = run_cli("eval", "--base", tiny_model, "--adapter", adapter, "--data", tiny_data, "--json")
    by_global = run_cli(
        "eval", "--base", tiny_model, "--global", run_dir / "local.safetensors", "--data", tiny_data, "--json"
    )
    assert by_adapter["mean"]["loss"] == pytest.approx(by_global["mean"]["loss"], rel=1e-6)
    base_only = run_cli("eval", "--base", tiny_model, "--data", tiny_data, "--json")
    assert base_only["mean"]["loss"] != pytest.approx(by_global["mean"]["loss"], rel=1e-6)


def test_file_labels_stay_unique() -> None:
    from fedsrd_cli.site.evaluation import file_labels

    assert file_labels([Path("x/a.jsonl"), Path("x/b.jsonl")]) == ["a", "b"]
    assert file_labels([Path("c/code/eval.jsonl"), Path("c/math/eval.jsonl")]) == ["code/eval", "math/eval"]
    assert file_labels([Path("1/d/e.jsonl"), Path("2/d/e.jsonl")]) == ["1/d/e.jsonl", "2/d/e.jsonl"]
