"""The settings of a Flower run (the ServerApp's run config) and of one site (a SuperNode's node config).

Flower hands both over as flat mappings of TOML scalars (`[tool.flwr.app.config]` in the app's
pyproject.toml, overridden by `flwr run --run-config`; `flower-supernode --node-config`). Keys are
the CLI's flag names without the dashes in front; an empty string or a negative number means
"not given" where the CLI flag is optional. Every value is checked here, with the flag's own
message (config.py), before any round starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedsrd_cli.config import DEFAULT_VALUE_DTYPE, _require
from fedsrd_cli.errors import UsageError
from fedsrd_cli.limits import DEFAULT_DP_MAX_GRAD_NORM
from fedsrd_cli.trust.roster import MIN_DENSITY

Scalar = bool | int | float | str


def _split(value: str) -> tuple[str, ...]:
    """ "a, b,c" -> ("a", "b", "c"); "" -> ()."""
    return tuple(part.strip() for part in value.replace("\n", ",").split(",") if part.strip())


def _coerce(name: str, value: Scalar, default: Any) -> Any:
    """A config value as the type of its default (TOML ints are accepted for floats)."""
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"config {name!r}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"config {name!r}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"config {name!r}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise UsageError(f"config {name!r}: expected a string, got {value!r}")
    return value


def _from_mapping(cls: type, config: Mapping[str, Scalar], what: str) -> dict[str, Any]:
    """Keyword arguments of dataclass `cls` from a Flower config (kebab-case keys)."""
    known = {f.name.replace("_", "-"): f for f in fields(cls)}
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise UsageError(f"{what}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for key, field in known.items():
        if key in config:
            values[field.name] = _coerce(key, config[key], field.default)
            _check_range(key, values[field.name], field.default)
    return values


def _check_range(key: str, value: Any, default: Any) -> None:
    """A numeric key other than its default ("not given") must be within its flag's range
    (cli/limits.py: the same declaration the commands check)."""
    from fedsrd_cli.limits import LIMITS

    if isinstance(value, bool) or not isinstance(value, (int, float)) or value == default:
        return
    limit = LIMITS.get(f"--{key}")
    if limit is not None and not limit.holds(value):
        raise UsageError(f"config {key!r} must be in {limit.describe()}, got {value!r}")


@dataclass(frozen=True)
class ServerSettings:
    """The coordinator's side of a Flower run (the ServerApp's run config).

    out: directory for every file of the run (global-rN.safetensors, round-N/, results.json).
    rounds: the run's last round: a restart with the same `out` resumes and stops there.
    clients: the expected client ids, in order; the seeded sample and the clients' training
        seeds index this list (as `simulate` indexes its --clients-data). Empty: the client ids
        of the connected nodes, sorted.
    sample_clients: clients that train per round (0: all), chosen by a seeded sampler.
    initial_state: a global state file to start from (`fedsrd init`'s, or the global-rN of a
        file round); empty: built from `base` as `fedsrd init --seed SEED` builds it.
    dp_*: DP as `simulate --dp-*` (docs/privacy.md): dp_epsilon / dp_noise_multiplier,
        dp_delta, dp_max_grad_norm and dp_rounds (0: `rounds`) are every site's DP-SGD
        (each site may refuse a round past its own node config 'dp-max-epsilon');
        require_dp is `aggregate --require-dp`; dp_org_clip, dp_org_noise_multiplier,
        dp_org_sampling_rate and dp_org_delta are organisation-level DP (fedsrd-e; the sites
        of a round are then a secret Poisson sample instead of `sample-clients`).
    secure, secure_clip, secure_density, word_bits: secure rounds (`sparsify --secure`,
        `aggregate --secure`; fedsrd-e): the coordinator signs each round's roster of the sampled
        sites (`roster --clip --secure-density --word-bits`, and `--update-spread` under
        step_rule fedexp) and re-issues it without a site that did not deliver; it needs
        sign_key and trust. Below density 1 each site keeps what the public positions leave out
        in its state folder and sends it in its next round.
    Everything else is the flag of the same name of `train-local`, `sparsify`, `aggregate` or
    `broadcast`; -1 / "" leaves a flag out (the command's default).
    """

    out: str = ""
    rounds: int = 1
    method: str = "fedsrd"
    clients: str = ""
    min_clients: int = 0
    sample_clients: int = 0
    seed: int = 0
    initial_state: str = ""
    base: str = ""
    rank: int = 16
    alpha: float = 32.0
    targets: str = "all-linear"
    local_steps: int = 30
    lr: float = 1e-3
    batch_size: int = 16
    max_length: int = 512
    prox_mu: float = 0.01
    base_sparsity: float = -1.0
    kurtosis_coeff: float = 0.1
    kurtosis_cap: float = 0.11
    rescale: bool = True
    upload_drop: float = 0.9
    value_dtype: str = DEFAULT_VALUE_DTYPE
    weighting: str = "uniform"
    max_update_norm: float = -1.0
    on_outlier: str = "refuse"
    download_sparsity: float = -1.0
    damping: float = -1.0
    download_fit: str = ""
    factor_choice: str = ""
    server_lr: float = 1.0
    server_lr_from: int = 1
    calibrate_step: bool = False
    step_rule: str = "fixed"
    dp_epsilon: float = -1.0
    dp_delta: float = -1.0
    dp_max_grad_norm: float = DEFAULT_DP_MAX_GRAD_NORM
    dp_noise_multiplier: float = -1.0
    dp_rounds: int = 0
    require_dp: float = -1.0
    dp_org_clip: float = -1.0
    dp_org_noise_multiplier: float = -1.0
    dp_org_sampling_rate: float = 1.0
    dp_org_delta: float = -1.0
    secure: bool = False
    secure_clip: float = 1.0
    secure_density: float = 1.0
    word_bits: int = 32
    sign_key: str = ""
    trust: str = ""
    round_timeout: float = 3600.0
    connect_timeout: float = 600.0

    def __post_init__(self) -> None:
        from fedsrd_cli.algorithms import get_algorithm

        _require(bool(self.out), "config 'out': give the run's output directory")
        _require(self.rounds >= 1, f"config 'rounds' must be >= 1, got {self.rounds}")
        get_algorithm(self.method)
        clients = self.client_list
        _require(len(set(clients)) == len(clients), "config 'clients' names a client twice")
        _require(self.min_clients >= 0, "config 'min-clients' must be >= 0")
        _require(self.sample_clients >= 0, "config 'sample-clients' must be >= 0 (0: all)")
        _require(
            not clients or self.sample_clients <= len(clients),
            f"config 'sample-clients' must be at most the {len(clients)} clients listed",
        )
        _require(0 <= self.seed < 2**31, f"config 'seed' must be in [0, 2^31), got {self.seed}")
        _require(
            bool(self.initial_state) or bool(self.base),
            "give config 'initial-state' (a global state file) or 'base' (a model to init from)",
        )
        _require(self.local_steps >= 1, "config 'local-steps' must be >= 1")
        _require(math.isfinite(self.lr) and self.lr > 0, "config 'lr' must be > 0")
        _require(self.batch_size >= 1, "config 'batch-size' must be >= 1")
        _require(self.max_length >= 2, "config 'max-length' must be >= 2")
        _require(math.isfinite(self.prox_mu) and self.prox_mu >= 0, "config 'prox-mu' must be >= 0")
        _require(self.round_timeout > 0 and self.connect_timeout > 0, "timeouts must be > 0")
        _require(self.server_lr_from >= 1, f"config 'server-lr-from' must be >= 1, got {self.server_lr_from}")
        self.broadcast_config(0.0, 0)  # the download settings' own checks and messages
        _require(
            self.step_rule == "fixed" or self.organisation_dp is None,
            "config 'step-rule' fedexp reads each site's own update norm: not with organisation-level DP",
        )
        self.sparsify_config()  # the flags' own checks and messages
        self.aggregate_config(sampled=0)
        self.record_dp()
        _require(self.dp_rounds >= 0, "config 'dp-rounds' must be >= 0 (0: the run's rounds)")
        if self.secure:
            _require(
                self.method == "fedsrd-e" and self.organisation_dp is None,
                "config 'secure' runs method fedsrd-e, without organisation-level DP",
            )
            _require(
                bool(self.sign_key) and bool(self.trust),
                "config 'secure' needs 'sign-key' (rosters are signed) and 'trust' (masked uploads are)",
            )
            _require(
                MIN_DENSITY <= self.secure_density <= 1.0 and self.word_bits in (16, 32),
                f"config 'secure-density' must be in [{MIN_DENSITY}, 1] and 'word-bits' 16 or 32,"
                f" got {self.secure_density} and {self.word_bits}",
            )
        _require(
            self.organisation_dp is None or self.sample_clients == 0,
            "organisation-level DP samples the sites itself (dp-org-sampling-rate): set sample-clients to 0",
        )
        self.broadcast_config(self._given(self.download_sparsity) or 0.0, 0)

    @classmethod
    def from_run_config(cls, config: Mapping[str, Scalar]) -> ServerSettings:
        return cls(**_from_mapping(cls, config, "run config"))

    @staticmethod
    def _given(value: float) -> float | None:
        return None if value < 0 else value

    @property
    def client_list(self) -> tuple[str, ...]:
        return _split(self.clients)

    def algorithm(self) -> Any:
        from fedsrd_cli.algorithms import get_algorithm

        return get_algorithm(self.method)

    def sparsify_config(self) -> Any:
        """What `sparsify` runs with: --base-sparsity (the method's default when not given) and the rest."""
        from fedsrd_cli.config import SparsifyConfig

        base = self._given(self.base_sparsity)
        if base is None:
            base = self.algorithm().default_base_sparsity
        # Under FedExP's step the sites of a sparsifying method sketch their updates.
        sketch = self.step_rule == "fedexp" and not self.algorithm().dense_upload
        return SparsifyConfig(
            base,
            self.kurtosis_coeff,
            self.kurtosis_cap,
            self.rescale,
            self.value_dtype,
            self.upload_drop,
            sketch,
        )

    @property
    def organisation_dp(self) -> tuple[float, float, float, float] | None:
        """(clip, noise multiplier, sampling rate, delta) of organisation-level DP, or None."""
        org = (self.dp_org_clip, self.dp_org_noise_multiplier, self.dp_org_delta)
        if all(value < 0 for value in org) and self.dp_org_sampling_rate == 1.0:
            return None
        _require(
            all(value > 0 for value in org),
            "organisation-level DP needs config 'dp-org-clip', 'dp-org-noise-multiplier' and"
            " 'dp-org-delta' (all > 0)",
        )
        return (self.dp_org_clip, self.dp_org_noise_multiplier, self.dp_org_sampling_rate, self.dp_org_delta)

    def record_dp(self) -> Any:
        """Every site's DP-SGD settings (privacy.budget.RecordDp), or None without DP."""
        from fedsrd_cli.privacy.budget import RecordDp

        given = (self.dp_epsilon, self.dp_noise_multiplier, self.dp_delta)
        if all(value < 0 for value in given):
            _require(self.dp_rounds == 0, "config 'dp-rounds' plans DP-SGD: set 'dp-epsilon' too")
            return None
        epsilon = self._given(self.dp_epsilon)
        return RecordDp(
            epsilon=epsilon,
            delta=self._given(self.dp_delta),
            max_grad_norm=self.dp_max_grad_norm,
            noise_multiplier=self._given(self.dp_noise_multiplier),
            planned_rounds=(self.dp_rounds or self.rounds) if epsilon is not None else None,
        )

    def aggregate_config(self, sampled: int, population: int = 1) -> Any:
        """`aggregate` with this run's flags; under organisation-level DP, for a round that
        sampled `sampled` of `population` sites."""
        from fedsrd_cli.config import AggregateConfig
        from fedsrd_cli.privacy.ledger import OrganisationDp

        org = self.organisation_dp
        return AggregateConfig(
            self.method,
            self.weighting,
            self._given(self.max_update_norm),
            self.on_outlier,
            require_dp=self._given(self.require_dp),
            organisation_dp=None
            if org is None
            else OrganisationDp(*org, max(population, sampled, 1), sampled),
            update_spread=self.step_rule == "fedexp",
        )

    def broadcast_config(self, download_sparsity: float, seed: int, round_index: int | None = None) -> Any:
        """`broadcast` with --download-sparsity and --seed, and the optional flags when given;
        server-lr applies from round server-lr-from on (round_index None: the run's server-lr),
        as `simulate --server-lr-from` and a coordinator running broadcast by hand take it."""
        from fedsrd_cli.config import BroadcastConfig, server_lr_for_round

        given: dict[str, Any] = {}
        if self._given(self.damping) is not None:
            given["damping"] = self.damping
        if self.download_fit:
            given["download_fit"] = self.download_fit
        if self.factor_choice:
            given["factor_choice"] = self.factor_choice
        elif self.organisation_dp is not None or self.secure:
            given["factor_choice"] = "b"  # the only choice DP's and secure rounds allow
        return BroadcastConfig(
            download_sparsity,
            seed,
            self.value_dtype,
            server_lr=server_lr_for_round(self.server_lr, self.server_lr_from, round_index),
            calibrate_step=self.calibrate_step,
            step_rule=self.step_rule,
            **given,
        )

    def download_sparsity_for(self) -> float:
        """--download-sparsity, or the method's default (0 for dense downloads, 0.8 otherwise)."""
        given = self._given(self.download_sparsity)
        return self.algorithm().default_download_sparsity if given is None else given

    def record(self) -> dict[str, Any]:
        """The settings a restarted server must share to resume (all but rounds and timeouts).
        DP settings left at their defaults are not recorded, so runs from before them resume."""
        data = asdict(self)
        for key in ("rounds", "round_timeout", "connect_timeout", "min_clients"):
            data.pop(key)
        defaults = ServerSettings.__dataclass_fields__
        for key in [
            k
            for k in data
            if k.startswith(("dp_", "secure"))
            or k in ("require_dp", "calibrate_step", "server_lr_from", "step_rule")
        ]:
            if data[key] == defaults[key].default:
                data.pop(key)
        if self.record_dp() is not None and self.dp_epsilon > 0:
            data["dp_rounds"] = self.dp_rounds or self.rounds  # the plan a resumed run must keep
        return data


@dataclass(frozen=True)
class SiteSettings:
    """One client site (a SuperNode's node config): its own base model, data, keys and files.

    client_id: this client's id (`--client`); data / eval_data: comma-separated JSON-lines files;
    state_dir: where the site keeps every file of its rounds (global-rN.safetensors, round-N/);
    sign_key / trust: `--sign-key` and `--trust`, as the CLI uses them; device / dtype: training's.
    dp_max_epsilon: this site's own record-level budget (`train-local --dp-max-epsilon`): a round
    the coordinator asks for that would pass it is refused before training (-1: the
    coordinator's planned epsilon).
    threads: torch's threads for training and evaluation (0: one per core idle at the time, as
    `train-local --threads` picks them).
    agreement_key, min_sites, refuse_spread: secure rounds' `sparsify --agreement-key`,
    `--min-sites` and `--refuse-spread` (the trust directory must hold the other sites' NAME.pub
    and NAME.agreement).
    """

    client_id: str = ""
    base: str = ""
    data: str = ""
    eval_data: str = ""
    state_dir: str = ""
    sign_key: str = ""
    trust: str = ""
    device: str = "auto"
    dtype: str = "auto"
    eval_batch_size: int = 16
    dp_max_epsilon: float = -1.0
    threads: int = 0
    agreement_key: str = ""
    min_sites: int = 2
    refuse_spread: bool = False

    def __post_init__(self) -> None:
        from fedsrd_cli.trust.signing import check_party_name

        _require(bool(self.client_id), "node config 'client-id': give this site's client id")
        check_party_name(self.client_id, "node config 'client-id'")
        _require(bool(self.base), "node config 'base': give this site's base model")
        _require(bool(self.data_files), "node config 'data': give this site's training data file(s)")
        _require(bool(self.state_dir), "node config 'state-dir': give a directory for this site's files")
        _require(self.eval_batch_size >= 1, "node config 'eval-batch-size' must be >= 1")
        _require(self.threads >= 0, "node config 'threads' must be >= 0 (0: one per idle core)")
        _require(
            self.dp_max_epsilon < 0 or (math.isfinite(self.dp_max_epsilon) and self.dp_max_epsilon > 0),
            "node config 'dp-max-epsilon' must be > 0 (or -1: none of its own)",
        )

    @classmethod
    def from_node_config(cls, config: Mapping[str, Scalar]) -> SiteSettings:
        # Flower's own node-config keys (partition-id, num-partitions) are not ours to check.
        ours = {k: v for k, v in config.items() if k not in ("partition-id", "num-partitions")}
        return cls(**_from_mapping(cls, ours, "node config"))

    @property
    def data_files(self) -> tuple[Path, ...]:
        return tuple(Path(p) for p in _split(self.data))

    @property
    def eval_files(self) -> tuple[Path, ...]:
        return tuple(Path(p) for p in _split(self.eval_data))
