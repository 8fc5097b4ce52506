"""Protocol rules every algorithm shares: lineage checks, weights, applying a broadcast.

Validation lives here, in functions that raise the domain errors of errors.py, so
algorithms hold only their math.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedsrd_cli.algorithms.base import Payload
from fedsrd_cli.algorithms.site_rank import check_upload_shape, padded_upload
from fedsrd_cli.config import VALUE_DTYPES, AggregateConfig, LoraSpec
from fedsrd_cli.errors import MismatchError, StaleUploadError, UsageError
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import LocalAdapter
from fedsrd_cli.files.artifacts import Artifact, Header
from fedsrd_cli.files.safetensors_io import content_hash, short
from fedsrd_cli.math.lowrank_products import product_frobenius_norm
from fedsrd_cli.math.masks import seeded_keep_mask
from fedsrd_cli.math.quantize import (
    QUANTIZED_BITS,
    dequantize_blocks,
    pack_int4,
    quantize_blocks,
)


def describe_state(state: Artifact) -> str:
    return f"{state.path} (round {state.header.round}, {short(state.header.content_hash)})"


def check_same_lora(expected: LoraSpec, found: LoraSpec, where: str, against: str) -> None:
    """Same rank and alpha. Target lists are compared through the tensors themselves,
    since PEFT records them in several forms (names, paths, a regex)."""
    if (expected.rank, expected.alpha) != (found.rank, found.alpha):
        raise MismatchError(
            f"{where}: LoRA config {found.describe()} differs from {against}'s {expected.describe()}"
        )


def check_same_model(global_state: Artifact, header: Header, where: str) -> None:
    if header.base_fingerprint and header.base_fingerprint != global_state.header.base_fingerprint:
        raise MismatchError(
            f"{where}: made for another base model (fingerprint {short(header.base_fingerprint)},"
            f" {global_state.path} has {short(global_state.header.base_fingerprint)})"
        )


def check_local(global_state: Artifact, local: LocalAdapter) -> None:
    """A client's trained adapter must come from this global state and match its layout."""
    where = str(local.path)
    check_same_lora(global_state.header.lora, local.lora, where, str(global_state.path))
    if local.header is not None:
        check_same_model(global_state, local.header, where)
        if local.header.content_hash == global_state.header.content_hash:
            raise MismatchError(f"{where}: is the global state itself; nothing was trained")
        if local.header.parent_hash != global_state.header.content_hash:
            raise StaleUploadError(
                f"{where}: was trained from state {short(local.header.parent_hash)}, not from "
                f"{describe_state(global_state)}; train again from the current global state"
            )
    check_same_tensors(global_state, local.artifact.shapes, where)


def local_quantization(local: LocalAdapter) -> str | None:
    """The base quantization (train-local --base-quantization: "nf4", "fp4", "int8") the local
    state records, which its upload records too; None for a full-precision base or a PEFT adapter."""
    found = (local.header.info or {}).get("base_quantization") if local.header is not None else None
    return found if isinstance(found, str) and found else None


def check_same_tensors(global_state: Artifact, shapes: dict, where: str) -> None:
    expected = global_state.shapes
    missing = sorted(set(expected) - set(shapes))
    unknown = sorted(set(shapes) - set(expected))
    if missing:
        raise MismatchError(f"{where}: lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")
    if unknown:
        raise MismatchError(
            f"{where}: has {len(unknown)} tensors the global state does not, e.g. {unknown[0]}"
        )
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            raise MismatchError(
                f"{where}: {name} has shape {list(shapes[name])}, the global state {list(shape)}"
            )


def check_uploads(
    global_state: Artifact, uploads: Sequence[Artifact], weighting: str, max_samples: int | None = None
) -> None:
    """Every upload must answer this round of this run, once per client (and record at most
    `max_samples` training samples, when given)."""
    if not uploads:
        raise UsageError("no uploads given")
    round_index = global_state.header.round + 1
    seen_clients: dict[str, str] = {}
    seen_hashes: dict[str, str] = {}
    for upload in uploads:
        head = upload.header
        where = str(upload.path)
        if head.parent_hash != global_state.header.content_hash:
            raise StaleUploadError(
                f"{where}: belongs to round {head.round} (made from state {short(head.parent_hash)}),"
                f" but the global state is {describe_state(global_state)}, expecting round "
                f"{round_index}"
            )
        check_same_lora(global_state.header.lora, head.lora, where, str(global_state.path))
        check_same_model(global_state, head, where)
        for name, shape in head.layout.items():
            if name not in global_state.shapes:
                raise MismatchError(f"{where}: unknown module tensor {name}")
            check_upload_shape(global_state, upload, name, shape, where)
        if head.client_id in seen_clients:
            raise MismatchError(
                f"{where}: client {head.client_id!r} already uploaded {seen_clients[head.client_id]}"
                " for this aggregate"
            )
        if head.content_hash in seen_hashes:
            raise MismatchError(f"{where}: the same upload as {seen_hashes[head.content_hash]}")
        if max_samples is not None and head.num_samples > max_samples:
            raise MismatchError(
                f"{where}: client {head.client_id!r} records {head.num_samples:,} training samples, over"
                f" --max-samples {max_samples:,}"
            )
        if weighting == "samples" and head.num_samples <= 0:
            raise MismatchError(
                f"{where}: records no sample count; use --weighting uniform or sparsify with --samples"
            )
        seen_clients[head.client_id] = where
        seen_hashes[head.content_hash] = where


def client_weights(uploads: Sequence[Artifact], weighting: str) -> list[float]:
    """w_i = 1/m (uniform) or n_i / sum(n) (samples)."""
    if weighting == "samples":
        total = sum(u.header.num_samples for u in uploads)
        return [u.header.num_samples / total for u in uploads]
    return [1.0 / len(uploads)] * len(uploads)


def full_delta(
    upload: Artifact, module: str, factor: str, prev: torch.Tensor, padding: str = "global"
) -> torch.Tensor | None:
    """An upload's dense float64 delta of one factor in the shape of prev, the global factor
    ((r, d_in) for A, (d_out, r) for B): a site-rank upload padded (algorithms.site_rank.padded);
    None when the factor was not uploaded and the site trained every component."""
    name = naming.factor_key(module, factor)
    if upload.header.site_rank() is not None:
        return padded_upload(upload, name, prev, padding)
    stored = upload.upload_delta(name)
    return None if stored is None else stored.double()


def update_norm(global_state: Artifact, upload: Artifact, padding: str = "global") -> float:
    """Frobenius norm of a client's full-rank update, over all modules.

    Per module dW_i = B_i A_i - B A with B_i = B + dB_i, A_i = A + dA_i, taken as the
    product [B_i, -B] @ [A_i; A] (never d_out x d_in); modules add in quadrature:
    ||dW_i|| = sqrt(sum_modules ||dW_i,module||_F^2).
    """
    total = 0.0
    for module in global_state.modules():
        a_prev, b_prev = (t.double() for t in global_state.factors(module))
        delta_a = full_delta(upload, module, "A", a_prev, padding)
        delta_b = full_delta(upload, module, "B", b_prev, padding)
        if delta_a is None and delta_b is None:
            continue
        a_new = a_prev if delta_a is None else a_prev + delta_a.double()
        b_new = b_prev if delta_b is None else b_prev + delta_b.double()
        left = torch.cat([b_new, -b_prev], dim=1)  # (d_out, 2r)
        right = torch.cat([a_new, a_prev], dim=0)  # (2r, d_in)
        total += float(product_frobenius_norm(left, right)) ** 2
    return math.sqrt(total)


def guard_update_norms(
    global_state: Artifact, uploads: Sequence[Artifact], config: AggregateConfig
) -> list[dict]:
    """Apply --max-update-norm: one decision per client, in upload order.

    Each decision is {"client_id", "update_norm", "action": "ok"|"clipped", "scale"}; a
    clipped client's update dW_i is scaled by `scale` = bound / norm so its norm equals the
    bound. With on_outlier "refuse", a client over the bound raises MismatchError.
    Without a bound, returns [] and reads nothing.
    """
    bound = config.max_update_norm
    if bound is None:
        return []
    decisions = []
    for upload in uploads:
        norm = update_norm(global_state, upload, config.rank_padding)
        decision = {"client_id": upload.header.client_id, "update_norm": norm, "action": "ok", "scale": 1.0}
        if norm > bound:
            if config.on_outlier == "refuse":
                raise MismatchError(
                    f"{upload.path}: client {upload.header.client_id!r} has update norm {norm:.6g}, over"
                    f" --max-update-norm {bound:g} (refused; --on-outlier clip would scale it down)"
                )
            decision.update(action="clipped", scale=bound / norm)
        decisions.append(decision)
    return decisions


def check_aggregate(global_state: Artifact, aggregate: Artifact) -> None:
    if aggregate.header.parent_hash != global_state.header.content_hash:
        raise StaleUploadError(
            f"{aggregate.path}: aggregates round {aggregate.header.round} from state "
            f"{short(aggregate.header.parent_hash)}, not from {describe_state(global_state)}"
        )
    check_same_lora(global_state.header.lora, aggregate.header.lora, str(aggregate.path), "global")
    missing = set(global_state.modules()) - set(aggregate.modules())
    if missing or set(aggregate.modules()) - set(global_state.modules()):
        raise MismatchError(f"{aggregate.path}: its modules differ from the global state's")


def round_header(global_state: Artifact, kind: str, **fields: Any) -> Header:
    """The header of a file of round t + 1 made from the round-t `global_state`: its LoRA config,
    base model and content hash (the parent) carried over; `fields`, the rest of the header."""
    head = global_state.header
    return Header(
        kind=kind,
        round=head.round + 1,
        lora=head.lora,
        base_fingerprint=head.base_fingerprint,
        parent_hash=head.content_hash,
        **fields,
    )


def next_state_header(global_state: Artifact, method: str, privacy: dict | None = None) -> Header:
    """The next global state's header; `privacy`: the broadcast's (its sites' ledgers and the
    organisation-level ledger travel on to the state)."""
    return round_header(global_state, "state", method=method, privacy=dict(privacy or {}))


def default_download_seed(global_state: Artifact, aggregate: Artifact) -> int:
    """`broadcast --seed` when none is given: the first 60 bits of the aggregate's content hash,
    or of the global state's when the aggregate carries organisation-level DP (the aggregate's
    hash is a function of the un-noised sum, so a mask drawn from it would depend on the
    sites' data; the global state is public)."""
    source = global_state if "organisation_dp" in aggregate.header.privacy else aggregate
    return int(source.header.content_hash.removeprefix("sha256:")[:15], 16)


def apply_update(
    global_state: Artifact,
    broadcast: Header,
    values: Callable[[str], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The next global state's tensors: G + the broadcast's sparse deltas.

    values(NAME) -> the kept values (kept,) of layout tensor NAME as stored in float, or
    dequantized (Artifact.broadcast_values). For each tensor NAME in the broadcast layout:
        next[NAME] = apply_values(G[NAME], mask(seed, NAME), values(NAME))
    Every other tensor is copied. Every client runs this function, and the coordinator's
    broadcast runs apply_values on the same bits, so they hold the same state.
    """
    out: dict[str, torch.Tensor] = {}
    for name in global_state.names:
        current = global_state.tensor(name)
        if name not in broadcast.layout:
            out[name] = current
            continue
        shape = tuple(broadcast.layout[name])
        mask = seeded_keep_mask(broadcast.seed, name, shape, broadcast.download_sparsity)
        out[name] = apply_values(current, mask, values(name))
    return out


def apply_values(current: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One factor after a broadcast: current (rows, cols) + the (kept,) values scattered to the
    bool mask (rows, cols), in current's dtype: next = current + scatter(mask, values)."""
    update = torch.zeros(current.shape, dtype=current.dtype)
    update[mask] = values.to(current.dtype)
    return current + update


def encode_values(values: torch.Tensor, value_dtype: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """An upload's or broadcast's values as stored, and as every reader decodes them.

    values: (kept,) kept values, or an upload's dense delta (rows, cols).
    -> ({suffix: stored tensor}, float32 values decoded from those tensors, computed as
    Artifact.upload_entries / broadcast_values compute them from the file). Stored: fp32, bf16,
    fp16: {".values": the values in that dtype, their shape}; int8, int4: {".values": the block
    codes of the values in row-major order, 1-D (int8; int4 packed two a byte), ".scales":
    float32 block scales} (math.quantize), decoded (n,): value_i = code_i * scale_(i // 64).
    """
    if value_dtype not in QUANTIZED_BITS:
        stored = values.to(VALUE_DTYPES[value_dtype])
        return {naming.VALUES: stored}, stored.float()
    codes, scales = quantize_blocks(values, QUANTIZED_BITS[value_dtype])
    stored = pack_int4(codes) if value_dtype == "int4" else codes  # unpack_int4 gives codes back exactly
    return {naming.VALUES: stored, naming.SCALES: scales}, dequantize_blocks(codes, scales)


def apply_broadcast(global_state: Artifact, broadcast: Artifact) -> Payload:
    """Client side: check the broadcast belongs to this state, apply it, check the result hash."""
    head = broadcast.header
    if head.parent_hash != global_state.header.content_hash:
        raise StaleUploadError(
            f"{broadcast.path}: is the round-{head.round} update of state {short(head.parent_hash)},"
            f" not of {describe_state(global_state)}"
        )
    check_same_lora(global_state.header.lora, head.lora, str(broadcast.path), "global")
    for name, shape in head.layout.items():
        if tuple(shape) != global_state.shapes.get(name):
            raise MismatchError(f"{broadcast.path}: {name} does not match the global state")
    tensors = apply_update(global_state, head, broadcast.broadcast_values)
    result = content_hash(tensors)
    if result != head.result_hash:
        raise MismatchError(
            f"{broadcast.path}: applying it gives state {short(result)}, but the"
            f" coordinator's is {short(head.result_hash)}; a file is corrupt or from another run"
        )
    return Payload(next_state_header(global_state, head.method, head.privacy), tensors)


def initial_state(
    module_shapes: dict[str, tuple[int, int]], lora: LoraSpec, seed: int, base_fingerprint: str
) -> Payload:
    """Round 0: for every module, A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) and B = 0, as PEFT does.

    module_shapes: {module: (d_out, d_in)}. PEFT draws A with kaiming_uniform_(a=sqrt(5)),
    whose bound is sqrt(6 / ((1 + 5) d_in)) = 1/sqrt(d_in). Each module's draw is seeded from
    sha256(f"{seed}:{module}"), so it does not depend on module order.
    """
    tensors: dict[str, torch.Tensor] = {}
    for module, (d_out, d_in) in module_shapes.items():
        digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        bound = 1.0 / math.sqrt(d_in)
        a = (torch.rand(lora.rank, d_in, generator=generator) * 2.0 - 1.0) * bound  # (r, d_in)
        tensors[naming.factor_key(module, "A")] = a
        tensors[naming.factor_key(module, "B")] = torch.zeros(d_out, lora.rank)  # (d_out, r)
    header = Header(kind="state", round=0, lora=lora, base_fingerprint=base_fingerprint, info={"seed": seed})
    return Payload(header, tensors)
