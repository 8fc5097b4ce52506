"""The coordinator's pieces in steps.py against dense references: clients held as stored, routes."""

from __future__ import annotations

import pytest
import torch

from fedsrd_cli.algorithms.steps import (
    CLIENT_BLOCK,
    ClientFactors,
    ReconstructedFactors,
    reconstruct_truncated,
    sketch_columns,
    truncated_svd,
    truncation_route,
)


def _clients(
    m: int, d_out: int, d_in: int, r: int, seed: int
) -> tuple[ClientFactors, list[torch.Tensor], list]:
    """A state some rounds in and m clients whose sparse deltas are 1% of it."""
    g = torch.Generator().manual_seed(seed)
    b_prev = 0.05 * torch.randn(d_out, r, generator=g, dtype=torch.float64)
    a_prev = 0.03 * torch.randn(r, d_in, generator=g, dtype=torch.float64)
    entries_b, entries_a, bs, as_ = [], [], [], []
    for _ in range(m):
        for prev, entries, dense in ((b_prev, entries_b, bs), (a_prev, entries_a, as_)):
            keep = torch.rand(prev.numel(), generator=g) < 0.2
            positions = keep.nonzero().reshape(-1).to(torch.int32)
            values = 1e-3 * torch.randn(positions.numel(), generator=g)
            entries.append((positions, values))
            delta = torch.zeros(prev.numel(), dtype=torch.float64)
            delta[positions.long()] = values.double()
            dense.append(prev + delta.reshape(prev.shape))
    clients = ClientFactors(
        "layers.0.q_proj",
        a_prev,
        b_prev,
        ReconstructedFactors(a_prev, entries_a),
        ReconstructedFactors(b_prev, entries_b),
    )
    return clients, bs, as_


def test_reconstructed_factors_rebuild_prev_plus_the_stored_delta():
    clients, bs, as_ = _clients(3, 12, 10, 2, 0)
    assert len(clients.bs) == 3 and clients.changed_a and clients.changed_b
    for i in range(3):
        assert torch.equal(clients.bs[i], bs[i]) and torch.equal(clients.as_[i], as_[i])
    assert [torch.equal(x, y) for x, y in zip(clients.bs[1:], bs[1:], strict=True)] == [True, True]
    longer = clients.as_.extended(2)  # clipping's extra clients hold the previous factor
    assert len(longer) == 5 and torch.equal(longer[4], clients.a_prev)
    unchanged = ReconstructedFactors(clients.a_prev, [None, None])
    assert not unchanged.changed and torch.equal(unchanged[0], clients.a_prev)
    dense = ReconstructedFactors.from_factors(clients.a_prev, as_)
    assert torch.allclose(dense[2], as_[2], atol=1e-7)


def test_auto_truncation_is_exact_for_few_clients_and_randomized_for_many():
    r = 16
    limit = 6 * sketch_columns(r)  # k = m r up to (2 q + 2) sketches
    assert truncation_route("auto", limit, r) == "exact"
    assert truncation_route("auto", limit + r, r) == "randomized"
    assert truncation_route("exact", 10**6, r) == "exact"
    assert truncation_route("randomized", r, r) == "randomized"


@pytest.mark.parametrize("m", [3, CLIENT_BLOCK + 8])
def test_both_routes_give_the_dense_truncated_svd(m):
    clients, bs, as_ = _clients(m, 70, 50, 4, 1)
    weights = [1.0 / m] * m
    w = sum(wi * b @ a for wi, b, a in zip(weights, bs, as_, strict=True))  # (70, 50)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    reference = (u[:, :4] * s[:4]) @ vh[:4]
    update = torch.linalg.matrix_norm(reference - clients.b_prev @ clients.a_prev)
    for route in ("exact", "randomized"):
        left, right = reconstruct_truncated(clients, weights, 4, route)
        assert left.shape == (70, 4) and right.shape == (4, 50)
        assert (torch.linalg.matrix_norm(left @ right - reference) / update).item() < 1e-6, route
        u_r, s_r, vh_r = truncated_svd(clients, weights, 4, route)
        assert torch.allclose(s_r, s[:4], rtol=1e-9), route
