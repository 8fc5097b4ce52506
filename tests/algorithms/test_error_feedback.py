"""Error feedback (sparsify --error-feedback): what an upload leaves out is carried into the next.

Checked against plain arithmetic on the dense deltas: for every factor, what the coordinator
decodes plus the new carry is exactly this round's delta plus the old carry, so over any number
of uploads the decoded deltas and the last carry add up to everything the site trained.
"""

from __future__ import annotations

import pytest
import torch

from fedsrd_cli.adapters import read_local
from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.artifacts import read_artifact
from fedsrd_cli.config import SparsifyConfig
from fedsrd_cli.errors import UsageError

from ..conftest import make_global, make_local
from .rounds import write

EF = SparsifyConfig(rescale=False, error_feedback=True)  # bf16 values: the rounding is carried too


def _trained(local, state, name: str) -> torch.Tensor:
    """The site's own delta of factor `name`: its trained factor less the global one."""
    module, factor = name.rsplit(".lora_", 1)
    a_new, b_new = local.factors(module)
    return (a_new if factor.startswith("A") else b_new).float() - state.tensor(name).float()


def _upload(tmp_path, g0, local_file, carry, tag):
    algorithm = get_algorithm("fedsrd")
    state = read_artifact(g0)
    payload = algorithm.upload(state, read_local(local_file), "c0", 10, EF, carry=carry)
    written = read_artifact(write(payload, tmp_path / f"up-{tag}.safetensors"))
    return payload, written


def _dense(written, state, name: str) -> torch.Tensor:
    prev = state.tensor(name)
    entries = written.upload_entries(name)
    delta = torch.zeros(prev.numel())
    if entries is not None:
        positions, values = entries
        if positions is None:
            delta = values.float().reshape(-1)
        else:
            delta[positions.long()] = values.float()
    return delta.reshape(prev.shape)


def test_decoded_plus_carry_is_the_delta_plus_the_old_carry(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    state = read_artifact(g0)
    local = make_local(g0, tmp_path / "local.safetensors", seed=5)
    first, written1 = _upload(tmp_path, g0, local, None, "1")
    assert first.carry is not None and written1.header.info["sparsify"]["error_feedback"] is True
    trained = read_local(local)
    for name, _ in state.iter_tensors():
        delta = _trained(trained, state, name)
        torch.testing.assert_close(
            _dense(written1, state, name) + first.carry[name], delta, rtol=0, atol=1e-7
        )
    # the next upload from the same local state carries the old remainder on top of the new delta
    second, written2 = _upload(tmp_path, g0, local, first.carry, "2")
    for name in first.carry:
        delta = _trained(trained, state, name)
        torch.testing.assert_close(
            _dense(written2, state, name) + second.carry[name], delta + first.carry[name], rtol=0, atol=1e-6
        )


def test_everything_trained_arrives_over_later_uploads(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    state = read_artifact(g0)
    local = make_local(g0, tmp_path / "local.safetensors", seed=6)
    payload, written = _upload(tmp_path, g0, local, None, "0")
    trained = {name: _trained(read_local(local), state, name) for name in payload.carry}
    total = {name: _dense(written, state, name) for name in payload.carry}
    left = [sum(float(c.norm()) ** 2 for c in payload.carry.values())]
    for k in range(1, 6):  # later rounds train next to nothing: mostly the carry goes out
        later = make_local(g0, tmp_path / f"later-{k}.safetensors", seed=60 + k, scale=1e-7)
        payload, written = _upload(tmp_path, g0, later, payload.carry, str(k))
        for name in total:
            trained[name] += _trained(read_local(later), state, name)
            total[name] += _dense(written, state, name)
        left.append(sum(float(c.norm()) ** 2 for c in payload.carry.values()))
    assert all(after < before for before, after in zip(left, left[1:], strict=False))
    assert left[-1] < 0.5 * left[0]
    for name, sent in total.items():  # sum of what was decoded + what is still carried = all trained
        torch.testing.assert_close(sent + payload.carry[name], trained[name], rtol=0, atol=1e-6)


def test_without_error_feedback_no_carry_is_kept_or_used(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    state = read_artifact(g0)
    local = read_local(make_local(g0, tmp_path / "local.safetensors", seed=7))
    plain = SparsifyConfig(rescale=False)
    algorithm = get_algorithm("fedsrd")
    junk = {name: torch.ones(t.shape) for name, t in state.iter_tensors()}
    alone = algorithm.upload(state, local, "c0", 10, plain)
    given = algorithm.upload(state, local, "c0", 10, plain, carry=junk)
    assert alone.carry is None and given.carry is None
    assert alone.tensors.keys() == given.tensors.keys()
    assert all(torch.equal(alone.tensors[k], given.tensors[k]) for k in alone.tensors)
    assert "error_feedback" not in alone.header.info["sparsify"]


def test_error_feedback_with_the_l1_rescale_is_refused():
    with pytest.raises(UsageError, match="--error-feedback .* --no-rescale"):
        SparsifyConfig(error_feedback=True)
