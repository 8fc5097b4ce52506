"""fedsrd simulate on a tiny real model: two algorithms, two clients, a resumed run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedsrd_cli.cli import app
from fedsrd_cli.errors import OutputExistsError, UsageError
from fedsrd_cli.files.artifacts import read_artifact
from fedsrd_cli.files.model_spec import file_sha256
from fedsrd_cli.simulation.config import SimulateConfig, local_training_defaults
from fedsrd_cli.simulation.records import output_is_new
from fedsrd_cli.simulation.rounds import _choose, client_train_seed

from ..conftest import TINY_RECORDS, build_tiny_model, write_jsonl

runner = CliRunner()


def run_cli(*args: object, code: int = 0) -> dict:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return json.loads(result.stdout) if code == 0 and "--json" in args else {"output": result.output}


@pytest.fixture(scope="module")
def sim_inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sim")
    model = build_tiny_model(d / "tiny-llama-64", hidden=64)
    left = write_jsonl(d / "alice.jsonl", TINY_RECORDS[:3])
    right = write_jsonl(d / "bob.jsonl", TINY_RECORDS[3:])
    evaluation = write_jsonl(d / "heldout.jsonl", TINY_RECORDS)
    return {"model": model, "alice": left, "bob": right, "eval": evaluation}


def sim_args(inputs: dict[str, Path], out: Path, rounds: int) -> list[object]:
    return [
        "simulate",
        "--base", inputs["model"],
        "--clients-data", inputs["alice"],
        "--clients-data", inputs["bob"],
        "--eval-data", inputs["eval"],
        "--algorithms", "fedsrd,fedavg",
        "--rounds", rounds,
        "--local-steps", 3,
        "--batch-size", 3,
        "--lr", "2e-2",
        "--rank", 16,
        "--alpha", 32,
        "--out", out,
        "--json",
    ]  # fmt: skip


@pytest.mark.slow
def test_simulate_two_rounds_then_resume(sim_inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "results"
    summary = run_cli(*sim_args(sim_inputs, out, 2))
    # 3 local steps at lr 2e-2 is long local training for fedsrd (steps x lr = 0.06): one line
    assert len(summary["warnings"]) == 1 and "steps x lr = 0.06" in summary["warnings"][0]
    assert [(r["algorithm"], r["round"]) for r in summary["rounds_run_now"]] == [
        ("fedsrd", 1), ("fedsrd", 2), ("fedavg", 1), ("fedavg", 2)
    ]  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"fedsrd", "fedavg"}
    for name in ("fedsrd", "fedavg"):
        records = results["runs"][name]["0"]
        assert [r["round"] for r in records] == [0, 1, 2]
        for r in records:
            assert set(r["eval_loss"]) == {"heldout"}
            assert r["mean_eval_loss"] == pytest.approx(r["eval_loss"]["heldout"])
        assert records[0]["traffic_per_client"] == 0
        for r in records[1:]:
            assert r["participants"] == ["alice", "bob"]
            assert r["upload_bytes"] > 0 and r["download_bytes"] > 0
            assert r["server_seconds"] > 0
            state = out / r["global_state"]
            assert state.is_file()
            upload_sizes = [(state.parent / f"round-{r['round']}" / f"upload-{c}.safetensors").stat().st_size
                            for c in ("alice", "bob")]  # fmt: skip
            assert r["upload_bytes"] == pytest.approx(sum(upload_sizes) / 2)
            broadcast = state.parent / f"round-{r['round']}" / "broadcast.safetensors"
            assert r["download_bytes"] == broadcast.stat().st_size
            # the one-factor download records what one factor cannot carry; FedAvg sends both
            residual = read_artifact(broadcast).header.info.get("one_factor_residual")
            assert r["extra"].get("one_factor_residual") == residual
            assert (residual is None) == (name == "fedavg")
        assert records[2]["cumulative_traffic_per_client"] == pytest.approx(
            records[1]["traffic_per_client"] + records[2]["traffic_per_client"]
        )
    # both start from the same round-0 state
    assert (
        results["runs"]["fedsrd"]["0"][0]["global_hash"] == results["runs"]["fedavg"]["0"][0]["global_hash"]
    )
    rows = {row["algorithm"]: row for row in summary["summary"]}
    fedsrd_mb = rows["fedsrd"]["traffic_mb_per_round"][0]
    fedavg_mb = rows["fedavg"]["traffic_mb_per_round"][0]
    assert fedsrd_mb < 0.5 * fedavg_mb, (fedsrd_mb, fedavg_mb)
    table = (out / "results.md").read_text()
    assert "| algorithm | heldout | mean | up MB | down MB | MB / round | server s |" in table
    assert table.count("\n| fed") == 2
    assert (out / "traffic_vs_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same round through the separate commands gives the same global state, bit for bit
    work = tmp_path / "by-hand"
    work.mkdir()
    g0, g1 = work / "g0.safetensors", work / "g1.safetensors"
    head = run_cli("init", "--base", sim_inputs["model"], "--rank", 16, "--alpha", 32, "--seed", 0,
                   "--out", g0, "--json")  # fmt: skip
    assert head["content_hash"] == results["runs"]["fedsrd"]["0"][0]["global_hash"]
    uploads = []
    for index, client in enumerate(("alice", "bob")):
        local, upload = work / f"local-{client}.safetensors", work / f"upload-{client}.safetensors"
        run_cli("train-local", "--base", sim_inputs["model"], "--global", g0, "--data", sim_inputs[client],
                "--out", local, "--client", client, "--steps", 3, "--batch-size", 3, "--lr", "2e-2",
                "--seed", client_train_seed(0, 1, index), "--json")  # fmt: skip
        run_cli("sparsify", "--global", g0, "--local", local, "--client", client, "--out", upload, "--json")
        uploads.append(upload)
    run_cli("aggregate", "--global", g0, "--out", work / "agg.safetensors", *uploads, "--json")
    head = run_cli("broadcast", "--global", g0, "--aggregate", work / "agg.safetensors",
                   "--out", work / "b1.safetensors", "--out-global", g1, "--json")  # fmt: skip
    assert head["next_global_hash"] == results["runs"]["fedsrd"]["0"][1]["global_hash"]
    assert (work / "b1.safetensors").stat().st_size == results["runs"]["fedsrd"]["0"][1]["download_bytes"]

    # resume: one more round runs only round 3; rounds 1-2 stay as they were
    summary = run_cli(*sim_args(sim_inputs, out, 3))
    assert [(r["algorithm"], r["round"]) for r in summary["rounds_run_now"]] == [("fedsrd", 3), ("fedavg", 3)]
    assert summary["rounds_already_done"] == 4
    resumed = json.loads((out / "results.json").read_text())
    for name in ("fedsrd", "fedavg"):
        assert resumed["runs"][name]["0"][:3] == results["runs"][name]["0"]
        assert resumed["runs"][name]["0"][3]["round"] == 3
    assert "round 3" in (out / "results.md").read_text()

    # a rerun of a finished run trains nothing and rewrites the same table
    summary = run_cli(*sim_args(sim_inputs, out, 3))
    assert summary["rounds_run_now"] == [] and summary["rounds_already_done"] == 6
    assert json.loads((out / "results.json").read_text()) == resumed

    # the same directory with other settings is refused with one line
    args = sim_args(sim_inputs, out, 3)
    args[args.index("--lr") + 1] = "1e-3"
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2
    assert "lr" in result.output and "other settings" in result.output


def test_config_is_validated() -> None:
    good = dict(
        base="m", client_data=("a", "b"), client_ids=("a", "b"), eval_data=("e",), eval_names=("e",),
        algorithms=("fedsrd",), rounds=1,
    )  # fmt: skip
    SimulateConfig(**good)
    for change, message in [
        ({"algorithms": ("nope",)}, "unknown method"),
        ({"algorithms": ("fedsrd", "fedsrd")}, "twice"),
        ({"rounds": 0}, "--rounds"),
        ({"sample_clients": 3}, "--sample-clients"),
        ({"client_ids": ("a", "a")}, "differ"),
        ({"seeds": 0}, "--seeds"),
        ({"base_sparsity": 1.0}, "--base-sparsity"),
        ({"base_sparsity": 0.95}, "below 1"),
        ({"server_lr": 0.0}, "--server-lr"),
        ({"server_lr": 17.0}, "--server-lr"),
        ({"server_lr_from": 0}, "--server-lr-from"),
        (
            {"step_rule": "fedexp", "algorithms": ("fedsrd-e",), "organisation_dp": (0.1, 1.0, 1.0, 1e-3)},
            "not with organisation-level DP",
        ),
        ({"step_rule": "adam", "algorithms": ("fedavg",)}, "--step-rule"),
        ({"eval_batch_size": 0}, "--eval-batch-size"),
    ]:
        with pytest.raises(UsageError, match=message):
            SimulateConfig(**{**good, **change})
    # the download's sparsity is the run's for every method with a sparse download; a method that
    # sends whole factors cannot take a sparsity other than 0
    assert SimulateConfig(**good, download_sparsity=0.5).broadcast_config(0.8, 0).download_sparsity == 0.5
    assert SimulateConfig(**good).broadcast_config(0.8, 0).download_sparsity == 0.8
    with pytest.raises(UsageError, match="flexlora sends whole factors"):
        SimulateConfig(**{**good, "algorithms": ("fedsrd", "flexlora")}, download_sparsity=0.5)
    with pytest.raises(UsageError, match="--download-sparsity"):
        SimulateConfig(**good, download_sparsity=1.0)
    assert SimulateConfig(**good, rescale=False).sparsify_config(0.85).rescale is False
    # left out, --base-sparsity is not recorded, so runs made before the flag existed resume
    assert "base_sparsity" not in SimulateConfig(**good).record()
    assert SimulateConfig(**good, base_sparsity=0.75).record()["base_sparsity"] == 0.75
    assert SimulateConfig(**good, server_lr=0.25).broadcast_config(0.8, 0).server_lr == 0.25
    assert SimulateConfig(**good).broadcast_config(0.8, 0).server_lr == 1.0
    for key in ("download_sparsity", "rescale", "server_lr"):
        assert key not in SimulateConfig(**good).record()
    assert SimulateConfig(**good, server_lr=0.25).record()["server_lr"] == 0.25
    late = SimulateConfig(**good, server_lr=0.25, server_lr_from=3)
    assert [late.broadcast_config(0.8, 0, r).server_lr for r in (1, 2, 3, 4)] == [1.0, 1.0, 0.25, 0.25]
    assert late.record()["server_lr_from"] == 3 and "server_lr_from" not in SimulateConfig(**good).record()
    assert SimulateConfig(**good, download_sparsity=0.5, rescale=False).record() == {
        **SimulateConfig(**good).record(),
        "download_sparsity": 0.5,
        "rescale": False,
    }


def test_simulate_sends_both_factors_at_the_given_download_sparsity(
    sim_inputs: dict[str, Path], tmp_path: Path
) -> None:
    """--factor-choice both --download-fit lstsq --download-sparsity 0.5 --download-value-dtype int4
    --server-lr 0.5 --no-rescale reach the broadcast and the uploads: one round, the broadcast
    changes both factors of every module, in packed 4-bit codes (simulate applies it as a client
    does, result hash checked)."""
    out = tmp_path / "both"
    args = [*sim_args(sim_inputs, out, 1), "--algorithms", "fedsrd", "--factor-choice", "both"]
    run_cli(
        *args,
        "--download-fit",
        "lstsq",
        "--download-sparsity",
        0.5,
        "--no-rescale",
        "--download-value-dtype",
        "int4",
        "--server-lr",
        0.5,
    )
    broadcast = read_artifact(out / "work" / "fedsrd" / "seed-0" / "round-1" / "broadcast.safetensors")
    assert broadcast.header.download_sparsity == 0.5
    assert broadcast.header.info["factor_choice"] == "both"
    assert broadcast.header.info["download_fit"] == "lstsq"
    assert broadcast.header.info["value_dtype"] == "int4"  # the uploads' values stay bf16
    assert broadcast.header.info["server_lr"] == 0.5
    for name in broadcast.header.layout:  # packed codes and their scales; the clients' state matched
        assert broadcast.tensor(name + ".values").dtype == torch.uint8
        assert broadcast.tensor(name + ".scales").dtype == torch.float32
    factors = {name.split(".")[-2] for name in broadcast.header.layout}  # ...lora_A.weight
    assert factors == {"lora_A", "lora_B"}
    upload = next((out / "work" / "fedsrd" / "seed-0" / "round-1").glob("upload-*.safetensors"))
    assert read_artifact(upload).header.info["sparsify"]["rescale"] is False
    extra = json.loads((out / "results.json").read_text())["runs"]["fedsrd"]["0"][1]["extra"]
    assert "one_factor_residual" not in extra  # both factors are sent
    recorded = json.loads((out / "results.json").read_text())["config"]
    assert recorded["download_sparsity"] == 0.5 and recorded["rescale"] is False
    assert recorded["download_value_dtype"] == "int4" and recorded["server_lr"] == 0.5


def test_a_simulated_round_sends_int4_uploads(sim_inputs: dict[str, Path], tmp_path: Path) -> None:
    """One round of fedsrd with --value-dtype int4 --download-value-dtype bf16: the uploads are
    packed codes with scales, the broadcast bf16 (and simulate's clients reach its state)."""
    out = tmp_path / "q"
    args = [*sim_args(sim_inputs, out, 1), "--algorithms", "fedsrd"]
    run_cli(*args, "--value-dtype", "int4", "--download-value-dtype", "bf16")
    round_dir = out / "work" / "fedsrd" / "seed-0" / "round-1"
    uploads = sorted(round_dir.glob("upload-*.safetensors"))
    assert len(uploads) == 2  # alice's and bob's
    for path in uploads:
        upload = read_artifact(path)
        assert upload.header.info["value_dtype"] == "int4"
        for name in upload.header.layout:
            assert upload.dtypes[name + ".values"] == torch.uint8
            assert upload.dtypes[name + ".scales"] == torch.float32
    assert read_artifact(round_dir / "broadcast.safetensors").header.info["value_dtype"] == "bf16"


def test_server_lr_from_damps_only_the_later_rounds(sim_inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "late"
    args = [
        *sim_args(sim_inputs, out, 2),
        "--algorithms",
        "fedsrd",
        "--server-lr",
        0.5,
        "--server-lr-from",
        2,
    ]
    run_cli(*args)
    infos = [
        read_artifact(out / "work" / "fedsrd" / "seed-0" / f"round-{r}" / "broadcast.safetensors").header.info
        for r in (1, 2)
    ]
    assert "server_lr" not in infos[0] and infos[1]["server_lr"] == 0.5
    recorded = json.loads((out / "results.json").read_text())["config"]
    assert (recorded["server_lr"], recorded["server_lr_from"]) == (0.5, 2)


def test_round_0_is_scored_once_for_every_seed(
    sim_inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedsrd_cli.site.evaluation as evaluation

    scored: list[int] = []
    real = evaluation.evaluate

    def counting(*args, **kwargs):
        scored.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", counting)
    out = tmp_path / "seeds"
    args = [*sim_args(sim_inputs, out, 1), "--algorithms", "fedavg", "--seeds", 2, "--eval-batch-size", 2]
    run_cli(*args)
    assert len(scored) == 1 + 2  # round 0 once, then round 1 of each seed
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["eval_batch_size"] == 2
    runs = results["runs"]["fedavg"]
    assert runs["0"][0]["eval_loss"] == runs["1"][0]["eval_loss"]
    # Seed 1's own start (another A, B = 0), scored by `fedsrd eval`, gives the recorded loss.
    start = out / runs["1"][0]["global_state"]
    report = tmp_path / "eval.json"
    run_cli(
        "eval", "--base", sim_inputs["model"], "--global", start, "--data", sim_inputs["eval"],
        "--max-length", 128, "--out", report,
    )  # fmt: skip
    loss = json.loads(report.read_text())["mean"]["loss"]
    assert loss == pytest.approx(runs["1"][0]["mean_eval_loss"], rel=1e-6)


def test_refuses_a_foreign_output_directory(tmp_path: Path) -> None:
    assert output_is_new(tmp_path / "missing")
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="no simulate run"):
        output_is_new(tmp_path)


def test_cli_needs_base_clients_and_eval_together(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", "--base", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "together" in result.output


def test_sample_clients_is_a_seeded_choice_per_round() -> None:
    config = SimulateConfig(
        base="m", client_data=tuple("abcde"), client_ids=tuple("abcde"), eval_data=("e",),
        eval_names=("e",), algorithms=("fedsrd",), rounds=5, sample_clients=2,
    )  # fmt: skip
    picks = [_choose(config, 0, t) for t in range(1, 6)]
    assert all(len(p) == 2 and len(set(p)) == 2 and set(p) <= set(range(5)) for p in picks)
    assert picks == [_choose(config, 0, t) for t in range(1, 6)]  # same for every algorithm
    assert len({tuple(p) for p in picks}) > 1  # changes from round to round
    full = SimulateConfig(**{**config.__dict__, "sample_clients": None})
    assert _choose(full, 0, 1) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_simulate_trains_what_each_method_expects(sim_inputs: dict[str, Path], tmp_path: Path) -> None:
    """ffa-lora never changes A; fedsrd-alternate changes only B in round 1 and only A in round 2."""
    out = tmp_path / "results"
    args = sim_args(sim_inputs, out, 2)
    args[args.index("--algorithms") + 1] = "ffa-lora,fedsrd-alternate"
    run_cli(*args)
    results = json.loads((out / "results.json").read_text())

    def factors(name: str, round_index: int) -> dict[str, dict[str, torch.Tensor]]:
        state = read_artifact(out / results["runs"][name]["0"][round_index]["global_state"], kind="state")
        return {f: {n: t for n, t in state.iter_tensors() if f".lora_{f}." in n} for f in ("A", "B")}

    def same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(x[n], y[n]) for n in x)

    ffa = [factors("ffa-lora", t) for t in (0, 1, 2)]
    assert same(ffa[0]["A"], ffa[2]["A"]) and not same(ffa[1]["B"], ffa[2]["B"])
    alt = [factors("fedsrd-alternate", t) for t in (0, 1, 2)]
    assert same(alt[0]["A"], alt[1]["A"]) and not same(alt[0]["B"], alt[1]["B"])  # round 1: B
    assert same(alt[1]["B"], alt[2]["B"]) and not same(alt[1]["A"], alt[2]["A"])  # round 2: A
    extras = [r["extra"].get("trained_factor") for r in results["runs"]["fedsrd-alternate"]["0"][1:]]
    assert extras == ["B", "A"]
    for r in results["runs"]["fedsrd-alternate"]["0"][1:]:
        upload = read_artifact(
            out / Path(r["global_state"]).parent / f"round-{r['round']}" / "upload-alice.safetensors"
        )
        assert upload.header.info["sparsify"]["base_sparsity"] == 0.7


def test_demo_model_is_recorded_and_checked(tmp_path: Path) -> None:
    good = dict(
        base="m", client_data=("a",), client_ids=("a",), eval_data=("e",), eval_names=("e",),
        algorithms=("fedsrd",), rounds=1,
    )  # fmt: skip
    # the toy (and a run on your own --base) is not recorded, so demo runs made before --model resume
    assert "demo_model" not in SimulateConfig(**good).record()
    assert "demo_model" not in SimulateConfig(**good, demo_model="toy").record()
    assert SimulateConfig(**good, demo_model="smollm2").record()["demo_model"] == "smollm2"
    with pytest.raises(UsageError, match="--model"):
        SimulateConfig(**good, demo_model="gpt2")


def test_local_training_defaults_are_small_steps_except_on_the_toy() -> None:
    real, toy = local_training_defaults("smollm2"), local_training_defaults("toy")
    assert (real.local_steps, real.lr, real.batch_size, real.max_length) == (10, 1e-4, 8, 128)
    assert (toy.local_steps, toy.lr, toy.batch_size, toy.max_length) == (30, 1e-3, 16, 512)
    assert local_training_defaults(None) == real  # the user's own --base


def test_demo_assets_of_another_model_are_refused(tmp_path: Path) -> None:
    """A run stopped after writing the toy's assets cannot go on with --model smollm2 (and vice versa)."""
    assets = tmp_path / "out" / "assets"
    assets.mkdir(parents=True)
    (assets / "manifest.json").write_text(json.dumps({"base": "base"}))  # before --model: the toy
    result = run_cli("simulate", "--out", tmp_path / "out", "--model", "smollm2", code=2)
    assert "holds the demo for --model toy; rerun with --model toy" in result["output"]
    (assets / "manifest.json").write_text(json.dumps({"model": "smollm2"}))
    result = run_cli("simulate", "--out", tmp_path / "out", "--model", "toy", code=2)
    assert "holds the demo for --model smollm2" in result["output"]
    result = run_cli("simulate", "--out", tmp_path / "o2", "--model", "x", code=2)
    assert "--model must be one of smollm2, toy" in result["output"]


@pytest.mark.slow
@pytest.mark.parametrize("base_fixture", ["tiny_gguf", "tiny_gemma3_gguf"])
def test_simulate_on_a_gguf_base(
    base_fixture: str, tiny_data: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """One round of two clients on a GGUF base: the tiny Llama, and the tiny Gemma-3 (tied
    embeddings, K-quant tensors, a SentencePiece vocabulary)."""
    tiny_gguf = request.getfixturevalue(base_fixture)
    left = write_jsonl(tmp_path / "left.jsonl", TINY_RECORDS[:3])
    right = write_jsonl(tmp_path / "right.jsonl", TINY_RECORDS[3:])
    summary = run_cli(
        "simulate", "--base", tiny_gguf, "--clients-data", left, "--clients-data", right,
        "--eval-data", tiny_data, "--algorithms", "fedavg", "--rounds", 1, "--local-steps", 2,
        "--batch-size", 3, "--rank", 4, "--out", tmp_path / "results", "--json",
    )  # fmt: skip
    assert summary["rounds_run_now"]
    config = json.loads((tmp_path / "results" / "config.json").read_text())
    assert config["base"] == str(tiny_gguf.resolve()) and "demo_model" not in config
    # flags not given take the real-model defaults (small local steps), not the toy's
    assert (config["local_steps"], config["batch_size"]) == (2, 3)
    assert (config["lr"], config["max_length"]) == (1e-4, 128)
    first = read_artifact(tmp_path / "results" / "work" / "fedavg" / "seed-0" / "global-r0.safetensors")
    assert first.header.base_fingerprint == "sha256:" + file_sha256(tiny_gguf)


@pytest.mark.slow
def test_simulate_with_dp_records_epsilon_per_round(sim_inputs: dict[str, Path], tmp_path: Path) -> None:
    """Every client trains with DP-SGD for a plan of 2 rounds at epsilon 5; results.json records each
    client's epsilon after every round; a resumed run with a third round is refused by the plan."""
    out = tmp_path / "dp"
    args = [*sim_args(sim_inputs, out, 2), "--dp-epsilon", 5, "--dp-delta", 0.1]
    run_cli(*args)
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["record_dp"]["planned_rounds"] == 2
    for method in ("fedsrd", "fedavg"):
        rounds = results["runs"][method]["0"]
        first, second = (r["extra"]["privacy"]["sites"] for r in rounds[1:])
        assert sorted(first) == ["alice", "bob"]
        assert 0 < first["alice"]["epsilon"] < second["alice"]["epsilon"] <= 5.0
        assert second["alice"]["rounds"] == 2 and second["alice"]["delta"] == 0.1
    more = [*sim_args(sim_inputs, out, 3), "--dp-epsilon", 5, "--dp-delta", 0.1, "--dp-rounds", 2]
    refused = run_cli(*more, code=8)
    assert "plan is spent" in refused["output"]
    # Organisation-level DP runs on fedsrd-e alone.
    org = ["--dp-org-clip", 0.1, "--dp-org-noise-multiplier", 1.0, "--dp-org-delta", 1e-3]
    wrong = run_cli(*sim_args(sim_inputs, tmp_path / "org", 1), *org, code=2)
    assert "fedsrd-e alone" in wrong["output"]
    assert not (tmp_path / "org").exists()


@pytest.mark.slow
def test_simulate_secure_rounds(sim_inputs: dict[str, Path], tmp_path: Path) -> None:
    """--secure sends masked projections (the dense (d_out, r) words of every module) and the
    coordinator their sum: the rounds run and learn (tests/algorithms/test_secure.py checks the
    sum against the plain round's)."""
    args = [a if a != "fedsrd,fedavg" else "fedsrd-e" for a in sim_args(sim_inputs, tmp_path / "secure", 2)]
    summary = run_cli(*args, "--secure")
    rows = json.loads(Path(summary["results"]).read_text())["runs"]["fedsrd-e"]["0"]
    assert rows[-1]["mean_eval_loss"] < rows[0]["mean_eval_loss"]
    round_dir = tmp_path / "secure" / "work" / "fedsrd-e" / "seed-0" / "round-1"
    upload = read_artifact(round_dir / "upload-alice.safetensors")
    assert upload.header.kind == "masked_upload" and upload.header.info["secure"]["sites"] == ["alice", "bob"]
    words = sum(math.prod(shape) for shape in upload.shapes.values())
    assert rows[1]["upload_bytes"] > 4 * words  # 4 bytes per word, plus the header
    assert read_artifact(round_dir / "broadcast.safetensors").header.info["factor_choice"] == "b"
    wrong = run_cli(*sim_args(sim_inputs, tmp_path / "wrong", 1), "--secure", code=2)
    assert "fedsrd-e alone" in wrong["output"]


def test_simulate_sparse_secure_rounds_keep_each_clients_residual(
    sim_inputs: dict[str, Path], tmp_path: Path
) -> None:
    """--secure-density 0.3 --word-bits 16: 16-bit words at the public positions only, and each
    client keeps a residual every round, which the next round sends (the rule itself is checked
    in tests/algorithms/test_secure_sparse.py); --step-rule fedexp takes FedExP's step from the
    sites' masked norms (tests/algorithms/test_secure_spread.py)."""
    out = tmp_path / "sparse"
    args = [a if a != "fedsrd,fedavg" else "fedsrd-e" for a in sim_args(sim_inputs, out, 2)]
    summary = run_cli(
        *args, "--secure", "--secure-density", "0.3", "--word-bits", "16", "--step-rule", "fedexp"
    )
    rows = json.loads(Path(summary["results"]).read_text())["runs"]["fedsrd-e"]["0"]
    assert rows[-1]["mean_eval_loss"] < rows[0]["mean_eval_loss"]
    for row in rows[1:]:  # FedExP's step from the sites' masked norms (algorithms/secure.py)
        eta = row["extra"]["extrapolation"]["coordinator"]
        assert eta >= 1.0 and row["extra"].get("server_lr", 1.0) == eta
    work = out / "work" / "fedsrd-e" / "seed-0"
    upload = read_artifact(work / "round-1" / "upload-alice.safetensors")
    assert upload.header.info["secure"]["density"] == 0.3
    assert all(upload.dtypes[n] == torch.int16 and len(upload.shapes[n]) == 1 for n in upload.names)
    words = sum(math.prod(shape) for shape in upload.shapes.values())
    assert 2 * words < rows[1]["upload_bytes"] < 2 * words + 100_000  # 2 bytes a word, plus the header
    for index in (1, 2):
        assert (work / f"round-{index}" / "residual-alice.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert (config["secure_density"], config["word_bits"]) == (0.3, 16)
    wrong = run_cli(*sim_args(sim_inputs, tmp_path / "wrong", 1), "--word-bits", "16", code=2)
    assert "add --secure" in wrong["output"]


def test_every_round_records_upload_and_mean_update_fidelity(
    sim_inputs: dict[str, Path], tmp_path: Path
) -> None:
    """Each round records its uploads' fidelity (their weighted mean, from the aggregate) and the
    exact mean update's against the target and what was delivered (simulate holds every site's
    factors); a dense fp32 FedAvg upload carries its update exactly."""
    out = tmp_path / "fidelity"
    run_cli(*sim_args(sim_inputs, out, 1), "--value-dtype", "fp32")
    results = json.loads((out / "results.json").read_text())
    for name in ("fedsrd", "fedavg"):
        extra = results["runs"][name]["0"][1]["extra"]
        assert set(extra["mean_update_fidelity"]) == {"target", "delivered"}
        aggregate = read_artifact(out / "work" / name / "seed-0" / "round-1" / "aggregate.safetensors")
        recorded = aggregate.header.info["upload_fidelity"]
        assert extra["upload_fidelity"] == {k: recorded[k] for k in ("norm_ratio", "cosine")}
    dense = results["runs"]["fedavg"]["0"][1]["extra"]["upload_fidelity"]
    assert dense["norm_ratio"] == pytest.approx(1.0, abs=1e-5) and dense["cosine"] == pytest.approx(
        1.0, abs=1e-5
    )


def test_a_fedexp_run_records_the_step_and_both_etas(sim_inputs: dict[str, Path], tmp_path: Path) -> None:
    run_cli(*sim_args(sim_inputs, tmp_path / "fedexp", 1), "--step-rule", "fedexp")
    results = json.loads((tmp_path / "fedexp" / "results.json").read_text())
    assert results["config"]["step_rule"] == "fedexp"
    for name in ("fedavg", "fedsrd"):
        extra = results["runs"][name]["0"][1]["extra"]
        # fedavg: bf16 dense uploads; fedsrd: the sites' sketches (an estimate)
        tolerance = 1e-2 if name == "fedavg" else 0.25
        assert extra["extrapolation"]["coordinator"] == pytest.approx(
            extra["extrapolation"]["exact"], rel=tolerance
        )
        assert extra.get("server_lr", 1.0) == extra["extrapolation"]["coordinator"]
    upload = read_artifact(next((tmp_path / "fedexp" / "work" / "fedsrd").rglob("upload-*.safetensors")))
    assert "update_sketch" in upload.header.info
