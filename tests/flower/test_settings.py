"""The parts of fedsrd_cli.flower that do not need Flower: settings, the sampler, and that nothing
else imports flwr. These run without the [flower] extra."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from fedsrd_cli.errors import UsageError
from fedsrd_cli.flower.coordinator import sample_clients
from fedsrd_cli.flower.settings import ServerSettings, SiteSettings
from fedsrd_cli.simulation.config import SimulateConfig
from fedsrd_cli.simulation.rounds import _choose

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flower" / "pyproject.toml"


def test_sampler_draws_what_simulate_draws() -> None:
    clients = ("a", "b", "c", "d", "e")
    config = SimulateConfig(
        base="m", client_data=clients, client_ids=clients, eval_data=("x",), eval_names=("x",),
        algorithms=("fedsrd",), rounds=3, sample_clients=2, seed=7,
    )  # fmt: skip
    for round_index in range(1, 6):
        expected = [clients[i] for i in _choose(config, 7, round_index)]
        assert sample_clients(clients, 2, 7, round_index) == expected
    assert sample_clients(clients, 0, 7, 1) == list(clients)  # 0: everyone


def test_run_config_is_checked_with_the_flags_messages() -> None:
    good = {"out": "o", "base": "b", "clients": "a, b ,c", "sample-clients": 2, "alpha": 8}
    settings = ServerSettings.from_run_config(good)
    assert settings.client_list == ("a", "b", "c") and settings.alpha == 8.0
    assert settings.sparsify_config().base_sparsity == 0.85  # the method's default
    assert ServerSettings.from_run_config({**good, "method": "fedavg"}).download_sparsity_for() == 0.0
    assert settings.broadcast_config(0.8, 0).server_lr == 1.0
    assert (
        ServerSettings.from_run_config({**good, "server-lr": 0.25}).broadcast_config(0.8, 0).server_lr == 0.25
    )
    late = ServerSettings.from_run_config({**good, "server-lr": 0.25, "server-lr-from": 3})
    assert [late.broadcast_config(0.8, 0, r).server_lr for r in (1, 2, 3, 4)] == [1.0, 1.0, 0.25, 0.25]
    assert "server_lr_from" in late.record() and "server_lr_from" not in settings.record()
    calibrated = ServerSettings.from_run_config({**good, "server-lr": 2.0, "calibrate-step": True})
    assert calibrated.broadcast_config(0.8, 0).calibrate_step is True
    assert settings.broadcast_config(0.8, 0).calibrate_step is False
    fedexp = ServerSettings.from_run_config({**good, "method": "fedavg", "step-rule": "fedexp"})
    assert fedexp.broadcast_config(0.8, 0).step_rule == "fedexp" and fedexp.aggregate_config(0).update_spread
    assert fedexp.record()["step_rule"] == "fedexp" and "step_rule" not in settings.record()
    assert not settings.aggregate_config(0).update_spread
    sketched = ServerSettings.from_run_config({**good, "step-rule": "fedexp"})  # fedsrd: sites sketch
    assert sketched.sparsify_config().update_sketch and not fedexp.sparsify_config().update_sketch
    assert not settings.sparsify_config().update_sketch
    secure = {**good, "method": "fedsrd-e", "secure": True, "sign-key": "k", "trust": "t"}
    assert ServerSettings.from_run_config({**secure, "step-rule": "fedexp"}).aggregate_config(0).update_spread
    for bad, message in (
        ({"method": "nope"}, "unknown method"),
        ({"sample-clients": 4}, "at most the 3 clients"),
        ({"rank": "4"}, "expected an integer"),
        ({"typo": 1}, "unknown key 'typo'"),
        ({"value-dtype": "fp8"}, "value-dtype"),
        ({"base": ""}, "initial-state"),
        ({"server-lr": 0.0}, "server-lr"),
        ({"server-lr-from": 0}, "server-lr-from"),
        ({"step-rule": "adam"}, "step-rule"),
    ):
        with pytest.raises(UsageError, match=message):
            ServerSettings.from_run_config({**good, **bad})


def test_node_config_is_checked() -> None:
    node = {
        "client-id": "site-a",
        "base": "m",
        "data": "x.jsonl, y.jsonl",
        "state-dir": "s",
        "partition-id": 0,
    }
    settings = SiteSettings.from_node_config(node)
    assert settings.data_files == (Path("x.jsonl"), Path("y.jsonl")) and settings.eval_files == ()
    with pytest.raises(UsageError, match="client-id"):
        SiteSettings.from_node_config({**node, "client-id": "-bad"})
    with pytest.raises(UsageError, match="state-dir"):
        SiteSettings.from_node_config({**node, "state-dir": ""})
    assert not settings.refuse_spread
    assert SiteSettings.from_node_config({**node, "refuse-spread": True}).refuse_spread  # sparsify's flag


def test_the_example_app_lists_every_run_config_key() -> None:
    """`flwr run --run-config` overrides only keys the app declares, so it declares them all."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11 (so is Flower)")
    declared = tomllib.loads(EXAMPLE.read_text())["tool"]["flwr"]["app"]["config"]
    assert set(declared) == {f.name.replace("_", "-") for f in fields(ServerSettings)}
    defaults = {f.name.replace("_", "-"): f.default for f in fields(ServerSettings)}
    for key, value in declared.items():
        assert type(value) is type(defaults[key]), key  # a TOML int where a float is expected would stick
    ServerSettings.from_run_config(declared)


def test_nothing_else_imports_flwr() -> None:
    """The CLI and every module outside fedsrd_cli.flower load without Flower; so do its flwr-free parts."""
    code = (
        "import sys, pkgutil, importlib, fedsrd_cli\n"
        "names = [m.name for m in pkgutil.walk_packages(fedsrd_cli.__path__, 'fedsrd_cli.')]\n"
        "skip = ('fedsrd_cli.flower.wire', 'fedsrd_cli.flower.strategy', 'fedsrd_cli.flower.apps')\n"
        "for name in names:\n"
        "    if name not in skip:\n"
        "        importlib.import_module(name)\n"
        "import fedsrd_cli.cli\n"
        "assert not [m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')], 'flwr was imported'\n"
        "print(len(names))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 20


def test_a_site_never_keeps_a_state_that_fails_its_checks(tmp_path: Path) -> None:
    from fedsrd_cli.errors import ArtifactError
    from fedsrd_cli.files.artifacts import read_artifact
    from fedsrd_cli.flower.site import Site

    from ..conftest import make_global

    good = make_global(tmp_path / "g0.safetensors").read_bytes()
    digest = read_artifact(tmp_path / "g0.safetensors").header.content_hash
    site = Site(SiteSettings(client_id="a", base="m", data="d.jsonl", state_dir=str(tmp_path / "site")))
    tampered = bytearray(good)
    tampered[-1] ^= 1
    with pytest.raises(ArtifactError, match="content hash mismatch"):
        site.state(0, digest, bytes(tampered))
    assert not site.holds(0, digest) and not site.state_path(0).exists()
    assert list((tmp_path / "site").iterdir()) == []
    assert site.state(0, digest, good).header.content_hash == digest and site.holds(0, digest)


def test_dp_settings_are_checked_and_reach_every_step() -> None:
    good = {"out": "o", "base": "b", "clients": "a,b,c", "rounds": 4}
    plain = ServerSettings.from_run_config(good)
    assert plain.record_dp() is None and plain.organisation_dp is None
    assert not any(key.startswith("dp_") or key == "require_dp" for key in plain.record())
    private = ServerSettings.from_run_config({**good, "dp-epsilon": 8.0, "require-dp": 8.0})
    assert private.record_dp().planned_rounds == 4 and private.record()["dp_rounds"] == 4
    assert private.aggregate_config(sampled=3).require_dp == 8.0
    org = ServerSettings.from_run_config(
        {
            **good,
            "method": "fedsrd-e",
            "dp-org-clip": 0.1,
            "dp-org-noise-multiplier": 1.0,
            "dp-org-delta": 1e-4,
        }
    )
    config = org.aggregate_config(sampled=2, population=3).organisation_dp
    assert (config.clip, config.sampled, config.population) == (0.1, 2, 3)
    assert org.broadcast_config(0.8, 1).factor_choice == "b"
    for bad, message in (
        ({"dp-epsilon": 8.0, "dp-noise-multiplier": 1.0}, "exactly one"),
        ({"dp-rounds": 3}, "dp-rounds"),
        ({"dp-org-clip": 0.1}, "dp-org-noise-multiplier"),
        ({"dp-org-clip": 0.1, "dp-org-noise-multiplier": 1.0, "dp-org-delta": 1e-4}, "fedsrd-e only"),
    ):
        with pytest.raises(UsageError, match=message):
            ServerSettings.from_run_config({**good, **bad})
    node = {"client-id": "a", "base": "m", "data": "x.jsonl", "state-dir": "s"}
    assert SiteSettings.from_node_config({**node, "dp-max-epsilon": 3.0}).dp_max_epsilon == 3.0
    with pytest.raises(UsageError, match="dp-max-epsilon"):
        SiteSettings.from_node_config({**node, "dp-max-epsilon": 0.0})
