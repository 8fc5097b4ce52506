"""train-local on a tiny real model (2-layer Llama, hidden 32): the file it writes, its settings,
frozen factors and FedProx, and what it warns about."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedsrd_cli.cli import app
from fedsrd_cli.errors import UsageError
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
from fedsrd_cli.site.data import load_datasets
from fedsrd_cli.site.model import load_base, set_global
from fedsrd_cli.site.training import TrainConfig, train_local

from ..conftest import TINY_RECORDS, build_tiny_model
from .conftest import run_cli, runner


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
    assert "\n" not in at_level and '"Few, long rounds")' in at_level
    assert "use fedavg with --server-lr 2" in at_level  # the best FedAvg, not its clients' step
    assert long_local_training_warning(19, 5e-4, ("fedsrd",)) is None
    assert long_local_training_warning(10, 1e-4, ("fedsrd",)) is None  # the default settings
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


def test_a_site_rank_trains_only_its_first_components(
    run_dir: Path, tiny_model: Path, tiny_data: Path
) -> None:
    """train-local --rank 2 of a rank-4 state: lora_B's columns 2.. and lora_A's rows 2.. stay
    exactly at the start (weight decay too), the first two move; the hooks do not outlive the call."""
    start = read_artifact(run_dir / "local.safetensors", kind="state")  # B != 0: A gets gradients
    base = load_base(tiny_model, "cpu", "fp32")
    datasets = load_datasets([tiny_data])
    config = TrainConfig(steps=3, lr=1e-2, weight_decay=0.1, site_rank=2)
    out, _ = train_local(base, start, datasets, config)
    for name in start.names:
        trained, begun = out[name], start.tensor(name)
        if ".lora_A." in name:
            assert torch.equal(trained[2:], begun[2:]) and not torch.equal(trained[:2], begun[:2])
        else:
            assert torch.equal(trained[:, 2:], begun[:, 2:]) and not torch.equal(trained[:, :2], begun[:, :2])
    whole, _ = train_local(base, start, datasets, TrainConfig(steps=3, lr=1e-2))
    assert all(
        not torch.equal(
            whole[n][2:] if ".lora_A." in n else whole[n][:, 2:],
            (start.tensor(n)[2:] if ".lora_A." in n else start.tensor(n)[:, 2:]),
        )
        for n in start.names
    )
    with pytest.raises(UsageError, match="above the global state's rank 4"):
        train_local(base, start, datasets, TrainConfig(steps=1, site_rank=5))
    with pytest.raises(UsageError, match="--rank must be >= 1"):
        TrainConfig(site_rank=0)
