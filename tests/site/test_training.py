"""train-local, eval and export on a tiny real model (2-layer Llama, hidden 32)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedsrd_cli.cli import app
from fedsrd_cli.errors import UsageError
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
from fedsrd_cli.files.model_spec import file_sha256
from fedsrd_cli.site.training import TrainConfig, evaluate, load_base, load_datasets, set_global, train_local

from ..conftest import TINY_RECORDS, build_tiny_model, write_jsonl

runner = CliRunner()


def run_cli(*args: str, code: int = 0) -> dict:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return json.loads(result.stdout) if code == 0 and "--json" in args else {}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model: Path, tiny_data: Path) -> Path:
    """init + one train-local, shared by the tests below."""
    d = tmp_path_factory.mktemp("run")
    run_cli("init", "--base", tiny_model, "--out", d / "g0.safetensors", "--rank", "4", "--json")
    run_cli(
        "train-local",
        "--base",
        tiny_model,
        "--global",
        d / "g0.safetensors",
        "--data",
        tiny_data,
        "--out",
        d / "local.safetensors",
        "--steps",
        "20",
        "--lr",
        "2e-2",
        "--batch-size",
        "6",
        "--client",
        "c1",
        "--seed",
        "3",
        "--json",
    )
    return d


def test_train_local_lowers_loss_and_writes_lineage(run_dir: Path, tiny_model: Path, tiny_data: Path) -> None:
    g = read_artifact(run_dir / "g0.safetensors", kind="state")
    local = read_artifact(run_dir / "local.safetensors", kind="state")
    assert local.header.round == g.header.round == 0
    assert local.header.parent_hash == g.header.content_hash
    assert local.header.num_samples == len(TINY_RECORDS)
    assert local.header.client_id == "c1"
    assert local.header.base_fingerprint == g.header.base_fingerprint
    assert local.header.lora == g.header.lora
    assert local.shapes == g.shapes
    assert set(local.dtypes.values()) == {torch.float32}
    log = [json.loads(line) for line in (run_dir / "local.safetensors.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))
    assert log[-1]["loss"] < 0.95 * log[0]["loss"]
    moved = [n for n in g.names if not torch.equal(g.tensor(n), local.tensor(n))]
    assert len(moved) == len(g.names)
    # the log is never overwritten without --force
    run_cli(
        "train-local",
        "--base",
        tiny_model,
        "--global",
        run_dir / "g0.safetensors",
        "--data",
        tiny_data,
        "--out",
        run_dir / "local.safetensors",
        "--steps",
        "1",
        code=5,
    )


def test_sparsify_accepts_train_local_output(run_dir: Path) -> None:
    report = run_cli(
        "sparsify",
        "--global",
        run_dir / "g0.safetensors",
        "--local",
        run_dir / "local.safetensors",
        "--client",
        "c1",
        "--out",
        run_dir / "upload.safetensors",
        "--json",
    )
    assert report["num_samples"] == len(TINY_RECORDS)
    upload = read_artifact(run_dir / "upload.safetensors", kind="upload")
    assert upload.header.parent_hash == read_artifact(run_dir / "g0.safetensors").header.content_hash


def test_same_seed_gives_identical_file(run_dir: Path, tiny_model: Path, tiny_data: Path) -> None:
    outs = []
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        out = run_dir / f"seed-{name}.safetensors"
        run_cli(
            "train-local",
            "--base",
            tiny_model,
            "--global",
            run_dir / "g0.safetensors",
            "--data",
            tiny_data,
            "--out",
            out,
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--seed",
            seed,
            "--quiet",
        )
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_freeze_a_and_prox_in_process(run_dir: Path, tiny_model: Path, tiny_data: Path) -> None:
    g = read_artifact(run_dir / "g0.safetensors", kind="state")
    base = load_base(tiny_model, "cpu", "fp32")
    datasets = load_datasets([tiny_data])
    frozen, _ = train_local(base, g, datasets, TrainConfig(steps=3, lr=1e-2, freeze_a=True))
    for name in g.names:
        if ".lora_A." in name:
            assert torch.equal(frozen[name], g.tensor(name))
        else:
            assert not torch.equal(frozen[name], g.tensor(name))

    def distance(tensors: dict) -> float:
        return sum(float(((tensors[n] - g.tensor(n)) ** 2).sum()) for n in g.names)

    plain, _ = train_local(base, g, datasets, TrainConfig(steps=8, lr=1e-2))
    prox, stats = train_local(base, g, datasets, TrainConfig(steps=8, lr=1e-2, prox_mu=50.0))
    assert distance(prox) < distance(plain)
    assert "prox" in stats.log[-1]
    # the model is reused: loading G again gives G's factors back
    set_global(base, g)


def test_freeze_b_trains_only_a_and_alternating_follows_the_schedule(
    run_dir: Path, tiny_model: Path, tiny_data: Path
) -> None:
    trained = read_artifact(run_dir / "local.safetensors", kind="state")  # B != 0, so A gets gradients
    base = load_base(tiny_model, "cpu", "fp32")
    datasets = load_datasets([tiny_data])
    out, _ = train_local(base, trained, datasets, TrainConfig(steps=3, lr=1e-2, freeze_b=True))
    for name in trained.names:
        assert torch.equal(out[name], trained.tensor(name)) == (".lora_B." in name)
    config = TrainConfig(steps=3)
    assert (config.alternating(1).freeze_a, config.alternating(1).freeze_b) == (True, False)
    assert (config.alternating(2).freeze_a, config.alternating(2).freeze_b) == (False, True)
    with pytest.raises(UsageError, match="nothing to train"):
        TrainConfig(freeze_a=True, freeze_b=True)


def test_cli_alternate_trains_the_scheduled_factor(run_dir: Path, tiny_model: Path, tiny_data: Path) -> None:
    g = read_artifact(run_dir / "g0.safetensors", kind="state")
    args = ["train-local", "--base", tiny_model, "--global", run_dir / "g0.safetensors", "--data", tiny_data]
    args += ["--steps", "2", "--lr", "1e-2", "--batch-size", "4", "--alternate", "--force"]
    run_cli(*args, "--out", run_dir / "alt.safetensors", "--json")
    local = read_artifact(run_dir / "alt.safetensors", kind="state")
    for name in g.names:  # round 1: lora_B trains, lora_A stays the global one
        assert torch.equal(local.tensor(name), g.tensor(name)) == (".lora_A." in name)
    assert local.header.info["train"]["freeze_a"] is True
    run_cli(*args, "--freeze-a", "--out", run_dir / "alt2.safetensors", code=2)


def test_refuses_another_base(run_dir: Path, tmp_path: Path, tiny_data: Path) -> None:
    other = build_tiny_model(tmp_path / "other", hidden=48)
    result = runner.invoke(
        app,
        [
            "train-local",
            "--base",
            str(other),
            "--global",
            str(run_dir / "g0.safetensors"),
            "--data",
            str(tiny_data),
            "--out",
            str(tmp_path / "x.safetensors"),
            "--steps",
            "1",
        ],
    )
    assert result.exit_code == 4
    assert "another base model" in result.output


def test_bad_data_line_is_reported(run_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    result = runner.invoke(
        app,
        [
            "train-local",
            "--base",
            str(tiny_model),
            "--global",
            str(run_dir / "g0.safetensors"),
            "--data",
            str(bad),
            "--out",
            str(tmp_path / "x.safetensors"),
            "--steps",
            "1",
        ],
    )
    assert result.exit_code == 6
    assert f"{bad}:2:" in result.output


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


def test_server_commands_do_not_import_transformers() -> None:
    code = (
        "import fedsrd_cli.cli, sys; "
        "assert not any(m.startswith(('transformers', 'peft')) for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_file_labels_stay_unique() -> None:
    from fedsrd_cli.site.training import file_labels

    assert file_labels([Path("x/a.jsonl"), Path("x/b.jsonl")]) == ["a", "b"]
    assert file_labels([Path("c/code/eval.jsonl"), Path("c/math/eval.jsonl")]) == ["code/eval", "math/eval"]
    assert file_labels([Path("1/d/e.jsonl"), Path("2/d/e.jsonl")]) == ["1/d/e.jsonl", "2/d/e.jsonl"]


def test_train_config_is_validated() -> None:
    from fedsrd_cli.errors import UsageError

    with pytest.raises(UsageError, match="not both"):
        TrainConfig(steps=3, epochs=1.0)
    for bad in ({"lr": 0.0}, {"batch_size": 0}, {"prox_mu": -1.0}, {"device": "tpu"}, {"dtype": "int8"}):
        with pytest.raises(UsageError):
            TrainConfig(**bad)
    assert TrainConfig(epochs=2.0, batch_size=4, grad_accum=2).total_steps(20) == 6
    assert TrainConfig(batch_size=8).total_steps(20) == 3
    assert TrainConfig(steps=5).total_steps(1000) == 5


@pytest.mark.slow
def test_console_script_train_local_then_sparsify(run_dir: Path, tiny_model: Path, tiny_data: Path) -> None:
    import shutil

    fedsrd = shutil.which("fedsrd") or str(Path(sys.executable).parent / "fedsrd")
    out = run_dir / "script-local.safetensors"
    common = ["--global", str(run_dir / "g0.safetensors")]
    done = subprocess.run(
        [
            fedsrd,
            "train-local",
            "--base",
            str(tiny_model),
            *common,
            "--data",
            str(tiny_data),
            "--out",
            str(out),
            "--steps",
            "2",
            "--client",
            "s1",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout)["steps"] == 2
    upload = run_dir / "script-upload.safetensors"
    subprocess.run(
        [fedsrd, "sparsify", *common, "--local", str(out), "--client", "s1", "--out", str(upload)],
        capture_output=True,
        check=True,
    )
    assert read_artifact(upload, kind="upload").header.num_samples == len(TINY_RECORDS)
    bad = subprocess.run(
        [
            fedsrd,
            "train-local",
            "--base",
            str(tiny_model),
            *common,
            "--data",
            str(tiny_data),
            "--out",
            str(out),
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 5 and "already exists" in bad.stderr


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

    from fedsrd_cli.site.training import load_adapter

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


def test_train_local_measures_what_a_one_factor_download_cannot_carry(
    run_dir: Path, tiny_model: Path, tiny_data: Path
) -> None:
    """train-local reports ||dW (I - P_A)|| / ||dW|| of its own update (P_A: the projector on the
    global A's row space), equal to a dense computation from the files, and warns in one line
    above the level where FedSRD's default download loses to FedAvg; a short, slow run does not."""
    from fedsrd_cli.algorithms.diagnostics import ONE_FACTOR_RESIDUAL_WARNING, local_update_warning

    g = read_artifact(run_dir / "g0.safetensors", kind="state")
    reports = {}
    for tag, steps, lr in (("short", "1", "1e-4"), ("long", "20", "2e-2")):
        out = run_dir / f"residual-{tag}.safetensors"
        args = [
            "train-local",
            "--base",
            tiny_model,
            "--global",
            run_dir / "g0.safetensors",
            "--data",
            tiny_data,
        ]
        result = runner.invoke(
            app, [str(a) for a in [*args, "--out", out, "--steps", steps, "--lr", lr, "--json"]]
        )
        assert result.exit_code == 0, result.output
        local = read_artifact(out, kind="state")
        outside2 = total2 = 0.0
        for module in g.modules():
            a, b = (t.double() for t in g.factors(module))
            a_new, b_new = (t.double() for t in local.factors(module))
            dw = b_new @ a_new - b @ a  # (d_out, d_in)
            projector = torch.linalg.pinv(a) @ a  # (d_in, d_in)
            outside2 += float((dw - dw @ projector).norm()) ** 2
            total2 += float(dw.norm()) ** 2
        summary = json.loads(result.stdout)
        reported = summary["one_factor_residual"]
        assert reported == pytest.approx((outside2 / total2) ** 0.5, abs=1e-5)
        reports[tag] = (reported, summary["warnings"])
    for residual, warned in reports.values():  # the one-line warning, exactly above the level
        about_residual = [w for w in warned if "one-factor download can carry" in w]
        assert len(about_residual) == (residual > ONE_FACTOR_RESIDUAL_WARNING)
    # the settings alone: 20 steps at lr 2e-2 is long local training, 1 at 1e-4 is not
    assert sum("long local training" in w for w in reports["long"][1]) == 1
    assert reports["short"][1] == []
    assert reports["short"][0] < 0.5 * reports["long"][0]
    warning = local_update_warning(ONE_FACTOR_RESIDUAL_WARNING + 0.05)
    assert warning and "outside what FedSRD's default one-factor download can carry" in warning
    assert "--server-lr 0.25" in warning
    assert local_update_warning(ONE_FACTOR_RESIDUAL_WARNING) is None


def test_long_local_training_warns_for_the_one_factor_download_only() -> None:
    """steps x lr at or above LONG_LOCAL_TRAINING warns, below it does not; only when a method
    that sends FedSRD's one-factor download runs, or when the method is not known yet."""
    from fedsrd_cli.algorithms.diagnostics import long_local_training_warning

    at_level = long_local_training_warning(20, 5e-4, ("fedsrd",))
    assert at_level and at_level.startswith("20 local steps at lr 0.0005 (steps x lr = 0.01")
    assert "\n" not in at_level and 'docs/results.md, "Few, long rounds"' in at_level
    assert long_local_training_warning(19, 5e-4, ("fedsrd",)) is None
    assert long_local_training_warning(10, 1e-4, ("fedsrd",)) is None  # the default: FedSRD won
    assert long_local_training_warning(30, 1e-3, ("fedavg", "ffa-lora", "flexlora")) is None
    assert long_local_training_warning(30, 1e-3, ("fedavg", "fedsrd-e")) is not None
    unknown = long_local_training_warning(30, 1e-3, None)
    assert unknown and "if the coordinator aggregates with it" in unknown


def test_train_local_warns_about_long_training_for_fedsrd_states_only(
    run_dir: Path, tiny_model: Path, tiny_data: Path
) -> None:
    """A global state written by fedavg never warns about long local training; one written by
    fedsrd does, with the same settings."""
    g = read_artifact(run_dir / "g0.safetensors", kind="state")
    warned = {}
    for method in ("fedavg", "fedsrd"):
        state = run_dir / f"g-{method}.safetensors"
        write_artifact(state, replace(g.header, method=method), dict(g.iter_tensors()), force=True)
        out = run_dir / f"long-{method}.safetensors"
        result = runner.invoke(
            app,
            [
                str(a)
                for a in ["train-local", "--base", tiny_model, "--global", state, "--data", tiny_data]
                + ["--out", out, "--steps", "2", "--lr", "1e-2", "--force"]
            ],
        )
        assert result.exit_code == 0, result.output
        warned[method] = [line for line in result.output.splitlines() if "long local training" in line]
    assert warned["fedavg"] == []
    assert len(warned["fedsrd"]) == 1 and warned["fedsrd"][0].startswith("warning: 2 local steps at lr 0.01")
