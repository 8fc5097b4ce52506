"""Crash safety: SIGKILL a writing command at random moments; no partial file, and a rerun finishes.

Each writing command runs as a real subprocess of the `fedsrd` console script and is killed
(even trials) after a seeded random delay drawn from the second half of its measured run time
(the first half is mostly Python and torch imports), or (odd trials) the moment a temporary
output file appears, i.e. in the middle of a write. Afterwards
every output path is either absent or a complete, valid artifact, and rerunning the same
command completes the round, leaving no temporary file behind.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.config import AggregateConfig, SparsifyConfig
from fedsrd_cli.errors import OutputExistsError
from fedsrd_cli.files.adapters import read_local
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
from fedsrd_cli.files.atomic import remove_stale_temp_files

from ..conftest import make_global, make_local

TRIALS = {"init": 2, "sparsify": 4, "aggregate": 4, "broadcast": 4, "apply": 4}
TINY_LLAMA = (
    '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,'
    ' "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,'
    ' "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}'
)
FEDSRD = (
    str(Path(sys.executable).with_name("fedsrd"))
    if Path(sys.executable).with_name("fedsrd").exists()
    else (shutil.which("fedsrd") or "fedsrd")
)


def _round_inputs(root: Path) -> dict[str, Path]:
    g0 = make_global(root / "g0.safetensors")
    state = read_artifact(g0)
    algorithm = get_algorithm("fedsrd")
    uploads = []
    for i, client in enumerate(("alice", "bob")):
        local = make_local(g0, root / f"local-{client}.safetensors", seed=i + 1)
        payload = algorithm.upload(state, read_local(local), client, 10, SparsifyConfig())
        path = root / f"up-{client}.safetensors"
        write_artifact(path, payload.header, payload.tensors)
        uploads.append(path)
    agg = algorithm.aggregate(state, [read_artifact(u) for u in uploads], AggregateConfig())
    write_artifact(root / "agg.safetensors", agg.header, agg.tensors)
    base = root / "base"
    base.mkdir()
    (base / "config.json").write_text(TINY_LLAMA)
    return {
        "g0": g0,
        "local": root / "local-alice.safetensors",
        "up0": uploads[0],
        "up1": uploads[1],
        "base": base,
    }


def _commands(inputs: dict[str, Path], out: Path) -> dict[str, tuple[list[str], list[Path]]]:
    """{name: (argv, output paths)} for every command that writes an artifact from these inputs."""
    root = inputs["g0"].parent
    bc_out = root / "ref-bc.safetensors"
    g0, agg, up0, up1 = inputs["g0"], root / "agg.safetensors", inputs["up0"], inputs["up1"]
    out_global = out.with_name(out.stem + "-global.safetensors")
    sparsify = ["sparsify", "--global", g0, "--local", inputs["local"], "--client", "alice", "--out", out]
    broadcast = ["broadcast", "--global", g0, "--aggregate", agg, "--out", out, "--out-global", out_global]
    return {
        "init": (["init", "--base", inputs["base"], "--out", out, "--rank", "4"], [out]),
        "sparsify": (sparsify, [out]),
        "aggregate": (["aggregate", "--global", g0, "--out", out, up0, up1], [out]),
        "broadcast": (broadcast, [out, out_global]),
        "apply": (["apply", "--global", g0, "--broadcast", bc_out, "--out", out], [out]),
    }


def _run(argv: list) -> subprocess.CompletedProcess:
    return subprocess.run([FEDSRD, *map(str, argv)], capture_output=True, text=True, timeout=120)


def _temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def crash_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Round inputs, the broadcast `apply` needs, and every command's uninterrupted output and run time."""
    root = tmp_path_factory.mktemp("crash")
    inputs = _round_inputs(root)
    assert _run(_commands(inputs, root / "ref-bc.safetensors")["broadcast"][0]).returncode == 0
    references = {}
    for name in TRIALS:
        argv, outputs = _commands(inputs, root / f"ref-{name}-out.safetensors")[name]
        start = time.monotonic()
        done = _run(argv)
        assert done.returncode == 0, done.stderr
        references[name] = (time.monotonic() - start, [p.read_bytes() for p in outputs])
    return {"root": root, "inputs": inputs, "references": references}


def _kill_at_write(proc: subprocess.Popen, directory: Path, limit_s: float) -> bool:
    """SIGKILL as soon as a temporary output file shows up (True), or after limit_s (False)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and proc.poll() is None:
        if _temp_files(directory):
            proc.send_signal(signal.SIGKILL)
            return True
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRIALS))
def test_sigkill_never_leaves_a_partial_artifact(crash_setup: dict, name: str) -> None:
    elapsed, reference = crash_setup["references"][name]
    rng = random.Random(f"crash-{name}")
    caught = 0
    for trial in range(TRIALS[name]):
        trial_dir = crash_setup["root"] / f"{name}-trial-{trial}"
        trial_dir.mkdir()
        argv, outputs = _commands(crash_setup["inputs"], trial_dir / "out.safetensors")[name]
        proc = subprocess.Popen(
            [FEDSRD, *map(str, argv)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if trial % 2 == 0:  # a random moment in the second half of the run
            time.sleep(rng.uniform(0.5 * elapsed, 1.05 * elapsed))
            proc.send_signal(signal.SIGKILL)
        else:  # the moment a temporary output file exists: in the middle of a write
            caught += _kill_at_write(proc, trial_dir, 3 * elapsed + 5)
        proc.wait(timeout=30)
        for path in outputs:  # absent, or complete and valid
            if path.exists():
                read_artifact(path)
        existed = [p.exists() for p in outputs]
        rerun = _run(argv)
        if all(existed):
            assert rerun.returncode == 5 and "already exists" in rerun.stderr, rerun.stderr
        else:
            assert rerun.returncode == 0, (trial, rerun.stderr)
        # The round is complete and identical to the uninterrupted run, with no temp file left.
        assert [p.read_bytes() for p in outputs] == reference
        assert _temp_files(trial_dir) == []
    print(f"{name}: {caught} of {TRIALS[name] // 2} kills landed while a temporary output file existed")


def test_rerun_removes_temp_files_of_dead_writers_only(tmp_path: Path) -> None:
    g0 = make_global(tmp_path / "g0.safetensors")
    out = tmp_path / "copy.safetensors"
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())[:64]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".{out.name}.{dead.pid}@{host}.abcd1234.tmp"
    live = tmp_path / f".{out.name}.{os.getpid()}@{host}.efgh5678.tmp"
    elsewhere = tmp_path / f".{out.name}.{dead.pid}@some-other-host.ijkl9012.tmp"
    other_output = tmp_path / f".other.safetensors.{dead.pid}@{host}.mnop3456.tmp"
    for path in (stale, live, elsewhere, other_output):
        path.write_bytes(b"partial")
    state = read_artifact(g0)
    write_artifact(out, state.header, dict(state.iter_tensors()))
    assert not stale.exists()
    assert live.exists() and elsewhere.exists() and other_output.exists()
    assert remove_stale_temp_files(out) == []
    # A rerun refused because the output is already complete also removes a dead writer's temp file.
    stale.write_bytes(b"partial")
    with pytest.raises(OutputExistsError):
        write_artifact(out, state.header, dict(state.iter_tensors()))
    assert not stale.exists() and live.exists()


def test_broadcast_rerun_after_crash_between_its_two_writes(tmp_path: Path) -> None:
    inputs = _round_inputs(tmp_path)
    argv, (bc, next_global) = _commands(inputs, tmp_path / "bc.safetensors")["broadcast"]
    assert _run(argv).returncode == 0
    reference = bc.read_bytes()
    bc.unlink()  # as if killed after the next state was renamed into place
    rerun = _run(argv)
    assert rerun.returncode == 0, rerun.stderr
    assert bc.read_bytes() == reference
    # A different next-state file in the way is still never replaced.
    bc.unlink()
    raw = bytearray(next_global.read_bytes())
    raw[-1] ^= 0xFF
    next_global.write_bytes(bytes(raw))
    assert _run(argv).returncode == 5
