"""Loading a base model: a GGUF file as --base (a tiny Llama and a Gemma-3), a bad --base in one
line, and the server commands that never import transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedsrd_cli.cli import app
from fedsrd_cli.files.artifacts import read_artifact
from fedsrd_cli.files.model_spec import file_sha256
from fedsrd_cli.site.model import load_base

from ..conftest import TINY_RECORDS, write_jsonl
from .conftest import run_cli, runner


def test_server_commands_do_not_import_transformers() -> None:
    code = (
        "import fedsrd_cli.cli, sys; "
        "assert not any(m.startswith(('transformers', 'peft')) for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- a GGUF file as --base


def test_gguf_base_loads_as_its_source_model(tiny_model: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    """The tiny GGUF (q/k rows in llama.cpp's order) loads to exactly the weights it was written from."""
    import hashlib

    source = load_base(tiny_model, "cpu", "fp32")
    loaded = load_base(tiny_gguf, "cpu", "fp32")
    assert loaded.fingerprint == "sha256:" + hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert loaded.fingerprint != source.fingerprint
    expected, found = source.model.state_dict(), loaded.model.state_dict()
    assert set(found) == set(expected)
    assert all(torch.equal(found[name], expected[name]) for name in expected)
    text = "What is 12 + 7?"
    assert loaded.tokenizer(text)["input_ids"] == source.tokenizer(text)["input_ids"]
    ids = torch.tensor([source.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, source.model(input_ids=ids).logits)
    # a plain model: no GGUF quantizer left, so it saves (and casts) like any other
    assert getattr(loaded.model, "hf_quantizer", None) is None
    assert "quantization_config" not in loaded.model.config.to_dict()
    loaded.model.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "model.safetensors").is_file()


@pytest.mark.slow
def test_cli_round_on_a_gguf_base(tiny_model: Path, tiny_gguf: Path, tiny_data: Path, tmp_path: Path) -> None:
    """init, train-local, eval and export take a .gguf --base; the directory it came from is another base."""
    g_dir, g_gguf = tmp_path / "g-dir.safetensors", tmp_path / "g-gguf.safetensors"
    run_cli("init", "--base", tiny_model, "--out", g_dir, "--rank", "4")
    report = run_cli("init", "--base", tiny_gguf, "--out", g_gguf, "--rank", "4", "--json")
    from_dir, from_gguf = read_artifact(g_dir, kind="state"), read_artifact(g_gguf, kind="state")
    assert from_gguf.shapes == from_dir.shapes and from_gguf.header.lora == from_dir.header.lora
    assert report["modules"] == len({name.rsplit(".lora_", 1)[0] for name in from_dir.names})
    assert from_gguf.header.base_fingerprint == "sha256:" + file_sha256(tiny_gguf)
    local = tmp_path / "local.safetensors"
    train = ("train-local", "--global", g_gguf, "--data", tiny_data, "--steps", "3", "--batch-size", "6")
    run_cli(*train, "--base", tiny_gguf, "--out", local, "--seed", "1", "--json")
    assert read_artifact(local, kind="state").header.base_fingerprint == from_gguf.header.base_fingerprint
    metrics = run_cli("eval", "--base", tiny_gguf, "--global", local, "--data", tiny_data, "--json")
    assert metrics["base"] == str(tiny_gguf) and metrics["mean"]["loss"] > 0
    adapter = tmp_path / "adapter"
    run_cli("export", "--global", local, "--base", tiny_gguf, "--out", adapter, "--json")
    config = json.loads((adapter / "adapter_config.json").read_text())
    # a GGUF file cannot be a PEFT base path (docs/deployment.md shows how to load one)
    assert config["base_model_name_or_path"] is None
    # a state made for the GGUF is refused by the directory it was converted from, and the other way round
    for args in (
        (*train, "--base", tiny_model, "--out", tmp_path / "x.safetensors"),
        ("eval", "--base", tiny_model, "--global", local, "--data", tiny_data),
        ("export", "--global", local, "--base", tiny_model, "--out", tmp_path / "adapter-x"),
        ("eval", "--base", tiny_gguf, "--global", g_dir, "--data", tiny_data),
    ):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 4, result.output
        assert "another base model" in result.output
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "adapter-x").exists()


# --------------------------------------------------------------------------- a Gemma-3 GGUF file as --base


def test_gemma3_gguf_base_loads_as_its_dequantized_weights(
    tiny_gemma3: tuple[Path, Path], tmp_path: Path
) -> None:
    """A Gemma-3 GGUF in Gemma-3-270M's Q4_K_M types (Q8_0, Q5_0, Q4_K, Q6_K) loads to exactly
    gguf-py's dequantization of its tensors: norms back from llama.cpp's 1 + w, lm_head tied to the
    embedding, five sliding-window layers and one full, a tokenizer that adds <bos>."""
    gguf_file, reference = tiny_gemma3
    loaded = load_base(gguf_file, "cpu", "fp32")
    source = load_base(reference, "cpu", "fp32")
    model = loaded.model
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert model.config.sliding_window == 8
    expected, found = source.model.state_dict(), model.state_dict()
    assert set(found) == set(expected)
    assert all(torch.equal(found[name], expected[name]) for name in expected)
    # tied, as in the file (which has no output.weight), after _plain_model's rebuild too
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    text = "### Instruction:\nWhat is 12 + 7?\n\n### Response:\n"
    ids = loaded.tokenizer(text)["input_ids"]
    pieces = loaded.tokenizer.convert_ids_to_tokens(ids)
    assert pieces[:3] == ["<bos>", "###", "\u2581Instruction"] and "\u2581Response" in pieces
    assert (loaded.tokenizer.eos_token_id, loaded.tokenizer.pad_token_id) == (1, 0)
    assert len(ids) > model.config.sliding_window  # so that the sliding layers mask something
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=torch.tensor([ids])).logits,
                                   source.model(input_ids=torch.tensor([ids])).logits)  # fmt: skip
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "model.safetensors").is_file()


@pytest.mark.slow
def test_cli_round_on_a_gemma3_gguf_base(tiny_gemma3_gguf: Path, tmp_path: Path) -> None:
    """A whole round on the Gemma-3 GGUF: init (all-linear: the 7 projections of its 6 layers),
    train-local of two clients, sparsify, aggregate, broadcast, apply, eval and export; the exported
    adapter loads onto the GGUF as docs/deployment.md shows, giving fedsrd's own logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedsrd_cli.site.model import load_adapter

    base = tiny_gemma3_gguf
    data = [write_jsonl(tmp_path / f"c{i}.jsonl", TINY_RECORDS[i * 3 : i * 3 + 3]) for i in range(2)]
    g0, g1 = tmp_path / "g0.safetensors", tmp_path / "g1.safetensors"
    report = run_cli("init", "--base", base, "--out", g0, "--rank", "4", "--json")
    assert report["modules"] == 6 * 7
    assert read_artifact(g0, kind="state").header.lora.target_modules == (
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj",
    )  # fmt: skip
    uploads = []
    for i, file in enumerate(data):
        local, upload = tmp_path / f"local{i}.safetensors", tmp_path / f"upload{i}.safetensors"
        run_cli("train-local", "--base", base, "--global", g0, "--data", file, "--out", local,
                "--steps", "2", "--batch-size", "2", "--max-length", "64", "--client", f"c{i}")  # fmt: skip
        run_cli("sparsify", "--global", g0, "--local", local, "--client", f"c{i}", "--out", upload)
        uploads.append(upload)
    aggregate = tmp_path / "aggregate.safetensors"
    run_cli("aggregate", "--global", g0, "--out", aggregate, *uploads)
    broadcast = tmp_path / "broadcast.safetensors"
    run_cli("broadcast", "--global", g0, "--aggregate", aggregate, "--out", broadcast, "--out-global", g1)
    client_g1 = tmp_path / "client-g1.safetensors"
    run_cli("apply", "--global", g0, "--broadcast", broadcast, "--out", client_g1)
    assert client_g1.read_bytes() == g1.read_bytes()
    metrics = run_cli(
        "eval", "--base", base, "--global", g1, *("--data", data[0]), "--max-length", "64", "--json"
    )
    assert metrics["mean"]["loss"] > 0
    adapter = tmp_path / "adapter"
    run_cli("export", "--global", g1, "--base", base, "--out", adapter)
    # docs/deployment.md: load the GGUF base yourself, then the adapter
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base.parent, gguf_file=base.name), str(adapter)
    )
    ours = load_base(base, "cpu", "fp32")
    load_adapter(ours, adapter)
    ids = torch.tensor([ours.tokenizer("What is 1 + 2?")["input_ids"]])
    with torch.no_grad():
        with_adapter = ours.model(input_ids=ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, with_adapter)
        with ours.model.disable_adapter():
            assert not torch.equal(ours.model(input_ids=ids).logits, with_adapter)


def test_cli_bad_base_path_gives_one_line(tiny_data: Path, tmp_path: Path) -> None:
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"\x80\x02 not a model")
    for base in (weights, tmp_path / "missing.gguf", tmp_path):
        result = runner.invoke(app, ["init", "--base", str(base), "--out", str(tmp_path / "g.safetensors")])
        assert result.exit_code == 6, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {base}:")
    assert not (tmp_path / "g.safetensors").exists()
