"""`Method`: an Algorithm assembled from one encoder, one combiner and one decomposer.

Every registered method (FedSRD, its ablations, the baselines) is a subclass that
picks its three pieces from .steps; this class runs them module by module, checks
lineage through .protocol, and builds the headers. Nothing here touches a file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from fedsrd_cli.algorithms.base import Algorithm, Payload, Track, no_progress
from fedsrd_cli.algorithms.diagnostics import (
    UPDATE_SKETCH_WIDTH,
    BroadcastDiagnostics,
    Fidelity,
    ModuleMeasure,
    ModuleSpread,
    module_sketch,
    module_spread,
    sketch_record,
    sketch_seed,
    update_spread,
    upload_fidelity,
)
from fedsrd_cli.algorithms.private import (
    PrivateDownload,
    aggregate_privacy,
    broadcast_privacy,
    upload_privacy,
)
from fedsrd_cli.algorithms.protocol import (
    apply_values,
    check_aggregate,
    check_local,
    check_uploads,
    client_weights,
    encode_values,
    guard_update_norms,
    local_quantization,
    next_state_header,
    round_header,
)
from fedsrd_cli.algorithms.site_rank import check_recorded_rank, padded, trained_part
from fedsrd_cli.algorithms.steps import (
    ClientFactors,
    Download,
    Encoded,
    FactorDelta,
    ModuleUpdate,
    average_factors,
    client_factors,
    clip_clients,
    encode_dense,
    private_b_update,
    reconstruct_balanced,
    reconstruct_truncated,
    truncation_route,
    upload_seed,
    with_previous,
)
from fedsrd_cli.config import QUANTIZED_VALUE_DTYPES, AggregateConfig, BroadcastConfig, SparsifyConfig
from fedsrd_cli.errors import MismatchError, UsageError
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import LocalAdapter
from fedsrd_cli.files.artifacts import Artifact
from fedsrd_cli.files.safetensors_io import content_hash
from fedsrd_cli.limits import MAX_SERVER_LR
from fedsrd_cli.math.lowrank import align_factors
from fedsrd_cli.math.masks import seeded_keep_mask
from fedsrd_cli.math.positions import store_mask
from fedsrd_cli.math.threads import thread_map

Encoder = Callable[[FactorDelta, SparsifyConfig], Encoded]
# (clients, weights, rank, truncation) -> the factored aggregate (left (d_out, k), right (k, d_in))
Combiner = Callable[[ClientFactors, Sequence[float], int, str], tuple[torch.Tensor, torch.Tensor]]
Decomposer = Callable[
    [str, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Download], ModuleUpdate
]


class _LazyMasks(dict):
    """factor -> the module's seeded download mask of that factor, drawn on first use."""

    def __init__(self, config: BroadcastConfig, module: str, shapes: dict[str, torch.Size]):
        super().__init__()
        self.config, self.module, self.shapes = config, module, shapes

    def __missing__(self, factor: str) -> torch.Tensor:
        name = naming.factor_key(self.module, factor)
        mask = seeded_keep_mask(
            self.config.seed, name, tuple(self.shapes[factor]), self.config.download_sparsity
        )
        self[factor] = mask
        return mask


@dataclass(frozen=True)
class _Decomposed:
    """One module's broadcast: whether its factor choice fell back, its stored tensors and their
    layout {PEFT name: shape}, its factors after the download {"A", "B"}, and its figures."""

    fell_back: bool
    stored: dict[str, torch.Tensor]
    layout: dict[str, list[int]]
    after: dict[str, torch.Tensor]
    measured: ModuleMeasure


def _scattered(kept: torch.Tensor, values: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """kept (rows, cols) bool, values (count,) in row-major order of the kept positions ->
    (rows, cols) in `dtype`, the values at their positions and zero elsewhere."""
    return torch.zeros(kept.shape, dtype=dtype).masked_scatter_(kept, values.to(dtype))


def coordinator_step(aggregate: Artifact, config: BroadcastConfig, private: bool) -> tuple[float, dict]:
    """The broadcast's step s (X' = X + s dX) and what set it ({} when nothing but server_lr did).

    s = server_lr, times FedExP's eta with step_rule "fedexp" (the aggregate's update_spread,
    math.extrapolation), divided with calibrate_step by the gain the aggregate recorded from its
    uploads (diagnostics.upload_fidelity), capped at MAX_SERVER_LR. Without a positive gain
    (secure sums, old uploads) calibrate_step changes nothing. Under organisation-level DP no
    rule may read the sites' data: calibrate_step is ignored and "fedexp" refused.
    """
    info = aggregate.header.info
    step, record = config.server_lr, {}
    if config.step_rule == "fedexp":
        if private:
            raise UsageError(
                "--step-rule fedexp reads the sites' own update norms; under organisation-level DP"
                " no step may: broadcast with --step-rule fixed"
            )
        spread = info.get("update_spread")
        if spread is None:
            how = " (secure: with a roster made with --update-spread)" if "secure" in info else ""
            raise MismatchError(
                f"{aggregate.path}: records no update spread; --step-rule fedexp needs an"
                f" aggregate made with `aggregate --update-spread`{how}"
            )
        step *= spread["extrapolation"]
        record.update(rule="fedexp", extrapolation=spread["extrapolation"])
    gain = info.get("upload_fidelity", {}).get("gain")
    if config.calibrate_step and not private and gain and gain > 0 and math.isfinite(gain):
        step /= gain
        record["upload_gain"] = gain
    if not record:
        return config.server_lr, {}
    return min(step, MAX_SERVER_LR), {"target": config.server_lr, **record}


class Method(Algorithm):
    """Upload = `encode` per factor; aggregate = `combine` per module; broadcast = `decompose`.

    Subclasses set:
      name           the method's name (aggregates, broadcasts and states record it)
      upload_method  the name uploads record; aggregate accepts only uploads with this name
                     (several server-side variants share FedSRD's client step, "fedsrd")
      encode, combine, decompose   pieces from .steps (`combine` only sees modules that some
                     client changed; an unchanged module aggregates to (B_prev, A_prev) here)
      random_upload  whether `encode` draws a seeded random mask (the seed is recorded)
      upload_settings the SparsifyConfig fields `encode` uses; uploads record exactly these
      dense_download True when the broadcast sends whole factors: download sparsity must be 0
      dense_upload   True when `encode` sends whole factor deltas (the coordinator then holds
                     every site's update, to the value dtype's rounding)
    """

    name: str
    upload_method: str
    encode: Encoder
    combine: Combiner
    decompose: Decomposer
    random_upload: bool = False
    upload_settings: tuple[str, ...] = ("value_dtype",)

    @property  # type: ignore[override]
    def dense_upload(self) -> bool:
        return self.encode is encode_dense

    # ------------------------------------------------------------------ client: upload

    def upload(
        self,
        global_state: Artifact,
        local: LocalAdapter,
        client_id: str,
        num_samples: int,
        config: SparsifyConfig,
        track: Track = no_progress,
    ) -> Payload:
        check_local(global_state, local)
        head = global_state.header
        seed = upload_seed(head.content_hash, client_id)
        tensors: dict[str, torch.Tensor] = {}
        layout: dict[str, list[int]] = {}
        ratios: dict[str, float] = {}
        round_index = head.round + 1
        only = self.trained_factor(round_index)
        # train-local --rank r_i < r, else None
        site_rank = check_recorded_rank(local.header, head.lora.rank, str(local.path))
        modules = global_state.modules()
        fidelity = Fidelity()  # the reconstruction the coordinator will make against the exact update
        sketch = torch.zeros(UPDATE_SKETCH_WIDTH, dtype=torch.float64) if config.update_sketch else None
        seed_of_sketch = sketch_seed(head.content_hash)
        for module in track(modules, len(modules), "sparsify"):
            a_prev, b_prev = global_state.factors(module)  # (r, d_in), (d_out, r)
            a_new, b_new = (t.float() for t in local.factors(module))
            deltas = (("B", b_new - b_prev.float()), ("A", a_new - a_prev.float()))
            # A site rank r_i sends the components it trained: B's first r_i columns, A's rows.
            a_seen, b_seen = a_prev, b_new  # what the importance scores of a (sliced) delta read
            if site_rank is not None:
                where = str(local.path)
                deltas = tuple((f, trained_part(f, d, site_rank, where)) for f, d in deltas)
                a_seen, b_seen = a_prev[:site_rank], b_new[:, :site_rank]
            decoded: dict[str, torch.Tensor] = {}  # factor -> the dense delta the coordinator decodes
            for factor, delta in deltas:
                if not bool(delta.any()):
                    continue  # an unchanged matrix uploads nothing
                name = naming.factor_key(module, factor)
                if only is not None and factor != only:
                    raise MismatchError(
                        f"{name} changed, but {self.name} trains only lora_{only} in round"
                        f" {round_index}; train with `train-local {self.training_flag}` and sparsify again"
                    )
                encoded = self.encode(FactorDelta(name, factor, delta, a_seen, b_seen, seed), config)
                if encoded.kept is None:
                    chosen = encoded.values  # (rows, cols)
                else:
                    chosen = encoded.values[encoded.kept]  # (kept,)
                    coded, stored = store_mask(encoded.kept)  # the smaller form
                    tensors[naming.positions_key(name) if coded else naming.mask_key(name)] = stored
                stored_values, sent = encode_values(chosen, config.value_dtype)  # sent: as decoded, fp32
                for suffix, tensor in stored_values.items():
                    tensors[name + suffix] = tensor  # X.values (and X.scales for int8 / int4)
                # What the coordinator decodes (fidelity is measured on it): dequantized codes too.
                if encoded.kept is None:
                    decoded[factor] = sent.reshape(delta.shape)
                else:
                    decoded[factor] = _scattered(encoded.kept, sent)
                layout[name] = list(delta.shape)
                if encoded.ratio is not None:
                    ratios[name] = round(encoded.ratio, 6)
            prev_b, prev_a = b_prev.double(), a_prev.double()
            if site_rank is not None:  # back to rank r: the untrained components are the global ones
                prevs = {"B": b_prev, "A": a_prev}
                decoded = {f: padded(f, d, prevs[f].float(), "global") for f, d in decoded.items()}
            sent_b = prev_b + decoded["B"].double() if "B" in decoded else prev_b
            sent_a = prev_a + decoded["A"].double() if "A" in decoded else prev_a
            exact = [(b_new.double(), a_new.double()), (-prev_b, prev_a)]  # D = B' A' - B A
            fidelity.add(exact, [(sent_b, sent_a), (-prev_b, prev_a)])  # E = (B + dB)(A + dA) - B A
            if sketch is not None:
                sketch += module_sketch(seed_of_sketch, module, exact, UPDATE_SKETCH_WIDTH)
        if not tensors:
            raise MismatchError(f"{local.path}: identical to the global state; nothing to upload")
        used = asdict(config)
        info: dict = {
            "sparsify": {key: used[key] for key in self.upload_settings},
            "lora_numel": global_state.numel(),
            "fidelity": fidelity.record(),
            **({} if sketch is None else {"update_sketch": sketch_record(sketch)}),
        }
        if config.value_dtype in QUANTIZED_VALUE_DTYPES:  # read by the layout check, as a broadcast's
            info["value_dtype"] = config.value_dtype
        if ratios:
            info["prune_ratio"] = ratios
        if self.random_upload:
            info["upload_seed"] = seed
        quantized = local_quantization(local)
        if quantized is not None:  # only then: a full-precision site's upload keeps its bytes
            info["base_quantization"] = quantized
        if site_rank is not None:  # likewise: a full-rank site's upload keeps its bytes
            info["site_rank"] = site_rank
        header = round_header(
            global_state,
            "upload",
            method=self.upload_method,
            client_id=client_id,
            num_samples=num_samples,
            layout=layout,
            info=info,
            privacy=upload_privacy(local.header),
        )
        return Payload(header, tensors)

    # ------------------------------------------------------------------ coordinator: aggregate

    def aggregate(
        self,
        global_state: Artifact,
        uploads: Sequence[Artifact],
        config: AggregateConfig,
        track: Track = no_progress,
    ) -> Payload:
        org = config.organisation_dp
        if org is not None and org.sampled != len(uploads):
            raise UsageError(
                f"organisation-level DP sampled {org.sampled} sites, but {len(uploads)} uploads came"
            )
        if uploads or org is None:  # organisation-level Poisson sampling may take no site at all
            check_uploads(global_state, uploads, config.weighting, config.max_samples)
        for upload in uploads:
            if upload.header.method != self.upload_method:
                raise MismatchError(
                    f"{upload.path}: was made by `sparsify --method {upload.header.method}`, but"
                    f" `aggregate --method {self.name}` needs uploads from"
                    f" `sparsify --method {self.upload_method}`"
                )
        privacy = aggregate_privacy(global_state, uploads, config)
        if org is None:
            weights = client_weights(uploads, config.weighting)
            decisions = guard_update_norms(global_state, uploads, config)
            previous_weight = 0.0
        else:  # every site's update clipped to C; the sum divided by D, fixed (docs/privacy.md)
            weights = [1.0 / org.denominator] * len(uploads)
            clip = replace(
                config, max_update_norm=org.clip, on_outlier="clip", organisation_dp=None, max_epsilon=None
            )
            decisions = guard_update_norms(global_state, uploads, clip)
            previous_weight = 1.0 - sum(weights)
        scales = [d["scale"] for d in decisions] or [1.0] * len(uploads)
        rank = global_state.header.lora.rank
        terms = len(weights) + sum(1 for scale in scales if scale < 1.0)  # clipped clients add a term
        route = truncation_route(config.truncation, terms * rank, rank)  # decided once, recorded below

        spread_weights = [w * s for w, s in zip(weights, scales, strict=True)]
        # Sparsified uploads are not their sites' updates: their sketches stand in (update_spread).
        spread_seed = None if self.dense_upload else sketch_seed(global_state.header.content_hash)

        def combined(module: str) -> tuple[torch.Tensor, torch.Tensor, ModuleSpread | None]:
            """The module's aggregate W = left (d_out, k) @ right (k, d_in), float32, and its
            share of the update spread (with --update-spread; else None)."""
            clients = client_factors(global_state, uploads, module, config.rank_padding)
            spread = module_spread(clients, spread_weights, spread_seed) if config.update_spread else None
            module_weights = weights
            if not (clients.changed_a or clients.changed_b):
                # No client changed this module: W = B_prev A_prev exactly, for every method.
                left, right = clients.b_prev, clients.a_prev
            else:
                if any(scale < 1.0 for scale in scales):
                    clients, module_weights = clip_clients(clients, module_weights, scales)
                if previous_weight != 0.0:
                    clients, module_weights = with_previous(clients, module_weights, previous_weight)
                left, right = self.combine(clients, module_weights, rank, route)
                if config.align:  # W's rank-r factors in the clients' own scale
                    mean_b, mean_a = average_factors(clients, module_weights, rank, route)
                    left, right = align_factors(left, right, mean_b, mean_a)
            return left.float(), right.float(), spread

        tensors: dict[str, torch.Tensor] = {}
        modules = global_state.modules()
        spread_sum = ModuleSpread([0.0] * len(uploads), 0.0, None)  # summed in module order
        # Modules are independent: as many at once as torch has threads (math.threads.thread_map).
        results = track(thread_map(combined, modules), len(modules), "aggregate")
        for module, (left, right, spread) in zip(modules, results, strict=True):
            left_name, right_name = naming.aggregate_keys(module)
            tensors[left_name] = left  # (d_out, k)
            tensors[right_name] = right  # (k, d_in)
            if spread is not None:
                spread_sum = spread_sum.plus(spread)
        header = round_header(
            global_state,
            "aggregate",
            method=self.name,
            info={
                "weighting": config.weighting,
                "clients": [
                    {"client_id": u.header.client_id, "upload": u.header.content_hash, "weight": w}
                    for u, w in zip(uploads, weights, strict=True)
                ],
                **(
                    {"truncation": route}
                    if self.combine in (reconstruct_truncated, reconstruct_balanced)
                    else {}
                ),
                **(
                    {
                        "max_update_norm": config.max_update_norm,
                        "on_outlier": config.on_outlier,
                        "update_norms": decisions,
                    }
                    if decisions and org is None
                    else {}
                ),
                **({"update_norms": decisions} if org is not None else {}),
                **({"aligned": True} if config.align else {}),
                **(
                    {"rank_padding": config.rank_padding}
                    if any(u.header.site_rank() is not None for u in uploads)
                    else {}
                ),
                **upload_fidelity(uploads, weights),
                **(
                    update_spread(uploads, weights, scales, spread_sum, self.dense_upload, MAX_SERVER_LR)
                    if config.update_spread
                    else {}
                ),
            },
            privacy=privacy,
        )
        return Payload(header, tensors)

    # ------------------------------------------------------------------ coordinator: broadcast

    def broadcast(
        self,
        global_state: Artifact,
        aggregate: Artifact,
        config: BroadcastConfig,
        track: Track = no_progress,
    ) -> tuple[Payload, Payload]:
        check_aggregate(global_state, aggregate)
        if aggregate.header.method != self.name:
            raise MismatchError(
                f"{aggregate.path}: is a {aggregate.header.method} aggregate, not {self.name}"
            )
        if self.dense_download and config.download_sparsity != 0.0:
            raise UsageError(
                f"{self.name} sends whole factors down; --download-sparsity must be 0 (or left out),"
                f" got {config.download_sparsity}"
            )
        round_index = global_state.header.round + 1
        private = PrivateDownload.of(global_state, aggregate, config)  # None without organisation DP
        secure = "secure" in aggregate.header.info  # the aggregate is exact on A's row space only
        if secure and config.factor_choice != "b":
            raise UsageError(
                f"{aggregate.path} is the sum of a secure round, exact only where a B update sees it:"
                f" broadcast it with --factor-choice b (its default), not {config.factor_choice}"
            )
        decompose = self.decompose if private is None else private_b_update
        step, calibration = coordinator_step(aggregate, config, private is not None)
        diagnostics = BroadcastDiagnostics(target_known=private is None and not secure)

        def decomposed(module: str) -> _Decomposed:
            """The module's download and the factors it leaves, touching nothing shared."""
            prev = dict(zip(("A", "B"), global_state.factors(module), strict=True))  # fp32
            a_prev, b_prev = prev["A"].double(), prev["B"].double()  # (r, d_in), (d_out, r)
            left_name, right_name = naming.aggregate_keys(module)
            left = aggregate.tensor(left_name).double()  # (d_out, k)
            right = aggregate.tensor(right_name).double()  # (k, d_in)
            masks = _LazyMasks(config, module, {"A": a_prev.shape, "B": b_prev.shape})

            def as_sent(factor: str, delta: torch.Tensor) -> torch.Tensor:
                """The factor's dense delta as clients will apply it: masked, stored, decoded."""
                mask = masks[factor]
                _, kept = encode_values(delta[mask], config.value_dtype)  # (kept,)
                return _scattered(mask, kept, delta.dtype)

            download = Download(
                masks.__getitem__,
                1.0 - config.download_sparsity,
                config.damping,
                config.download_fit,
                config.factor_choice,
                None if private is None else private.noise,
                as_sent,
                bool(aggregate.header.info.get("aligned", False)),
            )
            update = decompose(module, round_index, a_prev, b_prev, left, right, download)
            after = dict(prev)
            stored: dict[str, torch.Tensor] = {}
            shapes: dict[str, list[int]] = {}
            for factor, delta in update.deltas:
                if not bool(delta.any()):
                    continue  # nothing changed this factor
                if step != 1.0:  # the coordinator's step: X' = X + server_lr * dX
                    delta = delta * step
                name = naming.factor_key(module, factor)
                mask = masks[factor]
                encoded, values = encode_values(delta[mask], config.value_dtype)  # values: (kept,)
                stored.update({name + suffix: tensor for suffix, tensor in encoded.items()})
                shapes[name] = list(delta.shape)
                after[factor] = apply_values(prev[factor], mask, values)  # as every client will
            measured = diagnostics.measure(left, right, prev, after, update.reach_miss, update.products)
            return _Decomposed(update.fell_back, stored, shapes, after, measured)

        tensors: dict[str, torch.Tensor] = {}
        layout: dict[str, list[int]] = {}
        fallbacks: list[str] = []
        next_tensors: dict[str, torch.Tensor] = {}  # the next state, built as apply_update builds it
        modules = global_state.modules()
        # Modules are independent: as many at once as torch has threads (math.threads.thread_map),
        # except under organisation-level DP, whose noise is one stream drawn in module order.
        workers = 1 if private is not None else None
        results = track(thread_map(decomposed, modules, workers), len(modules), "broadcast")
        for module, done in zip(modules, results, strict=True):  # recorded in module order
            if done.fell_back:
                fallbacks.append(module)
            tensors.update(done.stored)
            layout.update(done.layout)
            diagnostics.add(module, done.measured)
            next_tensors.update({naming.factor_key(module, f): t for f, t in done.after.items()})
        header = round_header(
            global_state,
            "broadcast",
            method=self.name,
            # The aggregate's hash is a function of the un-noised sum: not sent under organisation DP.
            aggregate_hash=aggregate.header.content_hash if private is None else "",
            seed=config.seed,
            download_sparsity=config.download_sparsity,
            layout=layout,
            info={
                "factor_fallbacks": fallbacks,
                "value_dtype": config.value_dtype,
                "lora_numel": global_state.numel(),
                **({"server_lr": step} if step != 1.0 else {}),
                **({"step_calibration": calibration} if calibration else {}),
                **(
                    {}
                    if self.dense_download
                    else {
                        "damping": config.damping,
                        "download_fit": config.download_fit,
                        "factor_choice": config.factor_choice,
                    }
                ),
                **diagnostics.record(),
                **({} if private is None else {"organisation_dp": private.record()}),
            },
            privacy=broadcast_privacy(global_state, aggregate, round_index),
        )
        if not tensors:
            raise MismatchError(f"{aggregate.path}: the aggregate changes no module; nothing to send")
        for name in global_state.names:  # anything no module owns is carried over, as apply_update does
            next_tensors.setdefault(name, global_state.tensor(name))
        header = replace(header, result_hash=content_hash(next_tensors))
        return Payload(header, tensors), Payload(
            next_state_header(global_state, self.name, header.privacy), next_tensors
        )
