"""FedSRD rounds through the real ServerApp strategy and ClientApp handlers, over an in-process grid.

`LocalGrid` stands in for the SuperLink: it hands each Message to the node's ClientApp (the very
`fedsrd_cli.flower.apps.client_app` a SuperNode runs) with that node's node config, and returns
the replies. The transport is the only thing replaced; test_deployment.py runs real processes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install -e '.[flower]'")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from fedsrd_cli.algorithms import ALGORITHMS  # noqa: E402
from fedsrd_cli.cli import app  # noqa: E402
from fedsrd_cli.files.artifacts import read_artifact  # noqa: E402
from fedsrd_cli.files.residual import read_residual  # noqa: E402
from fedsrd_cli.flower import wire  # noqa: E402
from fedsrd_cli.flower.apps import client_app  # noqa: E402
from fedsrd_cli.flower.coordinator import Coordinator, sample_clients  # noqa: E402
from fedsrd_cli.flower.settings import ServerSettings  # noqa: E402
from fedsrd_cli.flower.site import SECURE_RESIDUAL  # noqa: E402
from fedsrd_cli.flower.strategy import FedSRDStrategy  # noqa: E402

from ..conftest import TINY_RECORDS, write_jsonl  # noqa: E402
from .support import cli_rounds, make_keys  # noqa: E402

runner = CliRunner()
Intercept = Callable[[Message, Message], Message]


def run_cli(*args: object) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output)


class LocalGrid(Grid):
    """Delivers each message to `client_app` with its node's config; `intercept` may alter a reply."""

    def __init__(self, node_configs: dict[int, dict], intercept: Intercept | None = None) -> None:
        self.node_configs = node_configs
        self.intercept = intercept
        self.sent: list[Message] = []

    def set_run(self, run):  # noqa: ANN001, ANN201 (unused: there is no run)
        pass

    @property
    def run(self):  # noqa: ANN201
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_configs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            context = Context(1, node, self.node_configs[node], RecordDict(), {})
            reply = client_app(message, context)
            if self.intercept is not None:
                reply = self.intercept(message, reply)
            replies.append(reply)
        return replies


@pytest.fixture(autouse=True)
def task_identity():
    """Who sends the server's messages: set by a SuperLink in a real run, by hand here."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("flower-inputs")
    return {
        "model": tiny_model,
        "alice": write_jsonl(d / "alice.jsonl", TINY_RECORDS[:3]),
        "bob": write_jsonl(d / "bob.jsonl", TINY_RECORDS[3:]),
        "carol": write_jsonl(d / "carol.jsonl", TINY_RECORDS[1:5]),
        "eval": write_jsonl(d / "eval.jsonl", TINY_RECORDS),
    }


def node_configs(
    inputs: dict[str, Path], root: Path, clients: Iterable[str], **extra: dict
) -> dict[int, dict]:
    configs = {}
    for number, client in enumerate(clients, start=101):
        configs[number] = {
            "client-id": client,
            "base": str(inputs["model"]),
            "data": str(inputs[client]),
            "eval-data": str(inputs["eval"]),
            "state-dir": str(root / f"site-{client}"),
            "device": "cpu",
            **extra.get(client, {}),
        }
    return configs


def server(out: Path, model: Path, **settings: object) -> FedSRDStrategy:
    values = {
        "out": str(out),
        "base": str(model),
        "rank": 4,
        "alpha": 8.0,
        "local-steps": 2,
        "max-length": 128,
    }
    values.update(settings)
    lines: list[str] = []
    return FedSRDStrategy(Coordinator(ServerSettings.from_run_config(values), report=lines.append))


def records(out: Path, method: str = "fedsrd", seed: int = 0) -> list[dict]:
    return json.loads((out / "results.json").read_text())["runs"][method][str(seed)]


def test_wire_carries_the_file_bytes_unchanged(tmp_path: Path) -> None:
    from .. import conftest

    path = conftest.make_global(tmp_path / "g.safetensors")
    data = path.read_bytes()
    body = wire.content(config={"round": 0}, state=data)
    assert wire.artifact_bytes(body, wire.STATE) == data
    assert wire.artifact_bytes(body, wire.UPLOAD) is None
    from flwr.app import Array, ArrayRecord

    body["state"] = ArrayRecord({"file": Array(dtype="u8", shape=(3,), stype="numpy.ndarray", data=b"abc")})
    with pytest.raises(Exception, match="not a fedsrd artifact"):
        wire.artifact_bytes(body, wire.STATE)


@pytest.mark.slow
def test_refused_uploads_are_reported_and_the_round_goes_on(inputs: dict[str, Path], tmp_path: Path) -> None:
    """A forged signature and a replayed stale upload are refused; the others are aggregated."""
    clients = ["alice", "bob", "mallory"]
    inputs = {**inputs, "mallory": inputs["carol"]}
    keys = make_keys(tmp_path, clients, run_cli)
    # mallory signs with a key that is not the one the coordinator trusts as mallory's
    run_cli("keygen", "--out", tmp_path / "mallory", "--force")
    forged = tmp_path / "forged"
    forged.mkdir()
    shutil.move(tmp_path / "mallory.key", forged / "mallory.key")
    per_client = {
        c: {
            "sign-key": str((forged if c == "mallory" else keys["keys"]) / f"{c}.key"),
            "trust": str(keys[f"trust-{c}"]),
        }
        for c in clients
    }
    # mallory's own trust dir must hold the key it signs its states with
    (keys["trust-mallory"] / "mallory.pub").write_bytes((tmp_path / "mallory.pub").read_bytes())
    replayed: dict[str, bytes] = {}

    def replay_bob(message: Message, reply: Message) -> Message:
        """In round 2, bob's reply carries his round-1 upload again (validly signed, stale)."""
        if message.metadata.message_type != wire.TRAIN or reply.has_error():
            return reply
        config = wire.config_of(reply.content)
        upload = wire.artifact_bytes(reply.content, wire.UPLOAD)
        if config["client-id"] == "bob":
            if "bob" not in replayed:
                replayed["bob"] = upload
            else:
                reply.content["upload"] = wire.artifact_record(replayed["bob"])
        return reply

    grid = LocalGrid(node_configs(inputs, tmp_path, clients, **per_client), intercept=replay_bob)
    out = tmp_path / "server"
    settings = {
        "clients": ",".join(clients),
        "rounds": 2,
        "sign-key": str(keys["keys"] / "coordinator.key"),
        "trust": str(keys["trust-server"]),
    }
    server(out, inputs["model"], **settings).start(grid)

    first, second = records(out)[1:]
    assert first["participants"] == ["alice", "bob"]
    assert [r["client_id"] for r in first["extra"]["refused"]] == ["mallory"]
    assert "another key" in first["extra"]["refused"][0]["reason"]
    assert (out / "round-1" / "refused" / "upload-mallory.safetensors").is_file()
    assert second["participants"] == ["alice"]
    refused = {r["client_id"]: r["reason"] for r in second["extra"]["refused"]}
    assert sorted(refused) == ["bob", "mallory"]
    assert "belongs to round 1" in refused["bob"]
    # every node, refused or not, followed the broadcasts and holds the coordinator's state
    assert sorted(second["extra"]["applied"]) == clients
    final = read_artifact(out / "global-r2.safetensors", kind="state").header.content_hash
    for client in clients:
        assert (
            read_artifact(tmp_path / f"site-{client}" / "global-r2.safetensors").header.content_hash == final
        )
    assert second["global_hash"] == final


@pytest.mark.slow
def test_file_rounds_then_flower_rounds_with_sampling_and_a_restart(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    """Round 1 on files, rounds 2-3 on Flower (2 of 3 clients sampled, the server restarted in between):
    bit for bit the state three CLI rounds give."""
    data = {c: inputs[c] for c in ("alice", "bob", "carol")}
    cli = tmp_path / "cli"
    cli.mkdir()
    g0 = cli / "global-r0.safetensors"
    run_cli("init", "--base", inputs["model"], "--rank", 4, "--alpha", 8, "--seed", 3, "--out", g0)
    common = {"seed": 3, "steps": 2, "max_length": 128, "sample": 2}
    g1 = cli_rounds(run_cli, cli, inputs["model"], data, g0, [1], **common)
    g3 = cli_rounds(run_cli, cli, inputs["model"], data, g1, [2, 3], **common)

    grid = LocalGrid(node_configs(inputs, tmp_path, data))
    out = tmp_path / "server"
    settings = {"clients": "alice,bob,carol", "sample-clients": 2, "seed": 3, "initial-state": str(g1)}
    server(out, inputs["model"], rounds=2, **settings).start(grid)
    assert [r["round"] for r in records(out, seed=3)] == [1, 2]
    # the sites never saw global-r1 (a file round): the coordinator sent it with the initial evaluation
    assert all(
        (tmp_path / f"site-{c}" / "global-r1.safetensors").read_bytes() == g1.read_bytes() for c in data
    )
    server(out, inputs["model"], rounds=3, **settings).start(grid)  # a restart resumes at round 2
    rounds = records(out, seed=3)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for record in rounds[1:]:
        assert record["participants"] == sample_clients(list(data), 2, 3, record["round"])
        assert sorted(record["extra"]["applied"]) == sorted(data)
    assert (out / "global-r3.safetensors").read_bytes() == g3.read_bytes()
    assert (out / "round-2" / "broadcast.safetensors").read_bytes() == (
        cli / "round-2" / "broadcast.safetensors"
    ).read_bytes()
    for client in data:
        site_state = read_artifact(tmp_path / f"site-{client}" / "global-r3.safetensors", kind="state")
        assert site_state.header.content_hash == read_artifact(g3).header.content_hash
    # every file of a Flower round is an ordinary fedsrd file
    run_cli("inspect", out / "round-3" / "aggregate.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(ALGORITHMS))
def test_every_method_runs_a_flower_round(method: str, inputs: dict[str, Path], tmp_path_factory) -> None:
    root = tmp_path_factory.getbasetemp() / "every-method"  # the sites (and their loaded model) are shared
    configs = node_configs(inputs, root, ("alice", "bob"))
    for config in configs.values():
        config["eval-data"] = ""
    out = tmp_path_factory.mktemp(f"server-{method}")
    server(out, inputs["model"], method=method, clients="alice,bob", rounds=1, **{"local-steps": 1}).start(
        LocalGrid(configs)
    )
    record = records(out, method)[1]
    assert record["participants"] == ["alice", "bob"] and record["extra"]["refused"] == []
    assert sorted(record["extra"]["applied"]) == ["alice", "bob"]
    broadcast = read_artifact(out / "round-1" / "broadcast.safetensors", kind="broadcast")
    assert broadcast.header.method == method
    assert record["download_bytes"] == (out / "round-1" / "broadcast.safetensors").stat().st_size


@pytest.mark.slow
def test_server_lr_from_takes_the_step_from_that_round_on(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Run config server-lr-from: the rounds before it broadcast with step 1, as simulate's."""
    configs = node_configs(inputs, tmp_path, ("alice", "bob"))
    out = tmp_path / "server"
    settings = {"clients": "alice,bob", "rounds": 2, "local-steps": 1, "server-lr": 0.5, "server-lr-from": 2}
    server(out, inputs["model"], **settings).start(LocalGrid(configs))
    broadcasts = [read_artifact(out / f"round-{r}" / "broadcast.safetensors") for r in (1, 2)]
    steps = [broadcast.header.info.get("server_lr") for broadcast in broadcasts]
    assert steps == [None, 0.5]  # recorded only when not 1


@pytest.mark.slow
def test_a_fedexp_step_on_flower_reads_the_sites_sketches(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Run config step-rule fedexp with FedSRD: every site sketches its update, the aggregate
    estimates the spread from the sketches, and the broadcast takes FedExP's step."""
    configs = node_configs(inputs, tmp_path, ("alice", "bob"))
    out = tmp_path / "server"
    settings = {"clients": "alice,bob", "rounds": 1, "local-steps": 1, "step-rule": "fedexp"}
    server(out, inputs["model"], **settings).start(LocalGrid(configs))
    uploads = sorted((out / "round-1").glob("upload-*.safetensors"))
    assert len(uploads) == 2 and all("update_sketch" in read_artifact(u).header.info for u in uploads)
    spread = read_artifact(out / "round-1" / "aggregate.safetensors").header.info["update_spread"]
    assert spread["source"] == "sketches"
    broadcast = read_artifact(out / "round-1" / "broadcast.safetensors")
    assert broadcast.header.info.get("server_lr", 1.0) == spread["extrapolation"]


@pytest.mark.slow
def test_dp_rounds_on_flower_record_each_site_s_epsilon(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Every site trains with DP-SGD; the coordinator requires it; bob's own budget (node config
    dp-max-epsilon) is below what the plan's second round costs, so bob refuses that round."""
    configs = node_configs(inputs, tmp_path, ("alice", "bob"), bob={"dp-max-epsilon": 9.0})
    out = tmp_path / "server"
    settings = {"clients": "alice,bob", "rounds": 2, "dp-epsilon": 12.0, "require-dp": 12.0, "batch-size": 2}
    server(out, inputs["model"], **settings).start(LocalGrid(configs))
    first, second = records(out)[1:]
    assert first["participants"] == ["alice", "bob"]
    sites = first["extra"]["privacy"]["sites"]
    assert sites["alice"]["rounds"] == 1 and 0 < sites["alice"]["epsilon"] < 9.0
    assert second["participants"] == ["alice"]  # bob refused before training
    assert "past its budget 9" in second["extra"]["failed"][0]["reason"]
    assert second["extra"]["privacy"]["sites"]["alice"]["epsilon"] == pytest.approx(12.0, rel=0.02)
    assert second["extra"]["privacy"]["sites"]["bob"]["rounds"] == 1  # bob's record stays as it was


@pytest.mark.slow
def test_organisation_level_dp_on_flower(inputs: dict[str, Path], tmp_path: Path) -> None:
    configs = node_configs(inputs, tmp_path, ("alice", "bob", "carol"))
    out = tmp_path / "server"
    org = {
        "dp-org-clip": 0.05,
        "dp-org-noise-multiplier": 1.0,
        "dp-org-delta": 1e-3,
        "dp-org-sampling-rate": 0.7,
    }
    server(out, inputs["model"], method="fedsrd-e", clients="alice,bob,carol", rounds=2, **org).start(
        LocalGrid(configs)
    )
    last = records(out, "fedsrd-e")[-1]
    ledger = last["extra"]["privacy"]["organisation"]
    assert ledger["rounds"] == 2 and ledger["epsilon"] > 0
    broadcast = read_artifact(out / "round-2" / "broadcast.safetensors", kind="broadcast")
    assert broadcast.header.aggregate_hash == "" and broadcast.header.info["organisation_dp"]["noise_std"] > 0
    assert set(last["extra"]["sampled"]) <= {"alice", "bob", "carol"}
    assert sorted(last["extra"]["applied"]) == ["alice", "bob", "carol"]  # every site follows the broadcast


@pytest.mark.slow
def test_a_secure_round_on_flower_re_issues_the_roster_when_a_site_drops(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    """Secure rounds over Flower Messages, with the files of `sparsify --secure`: carol's first
    reply is lost, the coordinator signs a roster of alice and bob, they mask again, and every
    node follows the broadcast. The rosters send 16-bit words at half the positions: each site
    keeps the rest in its state folder, and round 2 sends it; FedExP's step comes from the
    sites' masked norms."""
    clients = ["alice", "bob", "carol"]
    keys = make_keys(tmp_path, clients, run_cli)
    for client in clients:
        run_cli("agreement-key", "--sign-key", keys["keys"] / f"{client}.key")
    for client in clients:  # every site trusts every site's identity and agreement key
        for other in clients:
            for suffix in (".pub", ".agreement"):
                shutil.copy(keys["keys"] / f"{other}{suffix}", keys[f"trust-{client}"] / f"{other}{suffix}")
    per_client = {
        c: {
            "sign-key": str(keys["keys"] / f"{c}.key"),
            "trust": str(keys[f"trust-{c}"]),
            "agreement-key": str(keys["keys"] / f"{c}.agreement.key"),
        }
        for c in clients
    }

    def lose_carol(message: Message, reply: Message) -> Message:
        if (
            message.metadata.message_type == wire.TRAIN
            and wire.config_of(reply.content)["client-id"] == "carol"
        ):
            return Message(Error(code=1, reason="the USB stick got lost"), reply_to=message)
        return reply

    grid = LocalGrid(node_configs(inputs, tmp_path, clients, **per_client), intercept=lose_carol)
    out = tmp_path / "server"
    settings = {
        "method": "fedsrd-e",
        "secure": True,
        "secure-density": 0.5,
        "word-bits": 16,
        "step-rule": "fedexp",
        "clients": ",".join(clients),
        "rounds": 2,
        "sign-key": str(keys["keys"] / "coordinator.key"),
        "trust": str(keys["trust-server"]),
    }
    server(out, inputs["model"], **settings).start(grid)
    record = records(out, "fedsrd-e")[1]
    assert record["participants"] == ["alice", "bob"] and record["extra"]["roster_attempt"] == 2
    assert sorted(record["extra"]["applied"]) == clients
    assert read_artifact(out / "round-1" / "upload-alice.safetensors").header.kind == "masked_upload"
    assert (
        out / "round-1" / "attempt-1" / "upload-alice.safetensors"
    ).is_file()  # the first mask, superseded
    upload = read_artifact(out / "round-1" / "upload-alice.safetensors")
    assert upload.header.info["secure"]["word_bits"] == 16 and upload.header.info["secure"]["density"] == 0.5
    assert upload.header.info["secure"]["spread"] is True  # step-rule fedexp: the roster asks for it
    broadcast = read_artifact(out / "round-1" / "broadcast.safetensors", kind="broadcast")
    assert broadcast.header.info["step_calibration"]["rule"] == "fedexp"
    final = read_artifact(out / "global-r2.safetensors", kind="state").header.content_hash
    for client in clients:
        site = tmp_path / f"site-{client}"
        assert read_artifact(site / "global-r2.safetensors").header.content_hash == final
    for client in ("alice", "bob"):  # what round 1 left, which round 2 sent and replaced
        kept = [read_residual(tmp_path / f"site-{client}" / f"round-{i}" / SECURE_RESIDUAL) for i in (1, 2)]
        assert [k.round for k in kept] == [1, 2]
