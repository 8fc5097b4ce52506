"""One client site of a Flower run, on files: what `train-local`, `sparsify` and `apply` do.

Nothing here knows Flower: the ClientApp (`apps.py`) hands a `Site` the bytes the coordinator sent
and sends back the bytes it returns. Every file of the site's rounds is kept in its state
directory, named as the CLI's walkthrough names them, so `fedsrd inspect` reads each of them and
a file round can take over from any state:

    STATE_DIR/global-rN.safetensors               the global state after round N (the site's own
                                                  `apply` result, or the coordinator's file)
    STATE_DIR/round-N/local.safetensors           `train-local`'s local state (+ .log.jsonl)
    STATE_DIR/round-N/upload-CLIENT.safetensors   `sparsify`'s upload: the bytes that were sent
    STATE_DIR/round-N/broadcast.safetensors       the coordinator's broadcast: the bytes received

With a trust directory, states and broadcasts are verified as the CLI verifies them (signed by
`coordinator`, or a state by this client's own key); with a signing key, every file the site
writes is signed with it, as `--sign-key` does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsrd_cli.errors import MismatchError, UsageError
from fedsrd_cli.files.artifacts import Artifact, write_artifact
from fedsrd_cli.files.atomic import write_bytes_atomic
from fedsrd_cli.files.safetensors_io import short
from fedsrd_cli.flower.settings import SiteSettings

SECURE_RESIDUAL = "secure-residual.safetensors"  # a round's residual, in its round folder


@dataclass
class TrainResult:
    """A client's answer to a train instruction: the upload file's bytes and what training did."""

    upload: bytes
    train_loss: float
    num_samples: int
    seconds: float


class Site:
    """A client: its base model (loaded once, on first use), data, keys and state directory."""

    def __init__(self, settings: SiteSettings) -> None:
        from fedsrd_cli.trust.signing import load_signer_and_trust

        self.settings = settings
        self.client_id = settings.client_id
        signer, trust = load_signer_and_trust(
            Path(settings.sign_key) if settings.sign_key else None,
            Path(settings.trust) if settings.trust else None,
        )
        if signer is not None and signer.name != self.client_id:
            raise UsageError(
                f"node config 'sign-key' {settings.sign_key} signs as {signer.name!r} but 'client-id' is"
                f" {self.client_id!r}; the coordinator accepts an upload only when signed by its client"
            )
        self.signer, self.trust, self.sign = signer, trust, None if signer is None else signer.sign_parts
        self.state_dir = Path(settings.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._base: Any = None
        self._train_sets: Any = None
        self._eval_sets: Any = None

    # ------------------------------------------------------------------ states

    def state_path(self, round_index: int) -> Path:
        return self.state_dir / f"global-r{round_index}.safetensors"

    def _accept(self) -> tuple[str, ...]:
        from fedsrd_cli.trust.signing import COORDINATOR

        return (COORDINATOR,) if self.signer is None else (COORDINATOR, self.signer.name)

    def read_state(self, path: Path) -> Artifact:
        """A global state, verified as `train-local --trust` verifies it."""
        from fedsrd_cli.trust.signing import read_verified

        return read_verified(path, "state", self.trust, accept=self._accept())

    def holds(self, round_index: int, content_hash: str) -> bool:
        """Whether this site has the global state of that round with that hash (checked, not assumed)."""
        path = self.state_path(round_index)
        if not path.is_file():
            return False
        try:
            return self.read_state(path).header.content_hash == content_hash
        except Exception:  # a corrupt or foreign file: the coordinator sends the state again
            return False

    def state(self, round_index: int, content_hash: str, data: bytes | None = None) -> Artifact:
        """The round's global state: from `data` (the coordinator's file, saved here) or this site's own."""
        path = self.state_path(round_index)
        if data is not None:
            # checked under a temporary name first: a file that fails never takes the state's place
            incoming = self.state_dir / f".incoming-{path.name}"
            write_bytes_atomic(incoming, data, force=True)
            try:
                self._check_state(self.read_state(incoming), round_index, content_hash, incoming)
            except Exception:
                incoming.unlink(missing_ok=True)
                raise
            incoming.replace(path)
        elif not path.is_file():
            raise MismatchError(
                f"{self.client_id}: holds no global state of round {round_index} ({short(content_hash)});"
                " the coordinator must send it"
            )
        state = self.read_state(path)
        self._check_state(state, round_index, content_hash, path)
        return state

    @staticmethod
    def _check_state(state: Artifact, round_index: int, content_hash: str, path: Path) -> None:
        if state.header.content_hash != content_hash or state.header.round != round_index:
            raise MismatchError(
                f"{path}: is state {short(state.header.content_hash)} of round {state.header.round}, not the"
                f" coordinator's {short(content_hash)} of round {round_index}"
            )

    # ------------------------------------------------------------------ model and data

    def base(self) -> Any:
        if self._base is None:
            from fedsrd_cli.site.model import load_base

            self._base = load_base(self.settings.base, self.settings.device, self.settings.dtype)
        return self._base

    def train_sets(self) -> Any:
        if self._train_sets is None:
            from fedsrd_cli.site.data import load_datasets

            self._train_sets = load_datasets(list(self.settings.data_files))
        return self._train_sets

    def eval_sets(self) -> Any:
        if self._eval_sets is None and self.settings.eval_files:
            from fedsrd_cli.site.data import load_datasets

            self._eval_sets = load_datasets(list(self.settings.eval_files))
        return self._eval_sets

    # ------------------------------------------------------------------ the round's steps

    def train(self, state: Artifact, instructions: Mapping[str, Any]) -> TrainResult:
        """`train-local` then `sparsify`, with the flags the coordinator sent, on this site's data."""
        from fedsrd_cli.algorithms import get_algorithm
        from fedsrd_cli.config import SparsifyConfig
        from fedsrd_cli.files.adapters import read_local
        from fedsrd_cli.math.threads import use_threads
        from fedsrd_cli.site.model import check_fingerprint
        from fedsrd_cli.site.training import (
            TrainConfig,
            check_private_run,
            local_header,
            private_training,
            train_local,
        )

        round_index = int(instructions["round"])
        if round_index != state.header.round + 1:
            raise MismatchError(
                f"instructions for round {round_index}, but the state given is of round {state.header.round}"
            )
        algorithm = get_algorithm(str(instructions["method"]))
        check_fingerprint(self.settings.base, state)
        only = str(instructions["train-only"]) or None
        if only != algorithm.trained_factor(round_index):
            raise MismatchError(
                f"{algorithm.name} trains {algorithm.trained_factor(round_index) or 'both factors'} in round"
                f" {round_index}, the coordinator asked for {only or 'both'}"
            )
        config = TrainConfig(
            steps=int(instructions["steps"]),
            lr=float(instructions["lr"]),
            batch_size=int(instructions["batch-size"]),
            max_length=int(instructions["max-length"]),
            seed=int(instructions["seed"]),
            device=self.settings.device,
            dtype=self.settings.dtype,
            prox_mu=float(instructions["prox-mu"]),
        ).training_only(only)
        ledger = None
        record_dp = self.record_dp(instructions)
        if record_dp is not None:  # planned, and refused past this site's budget, before training
            config, ledger = private_training(record_dp, state, self.client_id, self.train_sets(), config)
        round_dir = self.state_dir / f"round-{round_index}"
        round_dir.mkdir(exist_ok=True)
        base = self.base()
        use_threads(self.settings.threads or None)
        tensors, stats = train_local(base, state, self.train_sets(), config)
        if ledger is not None:
            check_private_run(stats, ledger)
        info = {
            "train": {
                "steps": stats.steps,
                "lr": config.lr,
                "batch_size": config.batch_size,
                "grad_accum": config.grad_accum,
                "seed": config.seed,
                "prox_mu": config.prox_mu,
                "freeze_a": config.freeze_a,
                "freeze_b": config.freeze_b,
                "final_loss": stats.final_loss,
                **({"dp": stats.dp} if stats.dp is not None else {}),
            }
        }
        local_path = round_dir / "local.safetensors"
        head = local_header(state, stats.samples, self.client_id, info, ledger)
        write_artifact(local_path, head, tensors, force=True, sign=self.sign)
        log = "".join(json.dumps(r, sort_keys=True) + "\n" for r in stats.log)
        write_bytes_atomic(Path(str(local_path) + ".log.jsonl"), log.encode("utf-8"), force=True)
        sparsify = SparsifyConfig(
            float(instructions["base-sparsity"]),
            float(instructions["kurtosis-coeff"]),
            float(instructions["kurtosis-cap"]),
            bool(instructions["rescale"]),
            str(instructions["value-dtype"]),
            float(instructions["upload-drop"]),
            bool(instructions.get("update-sketch", False)),
        )
        if instructions.get("secure"):
            data = self.mask(state, round_index, str(instructions["roster"]))
            return TrainResult(data, stats.final_loss, stats.samples, stats.seconds)
        local = read_local(local_path)
        payload = algorithm.upload(state, local, self.client_id, local.header.num_samples, sparsify)
        upload_path = round_dir / f"upload-{self.client_id}.safetensors"
        write_artifact(upload_path, payload.header, payload.tensors, force=True, sign=self.sign)
        return TrainResult(upload_path.read_bytes(), stats.final_loss, stats.samples, stats.seconds)

    def mask(self, state: Artifact, round_index: int, roster_text: str) -> bytes:
        """A secure round's masked upload of this round's local state, for the signed roster the
        coordinator sent (`sparsify --secure`); its bytes. Called again for a re-issued roster."""
        from fedsrd_cli.algorithms.secure import SecureFloor
        from fedsrd_cli.site.uploads import SecureFiles, secure_upload

        if not self.settings.agreement_key or self.trust is None:
            raise UsageError(
                "a secure round needs node config 'agreement-key' and 'trust' (the other sites' keys)"
            )
        round_dir = self.state_dir / f"round-{round_index}"
        roster_path = round_dir / "roster.json"
        write_bytes_atomic(roster_path, roster_text.encode(), force=True)
        # What the last secure round's public positions left out (error feedback): every attempt
        # of this round starts from it, and this round's attempt leaves the next one's.
        earlier = {
            int(p.parent.name.removeprefix("round-")): p
            for p in self.state_dir.glob(f"round-*/{SECURE_RESIDUAL}")
            if p.parent.name.removeprefix("round-").isdigit()
        }
        before = [index for index in earlier if index < round_index]
        files = SecureFiles(
            roster_path,
            Path(self.settings.agreement_key),
            earlier[max(before)] if before else None,
            round_dir / SECURE_RESIDUAL,
        )
        payload, _samples, kept = secure_upload(
            state, round_dir / "local.safetensors", self.client_id, None, files, self.trust,
            SecureFloor(self.settings.min_sites, allow_spread=not self.settings.refuse_spread),
        )  # fmt: skip
        attempt = payload.header.info["secure"]["attempt"]
        path = round_dir / f"upload-{self.client_id}-attempt-{attempt}.safetensors"
        also = [kept] if kept is not None else []
        write_artifact(path, payload.header, payload.tensors, force=True, sign=self.sign, also=also)
        return path.read_bytes()

    def record_dp(self, instructions: Mapping[str, Any]) -> Any:
        """The DP-SGD the coordinator asks for (its dp-* instructions), capped by this site's own
        node config 'dp-max-epsilon'; None without DP."""
        from fedsrd_cli.privacy.budget import RecordDp

        def given(key: str) -> float | None:
            value = float(instructions.get(key, -1.0))
            return None if value < 0 else value

        epsilon, noise = given("dp-epsilon"), given("dp-noise-multiplier")
        if epsilon is None and noise is None:
            return None
        own_cap = self.settings.dp_max_epsilon
        return RecordDp(
            epsilon=epsilon,
            delta=given("dp-delta"),
            max_grad_norm=float(instructions["dp-max-grad-norm"]),
            noise_multiplier=noise,
            planned_rounds=int(instructions["dp-rounds"]) or None,
            max_epsilon=own_cap if own_cap > 0 else None,
        )

    def apply(self, parent: Artifact, data: bytes) -> Artifact:
        """`apply`: save the broadcast, verify it, apply it to `parent`; writes global-rN.safetensors."""
        from fedsrd_cli.algorithms.catchup import apply_chain
        from fedsrd_cli.trust.signing import read_verified

        round_index = parent.header.round + 1
        round_dir = self.state_dir / f"round-{round_index}"
        round_dir.mkdir(exist_ok=True)
        broadcast_path = round_dir / "broadcast.safetensors"
        write_bytes_atomic(broadcast_path, data, force=True)
        broadcast = read_verified(broadcast_path, "broadcast", self.trust)
        payload = apply_chain(parent, [broadcast])
        path = self.state_path(round_index)
        write_artifact(path, payload.header, payload.tensors, force=True, sign=self.sign)
        return self.read_state(path)

    def evaluate(self, state: Artifact, max_length: int = 512) -> float | None:
        """This site's mean eval loss of a global state (None without eval data), as `fedsrd eval`."""
        from fedsrd_cli.math.threads import use_threads
        from fedsrd_cli.site.evaluation import evaluate
        from fedsrd_cli.site.model import set_global

        datasets = self.eval_sets()
        if not datasets:
            return None
        base = self.base()
        set_global(base, state)
        use_threads(self.settings.threads or None)
        metrics = evaluate(base, datasets, self.settings.eval_batch_size, max_length)
        return float(metrics["mean"]["loss"])
