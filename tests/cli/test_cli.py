"""The command line: a full round, and a clear one-line error with no output for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fedsrd_cli
from fedsrd_cli.cli import app
from fedsrd_cli.config import LoraSpec
from fedsrd_cli.files import naming
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
from fedsrd_cli.files.safetensors_io import encode_safetensors

from ..conftest import make_global, make_local

runner = CliRunner()


def run(*args: str, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def run_round(
    tmp: Path, global_file: Path, n: int = 3, tag: str = "r1", method: str = "fedsrd"
) -> dict[str, Path]:
    uploads = []
    for i in range(n):
        local = make_local(global_file, tmp / f"local-{tag}-{i}.safetensors", seed=10 * i + 1)
        up = tmp / f"up-{tag}-{i}.safetensors"
        args = ("--method", method, "--global", global_file, "--local", local, "--client", f"c{i}")
        run("sparsify", *args, "--out", up)
        uploads.append(up)
    agg = tmp / f"agg-{tag}.safetensors"
    run("aggregate", "--method", method, "--global", global_file, "--out", agg, *uploads)
    bc, nxt = tmp / f"bc-{tag}.safetensors", tmp / f"g-{tag}.safetensors"
    run("broadcast", "--global", global_file, "--aggregate", agg, "--out", bc, "--out-global", nxt)
    return {"uploads": uploads, "aggregate": agg, "broadcast": bc, "next": nxt}


def test_a_full_round_through_the_cli(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    files = run_round(tmp_path, g0)
    client_state = tmp_path / "client-g1.safetensors"
    result = run("apply", "--global", g0, "--broadcast", files["broadcast"], "--out", client_state, "--json")
    assert json.loads(result.stdout)["verified"] is True
    assert client_state.read_bytes() == files["next"].read_bytes()
    report = json.loads(run("inspect", files["uploads"][0], "--json").stdout)
    assert report["kind"] == "upload" and report["round"] == 1 and report["client_id"] == "c0"
    assert report["parent_hash"] == read_artifact(g0).header.content_hash
    assert 0 < report["paper_ratio_to_dense"] < 0.2
    human = run("inspect", files["broadcast"], "--tensors").stdout
    assert "broadcast" in human and "lora_B" in human


def test_unpack_writes_dense_deltas_under_peft_names(tmp_path):
    from safetensors.torch import load_file

    g0 = make_global(tmp_path / "g0.safetensors")
    files = run_round(tmp_path, g0)
    run("unpack", files["broadcast"], "--out", tmp_path / "dense.safetensors")
    dense = load_file(tmp_path / "dense.safetensors")
    before, after = read_artifact(g0), read_artifact(files["next"])
    for name, delta in dense.items():
        assert torch.equal(before.tensor(name) + delta, after.tensor(name))


def _corrupt(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 + 50] ^= 0xFF
    out = path.with_name("corrupt-" + path.name)
    out.write_bytes(bytes(data))
    return out


def _with_nan(global_file: Path, path: Path) -> Path:
    state = read_artifact(global_file)
    tensors = dict(state.iter_tensors())
    first = next(iter(tensors))
    tensors[first] = tensors[first].clone()
    tensors[first][0, 0] = float("inf")
    header = replace(state.header, parent_hash=state.header.content_hash)
    from fedsrd_cli.files.safetensors_io import content_hash

    meta = {**header.to_metadata(), "fedsrd.content_hash": content_hash(tensors)}
    path.write_bytes(b"".join(encode_safetensors(tensors, meta)))
    return path


def _other_rank_local(tmp: Path) -> Path:
    other = make_global(tmp / "other-g.safetensors", rank=2)
    return make_local(other, tmp / "other-rank-local.safetensors", seed=5)


def _missing_module_local(global_file: Path, tmp: Path) -> Path:
    state = read_artifact(global_file)
    tensors = {n: t + 0.01 for n, t in state.iter_tensors() if "layers.1.mlp.up_proj" not in n}
    header = replace(state.header, parent_hash=state.header.content_hash)
    write_artifact(tmp / "missing-module.safetensors", header, tensors)
    return tmp / "missing-module.safetensors"


def _unknown_module_local(global_file: Path, tmp: Path) -> Path:
    state = read_artifact(global_file)
    tensors = {n: t + 0.01 for n, t in state.iter_tensors()}
    tensors["base_model.model.extra.lora_A.weight"] = torch.ones(4, 8)
    tensors["base_model.model.extra.lora_B.weight"] = torch.ones(8, 4)
    header = replace(state.header, parent_hash=state.header.content_hash)
    write_artifact(tmp / "unknown-module.safetensors", header, tensors)
    return tmp / "unknown-module.safetensors"


def _shape_mismatch_upload(tmp: Path, files) -> Path:
    other = make_global(tmp / "g-wide.safetensors", seed=0)
    state = read_artifact(other)
    # Same rank and names, one module with another d_in, and a parent hash equal to g0's.
    tensors = {n: t for n, t in state.iter_tensors()}
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[name] = torch.zeros(4, 40)
    header = replace(state.header, parent_hash=read_artifact(files["g0"]).header.content_hash)
    write_artifact(tmp / "wide-local.safetensors", header, tensors)
    return tmp / "wide-local.safetensors"


@pytest.fixture
def world(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    files = run_round(tmp_path, g0)
    files["g0"] = g0
    return tmp_path, files


BAD_INPUTS = {
    "missing file": lambda t, f: (["inspect", t / "nope.safetensors"], "no such file", 3),
    "truncated": lambda t, f: (
        ["aggregate", "--global", f["g0"], "--out", t / "x.safetensors", _truncate(f["uploads"][0])],
        "truncated or corrupt",
        3,
    ),
    "corrupt copy": lambda t, f: (
        ["apply", "--global", f["g0"], "--broadcast", _corrupt(f["broadcast"]), "--out", t / "x.safetensors"],
        "corrupt",
        3,
    ),
    "wrong kind": lambda t, f: (
        ["aggregate", "--global", f["g0"], "--out", t / "x.safetensors", f["broadcast"]],
        "expected an upload",
        4,
    ),
    "stale upload": lambda t, f: (
        ["aggregate", "--global", f["next"], "--out", t / "x.safetensors", *f["uploads"]],
        "belongs to round 1",
        4,
    ),
    "stale local": lambda t, f: (
        [
            "sparsify",
            "--global",
            f["next"],
            "--local",
            t / "local-r1-0.safetensors",
            "--client",
            "a",
            "--out",
            t / "x.safetensors",
        ],
        "was trained from state",
        4,
    ),
    "lora mismatch": lambda t, f: (
        [
            "sparsify",
            "--global",
            f["g0"],
            "--local",
            _other_rank_local(t),
            "--client",
            "a",
            "--out",
            t / "x.safetensors",
        ],
        "LoRA config r=2",
        4,
    ),
    "missing modules": lambda t, f: (
        [
            "sparsify",
            "--global",
            f["g0"],
            "--local",
            _missing_module_local(f["g0"], t),
            "--client",
            "a",
            "--out",
            t / "x.safetensors",
        ],
        "lacks 2 LoRA tensors",
        4,
    ),
    "unknown modules": lambda t, f: (
        [
            "sparsify",
            "--global",
            f["g0"],
            "--local",
            _unknown_module_local(f["g0"], t),
            "--client",
            "a",
            "--out",
            t / "x.safetensors",
        ],
        "tensors the global state does not",
        4,
    ),
    "shape mismatch": lambda t, f: (
        [
            "sparsify",
            "--global",
            f["g0"],
            "--local",
            _shape_mismatch_upload(t, f),
            "--client",
            "a",
            "--out",
            t / "x.safetensors",
        ],
        "has shape [4, 40]",
        4,
    ),
    "same client twice": lambda t, f: (
        ["aggregate", "--global", f["g0"], "--out", t / "x.safetensors", f["uploads"][0], f["uploads"][0]],
        "already uploaded",
        4,
    ),
    "nan": lambda t, f: (
        [
            "sparsify",
            "--global",
            f["g0"],
            "--local",
            _with_nan(f["g0"], t / "nan.safetensors"),
            "--client",
            "a",
            "--out",
            t / "x.safetensors",
        ],
        "NaN or Inf",
        3,
    ),
    "aggregate of another state": lambda t, f: (
        [
            "broadcast",
            "--global",
            f["next"],
            "--aggregate",
            f["aggregate"],
            "--out",
            t / "x.safetensors",
            "--out-global",
            t / "y.safetensors",
        ],
        "not from",
        4,
    ),
    "broadcast for another state": lambda t, f: (
        ["apply", "--global", f["next"], "--broadcast", f["broadcast"], "--out", t / "x.safetensors"],
        "update of state",
        4,
    ),
    "bad flag value": lambda t, f: (
        [
            "broadcast",
            "--global",
            f["g0"],
            "--aggregate",
            f["aggregate"],
            "--out",
            t / "x.safetensors",
            "--out-global",
            t / "y.safetensors",
            "--download-sparsity",
            "1.0",
        ],
        "--download-sparsity must be in [0, 0.999]",
        2,
    ),
}


def _truncate(path: Path) -> Path:
    out = path.with_name("truncated-" + path.name)
    out.write_bytes(path.read_bytes()[:-64])
    return out


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_line_and_no_output(world, case):
    tmp, files = world
    args, message, code = BAD_INPUTS[case](tmp, files)
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0]
    assert not (tmp / "x.safetensors").exists() and not (tmp / "y.safetensors").exists()
    assert not [p for p in tmp.iterdir() if p.name.endswith(".tmp")]


def test_existing_output_is_never_overwritten_without_force(world):
    tmp, files = world
    before = files["aggregate"].read_bytes()
    result = runner.invoke(
        app,
        [
            "aggregate",
            "--global",
            str(files["g0"]),
            "--out",
            str(files["aggregate"]),
            *map(str, files["uploads"]),
        ],
    )
    assert result.exit_code == 5 and "already exists (pass --force" in result.output
    assert files["aggregate"].read_bytes() == before
    run("aggregate", "--global", files["g0"], "--out", files["aggregate"], "--force", *files["uploads"])


def test_samples_weighting_needs_sample_counts(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    local = make_local(g0, tmp_path / "l.safetensors", seed=1, num_samples=0)
    run("sparsify", "--global", g0, "--local", local, "--client", "a", "--out", tmp_path / "u.safetensors")
    result = run(
        "aggregate",
        "--global",
        g0,
        "--out",
        tmp_path / "a.safetensors",
        "--weighting",
        "samples",
        tmp_path / "u.safetensors",
        code=4,
    )
    assert "records no sample count" in result.output


def test_bad_client_id_is_a_usage_error(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    local = make_local(g0, tmp_path / "l.safetensors", seed=1)
    result = run(
        "sparsify",
        "--global",
        g0,
        "--local",
        local,
        "--client",
        "../evil",
        "--out",
        tmp_path / "u.safetensors",
        code=2,
    )
    assert "--client" in result.output


def _tiny_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.slow
def test_init_and_a_peft_adapter_saved_by_save_pretrained(tmp_path):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = _tiny_llama(tmp_path / "base")
    g0 = tmp_path / "g0.safetensors"
    run("init", "--base", base, "--rank", 4, "--alpha", 8, "--targets", "q_proj,v_proj", "--out", g0)
    state = read_artifact(g0)
    assert state.header.lora == LoraSpec(4, 8.0, ("q_proj", "v_proj"))
    assert len(state.modules()) == 4
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, local_files_only=True),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    result = set_peft_model_state_dict(model, dict(state.iter_tensors()))
    assert not result.unexpected_keys
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.01)
    model.save_pretrained(tmp_path / "adapter")
    up = tmp_path / "up.safetensors"
    run(
        "sparsify",
        "--global",
        g0,
        "--local",
        tmp_path / "adapter",
        "--client",
        "site-a",
        "--samples",
        12,
        "--out",
        up,
    )
    upload = read_artifact(up)
    assert upload.header.num_samples == 12 and upload.header.layout
    run(
        "sparsify",
        "--global",
        g0,
        "--local",
        tmp_path / "adapter" / "adapter_model.safetensors",
        "--client",
        "site-a",
        "--out",
        tmp_path / "up2.safetensors",
    )


def _console(*args, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fedsrd")
    # This checkout's package, whatever the cwd (a relative PYTHONPATH would not follow it).
    src = str(Path(fedsrd_cli.__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [str(exe), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "120", "PYTHONPATH": pythonpath},
    )


@pytest.mark.slow
def test_console_script_round_and_error_exit_codes(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    local = make_local(g0, tmp_path / "l.safetensors", seed=3)
    done = _console(
        "sparsify",
        "--global",
        g0,
        "--local",
        local,
        "--client",
        "a",
        "--out",
        "u.safetensors",
        "--json",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kind"] == "upload"
    done = _console("aggregate", "--global", g0, "--out", "agg.safetensors", "u.safetensors", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = _console(
        "broadcast",
        "--global",
        g0,
        "--aggregate",
        "agg.safetensors",
        "--out",
        "bc.safetensors",
        "--out-global",
        "g1.safetensors",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    done = _console(
        "apply", "--global", g0, "--broadcast", "bc.safetensors", "--out", "g1c.safetensors", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "g1.safetensors").read_bytes() == (tmp_path / "g1c.safetensors").read_bytes()
    failed = _console(
        "apply",
        "--global",
        "g1.safetensors",
        "--broadcast",
        "bc.safetensors",
        "--out",
        "g2.safetensors",
        cwd=tmp_path,
    )
    assert failed.returncode == 4
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    debug = _console(
        "--debug",
        "apply",
        "--global",
        "g1.safetensors",
        "--broadcast",
        "bc.safetensors",
        "--out",
        "g2.safetensors",
        cwd=tmp_path,
    )
    assert "Traceback" in debug.stderr


def test_server_side_commands_do_not_import_transformers_peft_or_bitsandbytes():
    code = (
        "import sys; from typer.testing import CliRunner; from fedsrd_cli.cli import app; "
        "CliRunner().invoke(app, ['--help']); "
        "import fedsrd_cli.algorithms, fedsrd_cli.files.describe; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft', 'bitsandbytes')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_help_of_fedsrd_and_of_every_command_does_not_import_torch():
    """Issue 32, row 14: `fedsrd --help` imported torch (2.4 s where the docs said 0.15 s). The
    console script's entry point, run as the script runs it, for `--help` and `COMMAND --help`."""
    code = (
        "import contextlib, io, sys, typer\n"
        "from fedsrd_cli.entry import main\n"
        "from fedsrd_cli.cli import app\n"
        "names = sorted(c.name for c in typer.main.get_command(app).commands.values())\n"
        "for args in [['--help']] + [[name, '--help'] for name in names]:\n"
        "    sys.argv = ['fedsrd', *args]\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(io.StringIO()):\n"
        "            main()\n"
        "    except SystemExit as done:\n"
        "        assert done.code in (0, None), (args, done.code)\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft'})\n"
        "print(len(names), heavy)\n"
    )
    src = str(Path(fedsrd_cli.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p),
    }
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    count, heavy = done.stdout.split(" ", 1)
    assert int(count) >= 19 and heavy.strip() == "[]", done.stdout


def test_bf16_values_round_trip_through_a_round(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    uploads = []
    for i in range(2):
        local = make_local(g0, tmp_path / f"l{i}.safetensors", seed=i + 1)
        uploads.append(tmp_path / f"u{i}.safetensors")
        run(
            "sparsify",
            "--global",
            g0,
            "--local",
            local,
            "--client",
            f"c{i}",
            "--value-dtype",
            "bf16",
            "--out",
            uploads[-1],
        )
    upload = read_artifact(uploads[0])
    assert {upload.dtypes[n] for n in upload.names if n.endswith(".values")} == {torch.bfloat16}
    run("aggregate", "--global", g0, "--out", tmp_path / "a.safetensors", *uploads)
    run(
        "broadcast",
        "--global",
        g0,
        "--aggregate",
        tmp_path / "a.safetensors",
        "--value-dtype",
        "fp16",
        "--out",
        tmp_path / "b.safetensors",
        "--out-global",
        tmp_path / "g1.safetensors",
    )
    run(
        "apply",
        "--global",
        g0,
        "--broadcast",
        tmp_path / "b.safetensors",
        "--out",
        tmp_path / "c1.safetensors",
    )
    assert (tmp_path / "g1.safetensors").read_bytes() == (tmp_path / "c1.safetensors").read_bytes()


@pytest.fixture
def keep_threads():
    """Commands run in this process set torch's thread count; put it back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_are_reported_and_a_bad_count_refused(tmp_path, keep_threads):
    g0 = make_global(tmp_path / "g0.safetensors")
    local = make_local(g0, tmp_path / "l.safetensors", seed=1)
    run("sparsify", "--global", g0, "--local", local, "--client", "c", "--out", tmp_path / "u.safetensors")
    done = run(
        "aggregate",
        "--json",
        "--threads",
        "1",
        "--global",
        g0,
        "--out",
        tmp_path / "a.safetensors",
        tmp_path / "u.safetensors",
    )
    report = json.loads(done.output)
    assert report["threads"] == 1 and report["truncation"] == "exact"
    refused = runner.invoke(
        app,
        [
            "aggregate",
            "--threads",
            "0",
            "--global",
            str(g0),
            "--out",
            str(tmp_path / "b.safetensors"),
            str(tmp_path / "u.safetensors"),
        ],
    )
    assert refused.exit_code == 2 and "--threads must be in [1," in refused.output
    assert not (tmp_path / "b.safetensors").exists()


def test_idle_cores_reads_a_count_between_zero_and_the_cores():
    from fedsrd_cli.math.threads import idle_cores

    idle = idle_cores(0.02)
    assert idle is None or 0.0 <= idle <= (os.cpu_count() or 1) + 0.01


def test_both_truncations_give_the_same_round(tmp_path, keep_threads):
    """aggregate --truncation randomized and exact: the same rank-r W to 1e-6 of the update, and
    the randomized route is reproducible bit for bit (its sketch is seeded by module)."""
    g0 = make_global(tmp_path / "g0.safetensors")
    uploads = []
    for i in range(3):
        local = make_local(g0, tmp_path / f"l{i}.safetensors", seed=i + 1)
        uploads.append(tmp_path / f"u{i}.safetensors")
        run("sparsify", "--global", g0, "--local", local, "--client", f"c{i}", "--out", uploads[-1])
    outs = {}
    for route in ("exact", "randomized", "randomized-again"):
        outs[route] = tmp_path / f"a-{route}.safetensors"
        done = run(
            "aggregate",
            "--json",
            "--truncation",
            route.split("-")[0],
            "--global",
            g0,
            "--out",
            outs[route],
            *uploads,
        )
        assert json.loads(done.output)["truncation"] == route.split("-")[0]
    exact, randomized = read_artifact(outs["exact"]), read_artifact(outs["randomized"])
    state = read_artifact(g0)
    for module in state.modules():
        left_name, right_name = naming.aggregate_keys(module)
        w_exact = exact.tensor(left_name).double() @ exact.tensor(right_name).double()
        w_random = randomized.tensor(left_name).double() @ randomized.tensor(right_name).double()
        a_prev, b_prev = state.factors(module)
        update = torch.linalg.matrix_norm(w_exact - b_prev.double() @ a_prev.double())
        assert (torch.linalg.matrix_norm(w_random - w_exact) / update).item() < 1e-5, module
    assert outs["randomized"].read_bytes() == outs["randomized-again"].read_bytes()
