"""A rank per site: uploads that carry only a site's first r_i rank components, padded back.

A site of rank r_i <= r (`train-local --rank`) trains rank components 0..r_i-1 of every module
and keeps the others at the global state's values, so its factors are
    B_i = [B[:, :r_i] + dB_i | B[:, r_i:]]  (d_out, r),   A_i = [A[:r_i] + dA_i ; A[r_i:]]  (r, d_in)
and its upload stores dB_i (d_out, r_i) and dA_i (r_i, d_in) with info.site_rank = r_i.
The coordinator pads each delta back to the global shape (docs/algorithms.md, "A rank per site"):
  padding "global" (the default): zeros, i.e. the untrained components are the global ones, so
      B_i A_i above is reconstructed exactly;
  padding "zeros" (HetLoRA's zero padding): the site's factors count as 0 past r_i, i.e. the
      delta there is -B[:, r_i:] and -A[r_i:], so B_i A_i = B_i[:, :r_i] A_i[:r_i].
Nothing here reads or writes a file.
"""

from __future__ import annotations

import torch

from fedsrd_cli.errors import MismatchError
from fedsrd_cli.files import naming
from fedsrd_cli.files.artifacts import Artifact, Header


def sliced_shape(factor: str, shape: tuple[int, ...], site_rank: int) -> tuple[int, int]:
    """The stored shape of a factor's delta at rank r_i: B (d_out, r) -> (d_out, r_i),
    A (r, d_in) -> (r_i, d_in)."""
    rows, cols = shape
    return (rows, site_rank) if factor == "B" else (site_rank, cols)


def trained_part(factor: str, delta: torch.Tensor, site_rank: int, where: str) -> torch.Tensor:
    """delta (d_out, r) for B or (r, d_in) for A -> its first r_i columns (B) or rows (A).

    MismatchError if the site changed anything past r_i: its upload could not say so."""
    if factor == "B":
        kept, rest = delta[:, :site_rank], delta[:, site_rank:]
    else:
        kept, rest = delta[:site_rank], delta[site_rank:]
    if bool(rest.any()):
        raise MismatchError(
            f"{where}: records site rank {site_rank} but changed lora_{factor} past it; train again"
            f" with `train-local --rank {site_rank}`"
        )
    return kept


def padded(factor: str, stored: torch.Tensor, prev: torch.Tensor, padding: str) -> torch.Tensor:
    """A site's stored delta, (d_out, r_i) for B or (r_i, d_in) for A, -> prev's shape.

    The untrained part is 0 with padding "global" and -prev there with "zeros", so
    prev + padded is [B_i | B[:, r_i:]] or [B_i | 0] (likewise A by rows). Same dtype as prev."""
    full = torch.zeros_like(prev)
    if factor == "B":
        site_rank = stored.shape[1]
        full[:, :site_rank] = stored.to(prev.dtype)
        if padding == "zeros":
            full[:, site_rank:] = -prev[:, site_rank:]
    else:
        site_rank = stored.shape[0]
        full[:site_rank] = stored.to(prev.dtype)
        if padding == "zeros":
            full[site_rank:] = -prev[site_rank:]
    return full


def padded_upload(upload: Artifact, name: str, prev: torch.Tensor, padding: str) -> torch.Tensor:
    """An upload of a site rank r_i < r (info.site_rank): its delta of PEFT tensor `name`
    padded to prev's shape (float64), zero in the trained part when it did not upload it."""
    parsed = naming.parse_factor_key(name)
    factor = parsed[1] if parsed is not None else "B"
    site_rank = upload.header.site_rank()
    if site_rank is None:
        raise ValueError(f"{upload.path}: records no site rank")
    stored = upload.upload_delta(name)
    if stored is None:  # the site left this factor unchanged: its trained part is zero
        stored = torch.zeros(sliced_shape(factor, tuple(prev.shape), site_rank))
    return padded(factor, stored.double(), prev, padding)


def check_recorded_rank(header: Header | None, rank: int, where: str) -> int | None:
    """The site rank a local state or upload records, checked against the global rank r:
    MismatchError unless 1 <= r_i < r (a full-rank site records none)."""
    if header is None:  # a PEFT adapter directory: no fedsrd header, the global rank
        return None
    site_rank = header.site_rank()
    found = header.info.get("site_rank") if isinstance(header.info, dict) else None
    if found is not None and site_rank is None:
        raise MismatchError(f"{where}: records site rank {found!r}, not a whole number")
    if site_rank is not None and site_rank > rank:
        raise MismatchError(
            f"{where}: was trained at site rank {site_rank}, above the global rank {rank}; a site may"
            " train at most the global rank"
        )
    if site_rank is not None and not 1 <= site_rank < rank:
        raise MismatchError(f"{where}: records site rank {site_rank}; it must be 1 to {rank - 1}")
    return site_rank


def check_upload_shape(
    global_state: Artifact, upload: Artifact, name: str, shape: list[int], where: str
) -> None:
    """An upload's layout entry must have the global shape, or the sliced shape of the site
    rank it records (1 <= r_i < r); MismatchError otherwise."""
    expected = tuple(global_state.shapes[name])
    site_rank = check_recorded_rank(upload.header, global_state.header.lora.rank, where)
    if site_rank is None and tuple(shape) == expected:
        return
    parsed = naming.parse_factor_key(name)
    allowed = None if site_rank is None or parsed is None else sliced_shape(parsed[1], expected, site_rank)
    if allowed is not None and tuple(shape) == allowed:
        return
    at_rank = "" if allowed is None else f" ({list(allowed)} at its site rank {site_rank})"
    found = list(shape)
    raise MismatchError(f"{where}: {name} has shape {found}, the global state {list(expected)}{at_rank}")
