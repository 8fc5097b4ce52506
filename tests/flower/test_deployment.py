"""A real Flower deployment on loopback: flower-superlink, two flower-supernode processes, `flwr run`.

Two signed FedSRD rounds on a tiny model; the final global state (and every round's files) must be
bit for bit what the file-based CLI makes from the same inputs and seeds. The test picks free
ports on 127.0.0.1, keeps Flower's home, logs and files in its tmp directory, bounds every wait,
and stops every process it started (and their children) whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install -e '.[flower]'")

from fedsrd_cli.files.artifacts import read_artifact  # noqa: E402

from ..conftest import TINY_RECORDS, write_jsonl  # noqa: E402
from .support import make_keys  # noqa: E402

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "flower"
RUN_SECONDS = 240  # the whole `flwr run`; it takes about a minute on 2 busy cores
CLIENTS = ("alice", "bob")

pytestmark = pytest.mark.skipif(
    not (BIN / "flower-superlink").exists() or not (BIN / "flower-supernode").exists(),
    reason="Flower's flower-superlink / flower-supernode are not installed beside this Python",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _children() -> dict[int, list[int]]:
    """{pid: child pids}, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextmanager
def processes() -> Iterator[list[subprocess.Popen]]:
    """Popen objects started inside are stopped on exit, with every process they started."""
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        targets = []
        for process in started:
            targets += [process.pid, *_descendants(process.pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in targets:
                with suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 15
            while any(_alive(p) for p in targets) and time.monotonic() < deadline:
                for process in started:
                    process.poll()
                time.sleep(0.2)
        for process in started:
            process.wait(timeout=5)


def start(started: list[subprocess.Popen], args: list[str], log: Path, env: dict[str, str]) -> None:
    handle = log.open("wb")
    started.append(subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=log.parent))
    handle.close()


def wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args[0]} exited: {log.read_text()[-2000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {seconds} s: {log.read_text()[-2000:]}")


def run_cli_subprocess(env: dict[str, str]):  # noqa: ANN201
    def run(*args: object) -> None:
        done = subprocess.run(
            [str(BIN / "fedsrd"), *map(str, args)], capture_output=True, text=True, env=env, timeout=300
        )
        assert done.returncode == 0, (args, done.stderr)

    return run


# The CLI's rounds, in one process of their own (one import of torch instead of one per command),
# with the environment the SuperNodes get.
CLI_REFERENCE = """
import json, sys
from pathlib import Path
from typer.testing import CliRunner
from fedsrd_cli.cli import app
from tests.flower.support import cli_rounds

args = json.loads(sys.argv[1])
runner = CliRunner()

def run_cli(*command):
    result = runner.invoke(app, [str(a) for a in command])
    assert result.exit_code == 0, (command, result.output)

keys = {k: Path(v) for k, v in args["keys"].items()}
g0 = Path(args["cli"]) / "global-r0.safetensors"
run_cli("init", "--base", args["model"], "--rank", 4, "--alpha", 8, "--seed", 5, "--out", g0,
        "--sign-key", keys["keys"] / "coordinator.key")
data = {c: Path(p) for c, p in args["data"].items()}
cli_rounds(run_cli, Path(args["cli"]), Path(args["model"]), data, g0, [1, 2], seed=5, steps=2,
           max_length=128, keys=keys)
"""


@pytest.mark.slow
def test_two_flower_rounds_on_a_real_superlink_match_the_cli(tiny_model: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "OMP_NUM_THREADS": "1",  # the same threads for the CLI and the ClientApps: the same bits
        "HF_HUB_OFFLINE": "1",
    }
    run_cli = run_cli_subprocess(env)
    data = {
        "alice": write_jsonl(tmp_path / "alice.jsonl", TINY_RECORDS[:3]),
        "bob": write_jsonl(tmp_path / "bob.jsonl", TINY_RECORDS[3:]),
    }
    evaluation = write_jsonl(tmp_path / "eval.jsonl", TINY_RECORDS)
    keys = make_keys(tmp_path, CLIENTS, run_cli)

    # ------------------------------------------------------------------ the CLI, on files
    cli = tmp_path / "cli"
    cli.mkdir()
    reference = {
        "cli": str(cli),
        "model": str(tiny_model),
        "data": {c: str(p) for c, p in data.items()},
        "keys": {k: str(p) for k, p in keys.items()},
    }
    done = subprocess.run(
        [sys.executable, "-c", CLI_REFERENCE, json.dumps(reference)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=RUN_SECONDS,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    g2 = cli / "global-r2.safetensors"

    # ------------------------------------------------------------------ the same on Flower
    link_port = free_port()
    home = Path(env["FLWR_HOME"])
    home.mkdir()
    connection = f'[superlink.test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n{connection}')
    out = tmp_path / "server"
    run_config = {
        "out": str(out),
        "base": str(tiny_model),
        "clients": ",".join(CLIENTS),
        "rounds": 2,
        "seed": 5,
        "rank": 4,
        "alpha": 8.0,
        "local-steps": 2,
        "max-length": 128,
        "sign-key": str(keys["keys"] / "coordinator.key"),
        "trust": str(keys["trust-server"]),
        "round-timeout": 180.0,
        "connect-timeout": 60.0,
    }
    overrides = tmp_path / "run-config.toml"  # `flwr run --run-config FILE`: TOML values
    overrides.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
    with processes() as started:
        link_log = tmp_path / "superlink.log"
        link = [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port)]
        start(started, [*link, "--disable-runtime-dependency-installation"], link_log, env)
        wait_for_port(link_port, started[0], link_log)
        for client in CLIENTS:
            node_config = {
                "client-id": client,
                "base": str(tiny_model),
                "data": str(data[client]),
                "eval-data": str(evaluation),
                "state-dir": str(tmp_path / f"site-{client}"),
                "sign-key": str(keys["keys"] / f"{client}.key"),
                "trust": str(keys[f"trust-{client}"]),
                "device": "cpu",
            }
            start(
                started,
                [
                    str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                    "--host", "127.0.0.1", "--port", str(free_port()), "--max-wait-time", "60",
                    "--node-config", " ".join(f'{k}="{v}"' for k, v in node_config.items()),
                ],
                tmp_path / f"supernode-{client}.log",
                env,
            )  # fmt: skip
        begun = time.monotonic()
        done = subprocess.run(
            [str(BIN / "flwr"), "run", str(EXAMPLE), "test", "--stream", "--run-config", str(overrides)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=RUN_SECONDS,
        )
        seconds = time.monotonic() - begun
    logs = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, logs
    assert (out / "global-r2.safetensors").is_file(), logs

    # bit for bit: the coordinator's and each site's final state, and every round's files
    assert (out / "global-r2.safetensors").read_bytes() == g2.read_bytes()
    for client in CLIENTS:
        site_state = tmp_path / f"site-{client}" / "global-r2.safetensors"
        assert (
            read_artifact(site_state, kind="state").header.content_hash
            == read_artifact(g2).header.content_hash
        )
    for round_index in (1, 2):
        for name in (
            "aggregate.safetensors",
            "broadcast.safetensors",
            *(f"upload-{c}.safetensors" for c in CLIENTS),
        ):
            flower_file = out / f"round-{round_index}" / name
            assert flower_file.read_bytes() == (cli / f"round-{round_index}" / name).read_bytes(), flower_file
    rounds = json.loads((out / "results.json").read_text())["runs"]["fedsrd"]["5"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds[1:]:
        assert record["participants"] == list(CLIENTS) and record["extra"]["refused"] == []
        assert record["extra"]["applied"] == list(CLIENTS) and set(record["eval_loss"]) == set(CLIENTS)
    print(f"flwr run: 2 rounds in {seconds:.1f} s")
