"""FedSRD and FedSRD-e: Sparsify (client), Reconstruct + aggregate, Decompose (coordinator).

See ../shared/fedsrd-method.md. Every step runs module by module; the math is in
fedsrd_cli.math, the checks in .protocol, and nothing here touches a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace

import torch

from fedsrd_cli import naming
from fedsrd_cli.algorithms.base import Algorithm, Payload, Track, no_progress
from fedsrd_cli.algorithms.protocol import (
    apply_update,
    check_aggregate,
    check_local,
    check_uploads,
    client_weights,
    guard_update_norms,
    next_state_header,
)
from fedsrd_cli.artifacts import Artifact, Header, LocalAdapter, content_hash
from fedsrd_cli.config import VALUE_DTYPES, AggregateConfig, BroadcastConfig, SparsifyConfig
from fedsrd_cli.errors import MismatchError
from fedsrd_cli.math.importance import importance_a, importance_b, sparsify_delta
from fedsrd_cli.math.lowrank import (
    choose_factor,
    stack_factors,
    truncate_product,
    update_a,
    update_b,
)
from fedsrd_cli.math.masks import pack_bits, seeded_keep_mask


class FedSRD(Algorithm):
    """FedSRD (`exact=False`: project the aggregate to rank r) or FedSRD-e (`exact=True`)."""

    def __init__(self, exact: bool = False):
        self.exact = exact
        self.name = "fedsrd-e" if exact else "fedsrd"

    # ------------------------------------------------------------------ client: sparsify

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
        value_dtype = VALUE_DTYPES[config.value_dtype]
        tensors: dict[str, torch.Tensor] = {}
        layout: dict[str, list[int]] = {}
        ratios: dict[str, float] = {}
        modules = global_state.modules()
        for module in track(modules, len(modules), "sparsify"):
            a_prev, b_prev = global_state.factors(module)  # (r, d_in), (d_out, r)
            a_new, b_new = (t.float() for t in local.factors(module))
            delta_a = a_new - a_prev.float()  # (r, d_in)
            delta_b = b_new - b_prev.float()  # (d_out, r)
            scored = (
                ("B", delta_b, importance_b(delta_b, a_prev)),
                ("A", delta_a, importance_a(delta_a, b_new)),
            )
            for factor, delta, scores in scored:
                if not bool(delta.any()):
                    continue  # an unchanged matrix uploads nothing
                pruned, kept, ratio = sparsify_delta(
                    delta,
                    scores,
                    config.base_sparsity,
                    config.kurtosis_coeff,
                    config.kurtosis_cap,
                    config.rescale,
                )
                name = naming.factor_key(module, factor)
                tensors[naming.values_key(name)] = pruned[kept].to(value_dtype)  # (kept,)
                tensors[naming.mask_key(name)] = pack_bits(kept)  # (ceil(n/8),)
                layout[name] = list(delta.shape)
                ratios[name] = round(ratio, 6)
        if not tensors:
            raise MismatchError(f"{local.path}: identical to the global state; nothing to upload")
        head = global_state.header
        header = Header(
            kind="upload",
            round=head.round + 1,
            lora=head.lora,
            base_fingerprint=head.base_fingerprint,
            parent_hash=head.content_hash,
            method="fedsrd",
            client_id=client_id,
            num_samples=num_samples,
            layout=layout,
            info={
                "sparsify": asdict(config),
                "prune_ratio": ratios,
                "lora_numel": global_state.numel(),
            },
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
        check_uploads(global_state, uploads, config.weighting)
        weights = client_weights(uploads, config.weighting)
        decisions = guard_update_norms(global_state, uploads, config)
        scales = [d["scale"] for d in decisions] or None
        rank = global_state.header.lora.rank
        tensors: dict[str, torch.Tensor] = {}
        modules = global_state.modules()
        for module in track(modules, len(modules), "aggregate"):
            left, right = reconstruct_and_aggregate(
                global_state, uploads, weights, module, None if self.exact else rank, scales
            )
            left_name, right_name = naming.aggregate_keys(module)
            tensors[left_name] = left.float()  # (d_out, k)
            tensors[right_name] = right.float()  # (k, d_in)
        head = global_state.header
        header = Header(
            kind="aggregate",
            round=head.round + 1,
            lora=head.lora,
            base_fingerprint=head.base_fingerprint,
            parent_hash=head.content_hash,
            method=self.name,
            info={
                "weighting": config.weighting,
                "clients": [
                    {"client_id": u.header.client_id, "upload": u.header.content_hash, "weight": w}
                    for u, w in zip(uploads, weights, strict=True)
                ],
                **(
                    {
                        "max_update_norm": config.max_update_norm,
                        "on_outlier": config.on_outlier,
                        "update_norms": decisions,
                    }
                    if decisions
                    else {}
                ),
            },
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
        round_index = global_state.header.round + 1
        value_dtype = VALUE_DTYPES[config.value_dtype]
        keep_prob = 1.0 - config.download_sparsity
        tensors: dict[str, torch.Tensor] = {}
        layout: dict[str, list[int]] = {}
        fallbacks: list[str] = []
        modules = global_state.modules()
        for module in track(modules, len(modules), "broadcast"):
            a_prev, b_prev = (t.double() for t in global_state.factors(module))
            left_name, right_name = naming.aggregate_keys(module)
            left = aggregate.tensor(left_name).double()  # (d_out, k)
            right = aggregate.tensor(right_name).double()  # (k, d_in)
            factor = choose_factor(round_index, b_prev, a_prev)
            if factor != ("B" if round_index % 2 == 1 else "A"):
                fallbacks.append(module)
            update = update_b if factor == "B" else update_a
            delta = update(left, right, b_prev, a_prev)  # (d_out, r) or (r, d_in)
            if not bool(delta.any()):
                continue  # no client changed this module
            name = naming.factor_key(module, factor)
            mask = seeded_keep_mask(config.seed, name, tuple(delta.shape), config.download_sparsity)
            tensors[naming.values_key(name)] = (delta[mask] / keep_prob).to(value_dtype)  # (kept,)
            layout[name] = list(delta.shape)
        head = global_state.header
        header = Header(
            kind="broadcast",
            round=round_index,
            lora=head.lora,
            base_fingerprint=head.base_fingerprint,
            parent_hash=head.content_hash,
            method=self.name,
            aggregate_hash=aggregate.header.content_hash,
            seed=config.seed,
            download_sparsity=config.download_sparsity,
            layout=layout,
            info={
                "factor_fallbacks": fallbacks,
                "value_dtype": config.value_dtype,
                "lora_numel": global_state.numel(),
            },
        )
        if not tensors:
            raise MismatchError(f"{aggregate.path}: the aggregate changes no module; nothing to send")
        next_tensors = apply_update(global_state, header, tensors.__getitem__)
        header = replace(header, result_hash=content_hash(next_tensors))
        return Payload(header, tensors), Payload(next_state_header(global_state, self.name), next_tensors)


def reconstruct_and_aggregate(
    global_state: Artifact,
    uploads: Sequence[Artifact],
    weights: Sequence[float],
    module: str,
    rank: int | None,
    scales: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (left (d_out, k), right (k, d_in)) of one module's aggregated target W_r.

    B_i = B_prev + dB_i, A_i = A_prev + dA_i;  W = sum_i w_i B_i A_i;
    W_r = best rank-`rank` approximation of W (rank None: W itself, FedSRD-e).
    A module no client changed returns (B_prev, A_prev): W = B_prev A_prev exactly.
    scales[i] = s_i < 1 (a clipped client) replaces B_i A_i by B A + s_i (B_i A_i - B A),
    i.e. two stacked terms w_i s_i B_i A_i + w_i (1 - s_i) B A.
    """
    a_prev, b_prev = (t.double() for t in global_state.factors(module))
    name_a, name_b = naming.factor_key(module, "A"), naming.factor_key(module, "B")
    bs, as_, ws = [], [], []
    changed = False
    for index, upload in enumerate(uploads):
        delta_a, delta_b = upload.upload_delta(name_a), upload.upload_delta(name_b)
        changed = changed or delta_a is not None or delta_b is not None
        as_.append(a_prev if delta_a is None else a_prev + delta_a.double())
        bs.append(b_prev if delta_b is None else b_prev + delta_b.double())
        scale = 1.0 if scales is None else scales[index]
        ws.append(weights[index] * scale)
        if scale < 1.0:
            bs.append(b_prev)
            as_.append(a_prev)
            ws.append(weights[index] * (1.0 - scale))
    if not changed:
        return b_prev, a_prev
    left, right = stack_factors(bs, as_, ws)  # (d_out, m r), (m r, d_in) (wider with clipping)
    if rank is None:
        return left, right
    return truncate_product(left, right, rank)
