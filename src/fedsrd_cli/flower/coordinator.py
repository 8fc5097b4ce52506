"""The coordinator of a Flower run, on files: what `aggregate` and `broadcast` do, round after round.

Nothing here knows Flower: `strategy.FedSRDStrategy` hands it the bytes nodes sent and sends
the bytes it returns. Each round it

1. samples the round's clients with a seeded sampler (`sample_clients`, the same draw as
   `fedsrd simulate`), and gives each its `train-local --seed` (`simulate.client_train_seed`);
2. writes every upload it receives to `OUT/round-N/upload-CLIENT.safetensors` and reads it back
   as `aggregate` reads its inputs (`signing.read_verified` with the trust directory, then the
   lineage checks of `protocol.check_uploads`, one upload at a time): a refused upload is
   moved to `OUT/round-N/refused/` and reported, and the round goes on with the others;
3. runs `Algorithm.aggregate` on the accepted uploads in client-id order (the order of
   `aggregate OUT/round-N/upload-*.safetensors`), then `Algorithm.broadcast` with the seed
   `broadcast` derives from the aggregate's hash, signing every file it writes with the
   coordinator's key: `round-N/aggregate.safetensors`, `global-rN.safetensors`,
   `round-N/broadcast.safetensors`;
4. records the round in `OUT/results.json` in `fedsrd simulate`'s format.

OUT/config.json holds the run's settings; a restart with the same settings resumes from the last
global state results.json records (only `rounds` may change).
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedsrd_cli.errors import ArtifactError, FedsrdError, MismatchError, UsageError
from fedsrd_cli.files.artifacts import Artifact, read_artifact, write_artifact
from fedsrd_cli.files.atomic import write_bytes_atomic
from fedsrd_cli.files.safetensors_io import short
from fedsrd_cli.flower.settings import ServerSettings

RESULTS_VERSION = 1
Report = Callable[[str], None]


def sample_clients(population: Sequence[str], k: int, seed: int, round_index: int) -> list[str]:
    """The round's clients: all, or K of them drawn as `fedsrd simulate --sample-clients K` draws them.

    The draw depends only on (seed, round, population size), so it is the same in every run;
    chosen clients come back in population order.
    """
    n = len(population)
    if k <= 0 or k >= n:
        return list(population)
    rng = random.Random(f"fedsrd-simulate:{seed}:{round_index}")
    return [population[i] for i in sorted(rng.sample(range(n), k))]


@dataclass
class RoundState:
    """What the coordinator gathered so far in one round."""

    index: int
    directory: Path
    population: list[str]
    sampled: list[str]
    accepted: dict[str, Artifact] = field(default_factory=dict)
    upload_bytes: dict[str, int] = field(default_factory=dict)
    train_loss: dict[str, float] = field(default_factory=dict)
    refused: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    state_bytes_sent: int = 0
    server_seconds: float = 0.0
    broadcast_path: Path | None = None
    next_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    roster: Any = None  # a secure round's current roster (roster.Roster), else None
    roster_text: str = ""  # the signed roster file, as the sites receive it


class Coordinator:
    """The server side of a Flower run: one global state, advanced one round at a time, on files."""

    def __init__(self, settings: ServerSettings, report: Report | None = None) -> None:
        from fedsrd_cli.trust.signing import load_signer_and_trust

        self.settings = settings
        self.report: Report = report or (lambda line: None)
        self.algorithm = settings.algorithm()
        self.out = Path(settings.out)
        signer, trust = load_signer_and_trust(
            Path(settings.sign_key) if settings.sign_key else None,
            Path(settings.trust) if settings.trust else None,
        )
        if signer is not None and signer.name != "coordinator":
            raise UsageError(
                f"config 'sign-key' {settings.sign_key} signs as {signer.name!r}; clients accept only"
                " files signed by 'coordinator' (use keys/coordinator.key)"
            )
        if trust is not None and signer is None:
            raise UsageError(
                "config 'trust' needs 'sign-key' too: with --trust, `aggregate` and `broadcast` accept"
                " only global states signed by the coordinator, so the coordinator must sign its own"
            )
        self.signer, self.trust = signer, trust
        self.sign = None if signer is None else signer.sign_parts
        self.results: dict[str, Any] = {}
        self.state: Artifact | None = None
        self.current: RoundState | None = None

    # ------------------------------------------------------------------ the run

    @property
    def records(self) -> list[dict[str, Any]]:
        runs = self.results.setdefault("runs", {})
        return runs.setdefault(self.settings.method, {}).setdefault(str(self.settings.seed), [])

    @property
    def round(self) -> int:
        """The round of the current global state."""
        assert self.state is not None, "call start() first"
        return self.state.header.round

    @property
    def done(self) -> bool:
        return self.round >= self.settings.rounds

    @property
    def state_path(self) -> Path:
        return self.out / f"global-r{self.round}.safetensors"

    def start(self) -> Artifact:
        """Resume from OUT/results.json, or start: the initial global state, as global-rK.safetensors."""
        self.out.mkdir(parents=True, exist_ok=True)
        config_path = self.out / "config.json"
        recorded = self.settings.record()
        if config_path.is_file():
            found = _read_json(config_path)
            if found != recorded:
                changed = sorted(k for k in set(found) | set(recorded) if found.get(k) != recorded.get(k))
                raise UsageError(
                    f"{self.out}: holds a Flower run with other settings ({', '.join(changed)} differ);"
                    " restart with the same settings (only rounds may change) or choose another 'out'"
                )
            results_path = self.out / "results.json"
            self.results = _read_json(results_path) if results_path.is_file() else {}
        elif any(self.out.iterdir()):
            raise UsageError(f"{self.out}: exists, is not empty and holds no Flower run (no config.json)")
        else:
            _write_json(config_path, recorded)
        self.results.setdefault("version", RESULTS_VERSION)
        self.results.setdefault("config", recorded)
        if self.records:
            last = self.records[-1]
            path = self.out / last["global_state"]
            self.state = self._read_state(path)
            if self.state.header.content_hash != last["global_hash"]:
                raise MismatchError(
                    f"{path}: is not the global state results.json records for round {last['round']};"
                    " the run directory was changed"
                )
            self.report(f"resuming at round {self.round} from {path} ({short(last['global_hash'])})")
        else:
            self.state = self._initial_state()
        return self.state

    def _initial_state(self) -> Artifact:
        settings = self.settings
        if settings.initial_state:
            source = Path(settings.initial_state)
            first = self._read_state(source)  # verified as `aggregate --global` verifies it
            path = self.out / f"global-r{first.header.round}.safetensors"
            write_bytes_atomic(path, source.read_bytes(), force=False, allow_identical=True)
        else:
            from fedsrd_cli.algorithms.protocol import initial_state
            from fedsrd_cli.files.model_spec import fingerprint_base, lora_module_shapes

            lora, shapes = lora_module_shapes(settings.base, settings.targets, settings.rank, settings.alpha)
            payload = initial_state(shapes, lora, settings.seed, fingerprint_base(settings.base))
            path = self.out / "global-r0.safetensors"
            write_artifact(path, payload.header, payload.tensors, force=True, sign=self.sign)
        return self._read_state(path)

    def _read_state(self, path: Path) -> Artifact:
        from fedsrd_cli.trust.signing import read_verified

        return read_verified(path, "state", self.trust)

    def state_bytes(self) -> bytes:
        """The current global state file, for a node that does not hold it."""
        return self.state_path.read_bytes()

    # ------------------------------------------------------------------ one round

    def population(self, connected: Sequence[str]) -> list[str]:
        """The clients the sample is drawn from: the listed ones, else the connected ones, sorted."""
        return list(self.settings.client_list) or sorted(connected)

    def train_seed(self, client_id: str, population: Sequence[str], round_index: int) -> int:
        """`train-local --seed` of a client in a round: simulate's seed for its index in the population."""
        from fedsrd_cli.simulation.rounds import client_train_seed

        return client_train_seed(self.settings.seed, round_index, list(population).index(client_id))

    def begin_round(self, connected: Sequence[str]) -> RoundState:
        """Sample the next round's clients among `population(connected)`; clears a round left unfinished."""
        index = self.round + 1
        population = self.population(connected)
        org = self.settings.organisation_dp
        if org is None:
            sampled = sample_clients(population, self.settings.sample_clients, self.settings.seed, index)
        else:  # organisation-level DP: a secret Poisson sample (privacy.randomness)
            from fedsrd_cli.privacy.randomness import SecretRandom

            sampled = [population[i] for i in SecretRandom().poisson_sample(len(population), org[2])]
        directory = self.out / f"round-{index}"
        if directory.exists():  # an earlier attempt at this round that results.json does not record
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        self.current = RoundState(index, directory, population, sampled)
        absent = [c for c in sampled if c not in connected]
        for client in absent:
            self.current.failed.append({"client_id": client, "reason": "not connected"})
            self.report(f"round {index}: client {client!r} was sampled but is not connected")
        if self.settings.secure:
            self._sign_roster([c for c in sampled if c in connected], attempt=1)
        return self.current

    def _sign_roster(self, sites: list[str], attempt: int) -> None:
        """A secure round's roster of `sites`, signed and kept as round-N/roster-K.json."""
        from fedsrd_cli.trust.roster import make_roster, write_roster

        round_state = self._round()
        state = self.state
        assert state is not None and self.signer is not None
        settings = self.settings
        roster = make_roster(
            state.header.content_hash, round_state.index, sites, attempt, settings.secure_clip,
            settings.secure_density, settings.word_bits, settings.step_rule == "fedexp",
        )  # fmt: skip
        path = round_state.directory / f"roster-{attempt}.json"
        write_roster(path, roster, self.signer, force=True)
        round_state.roster, round_state.roster_text = roster, path.read_text()

    def missing_from_roster(self) -> list[str]:
        """A secure round's roster sites whose masked upload was not accepted."""
        round_state = self._round()
        if round_state.roster is None:
            return []
        return [site for site in round_state.roster.sites if site not in round_state.accepted]

    def reissue_roster(self) -> list[str]:
        """A secure round where some sites did not deliver: sign the next roster, of the sites that
        did, whose earlier uploads no longer count (they are masked for the old roster). Returns
        those sites, who must mask again; MismatchError when fewer than two remain."""
        round_state = self._round()
        delivered = sorted(round_state.accepted)
        missing = self.missing_from_roster()
        if len(delivered) < 2:
            raise MismatchError(
                f"round {round_state.index}: {len(delivered)} site(s) delivered a masked upload"
                f" ({', '.join(delivered) or 'none'}); a secure round needs at least two"
            )
        attempt = round_state.roster.attempt + 1
        self.report(
            f"round {round_state.index}: {', '.join(missing)} did not deliver; roster attempt {attempt}"
            f" of {', '.join(delivered)}"
        )
        superseded = round_state.directory / f"attempt-{attempt - 1}"
        superseded.mkdir(exist_ok=True)
        for upload in round_state.accepted.values():
            upload.path.replace(superseded / upload.path.name)
        round_state.accepted.clear()
        self._sign_roster(delivered, attempt)
        return delivered

    def remask_instructions(self) -> dict[str, Any]:
        """What a site that delivered needs to mask again for the re-issued roster."""
        round_state = self._round()
        state = self.state
        assert state is not None
        return {
            "round": round_state.index,
            "state-hash": state.header.content_hash,
            "roster": round_state.roster_text,
        }

    def train_instructions(self, client_id: str) -> dict[str, Any]:
        """What a sampled client runs: `train-local` and `sparsify` with these flags, from this state."""
        round_state = self._round()
        settings = self.settings
        sparsify = settings.sparsify_config()
        only = self.algorithm.trained_factor(round_state.index)
        return {
            "round": round_state.index,
            "method": settings.method,
            "state-hash": self.state.header.content_hash,  # type: ignore[union-attr]
            "steps": settings.local_steps,
            "lr": settings.lr,
            "batch-size": settings.batch_size,
            "max-length": settings.max_length,
            "seed": self.train_seed(client_id, round_state.population, round_state.index),
            "prox-mu": settings.prox_mu if settings.method == "fedprox" else 0.0,
            "train-only": only or "",
            "base-sparsity": sparsify.base_sparsity,
            "kurtosis-coeff": sparsify.kurtosis_coeff,
            "kurtosis-cap": sparsify.kurtosis_cap,
            "rescale": sparsify.rescale,
            "value-dtype": sparsify.value_dtype,
            "upload-drop": sparsify.upload_drop,
            "update-sketch": sparsify.update_sketch,
            # DP-SGD (train-local --dp-*); -1: not given, dp-rounds 0: no plan.
            "dp-epsilon": settings.dp_epsilon,
            "dp-delta": settings.dp_delta,
            "dp-max-grad-norm": settings.dp_max_grad_norm,
            "dp-noise-multiplier": settings.dp_noise_multiplier,
            "dp-rounds": (settings.dp_rounds or settings.rounds) if settings.dp_epsilon > 0 else 0,
            # a secure round: mask for this signed roster (sparsify --secure)
            "secure": settings.secure,
            "roster": round_state.roster_text,
        }

    def sent_state(self, size: int) -> None:
        """Count a global state sent to a node that did not hold it (catch-up traffic)."""
        self._round().state_bytes_sent += size

    def failed(self, client_id: str, reason: str) -> None:
        """A sampled client that sent no upload (an error on its side, a timeout)."""
        self._round().failed.append({"client_id": client_id, "reason": reason})
        self.report(f"round {self._round().index}: client {client_id!r} sent no upload: {reason}")

    def receive_upload(self, client_id: str, data: bytes, train_loss: float | None = None) -> str | None:
        """Check one client's upload as `aggregate --trust` checks it; None if accepted, else the reason.

        A refused upload stays in round-N/refused/ for inspection; it never stops the round.
        """
        from fedsrd_cli.algorithms.private import aggregate_privacy
        from fedsrd_cli.algorithms.protocol import check_uploads, guard_update_norms
        from fedsrd_cli.algorithms.secure import check_masked_upload
        from fedsrd_cli.trust.signing import read_verified

        round_state = self._round()
        name = f"upload-{client_id}.safetensors"
        path = round_state.directory / name
        try:
            if client_id in round_state.accepted:
                raise MismatchError(f"client {client_id!r} already sent an upload this round")
            if client_id not in round_state.sampled:
                raise MismatchError(f"client {client_id!r} was not sampled for round {round_state.index}")
            write_bytes_atomic(path, data, force=True)
            kind = "masked_upload" if round_state.roster is not None else "upload"
            upload = read_verified(path, kind, self.trust)
            head = upload.header
            if head.client_id != client_id:
                raise MismatchError(f"{path}: is client {head.client_id!r}'s upload, sent by {client_id!r}")
            if round_state.roster is not None:
                check_masked_upload(self.state, upload, round_state.roster)  # type: ignore[arg-type]
            else:
                check_uploads(self.state, [upload], self.settings.weighting)  # type: ignore[arg-type]
            if round_state.roster is None and head.method != self.algorithm.upload_method:
                raise MismatchError(
                    f"{path}: was made by `sparsify --method {head.method}`, but this run aggregates"
                    f" with --method {self.algorithm.name}"
                )
            for other, accepted in round_state.accepted.items():
                if accepted.header.content_hash == head.content_hash:
                    raise MismatchError(f"{path}: the same upload as client {other!r}'s")
            config = self.settings.aggregate_config(sampled=0)
            if round_state.roster is None:
                guard_update_norms(self.state, [upload], config)  # type: ignore[arg-type]
            aggregate_privacy(self.state, [upload], replace(config, organisation_dp=None))  # type: ignore[arg-type]
        except FedsrdError as err:
            refused_dir = round_state.directory / "refused"
            refused_dir.mkdir(exist_ok=True)
            if path.exists():
                path.replace(refused_dir / name)
            reason = str(err)
            round_state.refused.append({"client_id": client_id, "reason": reason})
            self.report(f"round {round_state.index}: refused the upload of client {client_id!r}: {reason}")
            return reason
        round_state.accepted[client_id] = upload
        round_state.upload_bytes[client_id] = round_state.upload_bytes.get(client_id, 0) + len(data)
        if train_loss is not None:
            round_state.train_loss[client_id] = train_loss
        return None

    def finish_round(self) -> bytes:
        """Aggregate the accepted uploads and broadcast: returns the broadcast file's bytes.

        Writes round-N/aggregate.safetensors, global-rN.safetensors and round-N/broadcast.safetensors
        (signed with the coordinator's key), as `aggregate` and `broadcast` write them.
        """
        from fedsrd_cli.algorithms.protocol import default_download_seed
        from fedsrd_cli.simulation.records import privacy_summary

        round_state = self._round()
        state = self.state
        assert state is not None
        if not round_state.accepted and self.settings.organisation_dp is None:
            problems = "; ".join(
                f"{p['client_id']}: {p['reason']}" for p in round_state.refused + round_state.failed
            )
            raise MismatchError(
                f"round {round_state.index}: no upload was accepted, nothing to aggregate"
                f" ({problems or 'no client'})"
            )
        uploads = [round_state.accepted[c] for c in sorted(round_state.accepted)]
        start = time.perf_counter()
        config = self.settings.aggregate_config(len(uploads), len(round_state.population))
        if round_state.roster is not None:
            from fedsrd_cli.algorithms.secure import secure_aggregate

            aggregate = secure_aggregate(state, uploads, round_state.roster, config)
        else:
            aggregate = self.algorithm.aggregate(state, uploads, config)
        round_state.server_seconds += time.perf_counter() - start
        aggregate_path = round_state.directory / "aggregate.safetensors"
        write_artifact(aggregate_path, aggregate.header, aggregate.tensors, force=True, sign=self.sign)
        aggregate_file = read_artifact(aggregate_path, kind="aggregate")
        seed = default_download_seed(state, aggregate_file)  # `broadcast`'s default --seed
        sparsity = self.settings.download_sparsity_for()
        config = self.settings.broadcast_config(sparsity, seed, round_state.index)
        start = time.perf_counter()
        broadcast, next_state = self.algorithm.broadcast(state, aggregate_file, config)
        round_state.server_seconds += time.perf_counter() - start
        next_path = self.out / f"global-r{round_state.index}.safetensors"
        next_head = write_artifact(
            next_path, next_state.header, next_state.tensors, force=True, sign=self.sign
        )
        broadcast_path = round_state.directory / "broadcast.safetensors"
        broadcast_head = write_artifact(
            broadcast_path, broadcast.header, broadcast.tensors, force=True, sign=self.sign
        )
        if next_head.content_hash != broadcast_head.result_hash:
            raise MismatchError(f"{next_path}: differs from the state its broadcast announces")
        round_state.broadcast_path = broadcast_path
        round_state.next_hash = next_head.content_hash
        round_state.extra = {
            "download_sparsity": config.download_sparsity,
            "update_error": broadcast_head.info.get("update_error", {}).get("overall"),
            "update_step": broadcast_head.info["update_step"]["max"],
        } | privacy_summary(next_head.privacy)
        return broadcast_path.read_bytes()

    def record_round(self, applied: dict[str, str], eval_loss: dict[str, float]) -> dict[str, Any]:
        """Advance to the round's global state and append its record to results.json.

        applied: {client id: the state hash its `apply` produced}; a hash other than the
        coordinator's is reported. eval_loss: {client id: its eval loss of the new state}.
        """
        from fedsrd_cli.simulation.records import RoundRecord

        round_state = self._round()
        if round_state.broadcast_path is None:
            raise UsageError("finish_round() must run before record_round()")
        for client, found in sorted(applied.items()):
            if found != round_state.next_hash:
                self.report(
                    f"round {round_state.index}: client {client!r} holds state {short(found)} after apply,"
                    f" not {short(round_state.next_hash)}"
                )
        last = self.records[-1]
        self.state = self._read_state(self.out / f"global-r{round_state.index}.safetensors")
        uploads = [round_state.upload_bytes[c] for c in sorted(round_state.accepted)]
        download = round_state.broadcast_path.stat().st_size
        traffic = sum(uploads) / max(len(round_state.population), 1) + download
        losses = [round_state.train_loss[c] for c in sorted(round_state.train_loss)]
        record = asdict(
            RoundRecord(
                round=round_state.index,
                eval_loss=dict(sorted(eval_loss.items())),
                mean_eval_loss=statistics.fmean(eval_loss.values()) if eval_loss else 0.0,
                participants=sorted(round_state.accepted),
                upload_bytes=sum(uploads) / max(len(uploads), 1),
                download_bytes=download,
                traffic_per_client=traffic,
                cumulative_traffic_per_client=last["cumulative_traffic_per_client"] + traffic,
                server_seconds=round_state.server_seconds,
                train_loss=statistics.fmean(losses) if losses else None,
                global_state=f"global-r{round_state.index}.safetensors",
                global_hash=self.state.header.content_hash,
                extra=round_state.extra
                | {
                    "sampled": round_state.sampled,
                    "refused": round_state.refused,
                    "failed": round_state.failed,
                    "applied": sorted(c for c, h in applied.items() if h == round_state.next_hash),
                    "state_bytes_sent": round_state.state_bytes_sent,
                }
                | ({"roster_attempt": round_state.roster.attempt} if round_state.roster is not None else {})
                | ({"prox_mu": self.settings.prox_mu} if self.settings.method == "fedprox" else {})
                | (
                    {"trained_factor": factor}
                    if (factor := self.algorithm.trained_factor(round_state.index))
                    else {}
                ),
            )
        )
        if not eval_loss:
            record["mean_eval_loss"] = None
        self.records.append(record)
        _write_json(self.out / "results.json", self.results)
        self.current = None
        return record

    def record_initial(self, eval_loss: dict[str, float]) -> dict[str, Any]:
        """The run's first record: the initial state (no traffic), with the clients' eval losses."""
        from fedsrd_cli.simulation.records import RoundRecord

        if self.records:
            raise UsageError("the initial state is already recorded")
        state = self.state
        assert state is not None
        record = asdict(
            RoundRecord.initial(
                state.header.round,
                dict(sorted(eval_loss.items())),
                statistics.fmean(eval_loss.values()) if eval_loss else 0.0,
                self.state_path.name,
                state.header.content_hash,
            )
        )
        if not eval_loss:
            record["mean_eval_loss"] = None
        self.records.append(record)
        _write_json(self.out / "results.json", self.results)
        return record

    def _round(self) -> RoundState:
        if self.current is None:
            raise UsageError("no round in progress (call begin_round first)")
        return self.current


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path}: unreadable ({err})") from None


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), force=True)
