"""What a `simulate` run keeps on disk between rounds: config.json, results.json, resuming.

config.json is `SimulateConfig.record()`, written once (`start_run`) after every input has been
checked. A rerun into the same RESULTS_DIR must give the same settings (only --rounds and
--device may differ): `load_results` refuses another run's directory, naming the settings that
differ, and otherwise returns the recorded results to continue from. `with_recorded_defaults`
first settles the settings left as None from that record (a run recorded when
--metrics-max-new-tokens defaulted to 256 keeps 256).

results.json is {"version", "config", "runs": {algorithm: {seed: [record, ...]}}} (with
--metrics also "tasks"): one `RoundRecord` per completed round, round 0 being the initial
state. rounds.py rewrites it atomically (`write_json`) after every round, so a killed run
resumes from its last completed global state. `privacy_summary` is a record's epsilons; the
Flower coordinator (flower/coordinator.py) writes its rounds with the same two.

`output_is_new` tells a new RESULTS_DIR from an earlier run's and refuses any other non-empty
directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedsrd_cli.errors import ArtifactError, OutputExistsError, UsageError
from fedsrd_cli.simulation.config import METRICS_MAX_NEW_TOKENS, SimulateConfig

RESULTS_VERSION = 1


@dataclass
class RoundRecord:
    """One completed round of one algorithm and seed (round 0: the initial state, no traffic)."""

    round: int
    eval_loss: dict[str, float]
    mean_eval_loss: float
    participants: list[str]
    upload_bytes: float  # mean over the participating clients
    download_bytes: int  # the broadcast, which every client receives
    traffic_per_client: float  # this round, averaged over all clients: sum(uploads) / n + download
    cumulative_traffic_per_client: float
    server_seconds: float  # aggregate + broadcast
    train_loss: float | None
    global_state: str  # relative to RESULTS_DIR
    global_hash: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def initial(
        cls,
        round_index: int,
        eval_loss: dict[str, float],
        mean_eval_loss: float,
        global_state: str,
        global_hash: str,
        extra: dict[str, Any] | None = None,
    ) -> RoundRecord:
        """The record of a run's starting state: evaluated, nothing trained or sent yet."""
        return cls(
            round=round_index,
            eval_loss=eval_loss,
            mean_eval_loss=mean_eval_loss,
            participants=[],
            upload_bytes=0.0,
            download_bytes=0,
            traffic_per_client=0.0,
            cumulative_traffic_per_client=0.0,
            server_seconds=0.0,
            train_loss=None,
            global_state=global_state,
            global_hash=global_hash,
            extra=dict(extra or {}),
        )


def output_is_new(out_dir: Path) -> bool:
    """True for a missing or empty directory; False for an earlier simulate run; else refuse."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return True
    if (out_dir / "config.json").is_file():
        return False
    if [p.name for p in out_dir.iterdir()] == ["assets"] and (out_dir / "assets" / "manifest.json").is_file():
        return True  # a run stopped after writing the demo assets
    raise OutputExistsError(
        f"{out_dir}: exists, is not empty and holds no simulate run (no config.json); choose another --out"
    )


def write_json(path: Path, data: Any) -> None:
    from fedsrd_cli.files.atomic import write_bytes_atomic

    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), force=True)


def with_recorded_defaults(out_dir: Path, config: SimulateConfig) -> SimulateConfig:
    """`config` with its defaults (None) settled: --metrics-max-new-tokens is what a resumed run
    recorded (256 for runs started before the default became 128), else METRICS_MAX_NEW_TOKENS.
    A value given explicitly stays, and is checked against the record as every setting is."""
    if config.metrics_max_new_tokens is not None:
        return config
    value = METRICS_MAX_NEW_TOKENS
    config_path = out_dir / "config.json"
    if config.task_metrics and config_path.is_file():
        try:
            recorded = json.loads(config_path.read_text())
        except (OSError, ValueError):
            recorded = {}  # load_results reports it
        if isinstance(recorded, dict) and isinstance(recorded.get("metrics_max_new_tokens"), int):
            value = recorded["metrics_max_new_tokens"]
    return replace(config, metrics_max_new_tokens=value)


def load_results(out_dir: Path, config: SimulateConfig) -> dict[str, Any]:
    """The recorded results of an earlier run, or a fresh skeleton; refuses another configuration.
    Writes nothing (`start_run` writes config.json once every input has been checked)."""
    config_path = out_dir / "config.json"
    if config_path.is_file():
        try:
            recorded = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{config_path}: unreadable ({err})") from None
        new = config.record()
        if recorded != new:
            changed = sorted(k for k in set(recorded) | set(new) if recorded.get(k) != new.get(k))
            raise UsageError(
                f"{out_dir}: holds a run with other settings ({', '.join(changed)} differ:"
                f" recorded {', '.join(f'{k}={recorded.get(k)!r}' for k in changed)});"
                " rerun with the same flags (only --rounds may change) or choose another --out"
            )
        results_path = out_dir / "results.json"
        if results_path.is_file():
            try:
                return json.loads(results_path.read_text())
            except (OSError, ValueError) as err:
                raise ArtifactError(f"{results_path}: unreadable ({err})") from None
    return {"version": RESULTS_VERSION, "config": config.record(), "runs": {}}


def start_run(out_dir: Path, config: SimulateConfig) -> None:
    """A new run's config.json (an earlier run's stays as it is)."""
    if not (out_dir / "config.json").is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", config.record())


def privacy_summary(privacy: dict[str, Any]) -> dict[str, Any]:
    """results.json's epsilons of a round, from the next global state's ledgers: {"privacy":
    {"sites": {client: {"epsilon", "delta", "rounds"}}, "organisation": {...}}} (epsilon None:
    infinite); {} without DP."""

    def brief(ledger: dict[str, Any]) -> dict[str, Any]:
        return {"epsilon": ledger["epsilon"], "delta": ledger["delta"], "rounds": len(ledger["rounds"])}

    out: dict[str, Any] = {}
    if "sites" in privacy:
        out["sites"] = {site: brief(ledger) for site, ledger in sorted(privacy["sites"].items())}
    if "organisation_level" in privacy:
        out["organisation"] = brief(privacy["organisation_level"])
    return {"privacy": out} if out else {}
