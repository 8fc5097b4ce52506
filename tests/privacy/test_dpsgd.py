"""privacy.dpsgd on a real (tiny) Llama with PEFT LoRA: per-example clipping checked against each
record's own gradient, computed alone by a plain backward pass; the noise checked as a
distribution."""

from __future__ import annotations

import math

import pytest
import torch

from fedsrd_cli.config import LoraSpec
from fedsrd_cli.privacy.dpsgd import DpSgdConfig, PrivateSteps
from fedsrd_cli.site import data as data_mod
from fedsrd_cli.site.model import attach_lora, example_losses, load_base, lora_parameters
from tests.conftest import TINY_RECORDS, write_jsonl

stats = pytest.importorskip("scipy.stats")


@pytest.fixture
def lora_model(tiny_model):
    """The tiny Llama with rank-4 LoRA whose B factors are non-zero (so A gets gradients too)."""
    base = load_base(tiny_model, "cpu")
    attach_lora(base, LoraSpec(4, 8.0, ("down_proj", "q_proj", "up_proj", "v_proj")))
    params = lora_parameters(base.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in params.items():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    base.model.train()
    return base, params


@pytest.fixture
def pairs(lora_model, tmp_path):
    """TINY_RECORDS, encoded for the tiny model: (input ids, labels) per record."""
    base, _params = lora_model
    examples = data_mod.read_jsonl(write_jsonl(tmp_path / "records.jsonl", TINY_RECORDS)).examples
    return [data_mod.encode(base.tokenizer, ex, 64) for ex in examples]


def own_gradients(base, trained, pairs):
    """Each record's gradient, from a backward pass over that record alone (no hooks attached)."""
    pad = data_mod.pad_id(base.tokenizer)
    out = []
    for pair in pairs:
        for param in trained.values():
            param.grad = None
        example_losses(base.model, data_mod.collate([pair], pad)).sum().backward()
        out.append({name: param.grad.detach().clone() for name, param in trained.items()})
    for param in trained.values():
        param.grad = None
    return out


def norm(gradient: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.pow(2).sum()) for g in gradient.values()))


def test_each_record_s_clipped_gradient_is_its_own_clipped_to_c(lora_model, pairs):
    base, params = lora_model
    trained = dict(params)
    for param in trained.values():
        param.requires_grad_(True)
    reference = own_gradients(base, trained, pairs)
    norms = [norm(g) for g in reference]
    clip = sorted(norms)[len(norms) // 2]  # half the records are clipped, half are not
    pad = data_mod.pad_id(base.tokenizer)
    private = PrivateSteps(base.model, trained, DpSgdConfig(0.0, clip, test_seed=0), 1, len(pairs))
    try:
        for pair, own, own_norm in zip(pairs, reference, norms, strict=True):
            example_losses(base.model, data_mod.collate([pair], pad)).sum().backward()
            assert float(private.per_example_norms()[0]) == pytest.approx(own_norm, rel=1e-5)
            private.accumulate(1)
            private.noisy_gradient()  # expected batch 1: .grad is this record's clipped gradient
            clipped = {name: param.grad.detach().clone() for name, param in trained.items()}
            assert norm(clipped) <= clip * (1 + 1e-5)
            scale = min(1.0, clip / own_norm)
            for name, gradient in clipped.items():
                torch.testing.assert_close(gradient, own[name] * scale, rtol=1e-4, atol=1e-7)
    finally:
        private.close()
    assert sum(n > clip for n in norms) >= 2 and sum(n <= clip for n in norms) >= 2


def test_a_batch_in_micro_batches_sums_the_clipped_gradients_over_the_expected_batch(lora_model, pairs):
    base, params = lora_model
    trained = {n: p for n, p in params.items() if ".lora_B." in n}  # FFA-LoRA: A frozen
    for name, param in params.items():
        param.requires_grad_(name in trained)
    reference = own_gradients(base, trained, pairs)
    clip = sorted(norm(g) for g in reference)[2]
    expected_batch = 4
    want = {
        name: sum(g[name] * min(1.0, clip / norm(g)) for g in reference) / expected_batch for name in trained
    }
    pad = data_mod.pad_id(base.tokenizer)
    private = PrivateSteps(base.model, trained, DpSgdConfig(0.0, clip, test_seed=0), expected_batch, 16)
    try:
        for chunk in (pairs[:4], pairs[4:]):  # two micro-batches of one step
            example_losses(base.model, data_mod.collate(chunk, pad)).sum().backward()
            private.accumulate(len(chunk))
        private.noisy_gradient()
        for name, param in trained.items():
            torch.testing.assert_close(param.grad, want[name], rtol=1e-4, atol=1e-7)
        frozen = [p for n, p in params.items() if n not in trained]
        assert all(p.grad is None for p in frozen)
    finally:
        private.close()
    assert not any(hasattr(p, "grad_sample") for p in params.values())
    assert not hasattr(base.model, "autograd_grad_sample_hooks")


def test_the_noise_is_gaussian_with_std_sigma_c_over_the_expected_batch(lora_model):
    base, params = lora_model
    trained = dict(params)
    for param in trained.values():
        param.requires_grad_(True)
    sigma, clip, expected_batch = 1.3, 0.7, 4
    private = PrivateSteps(base.model, trained, DpSgdConfig(sigma, clip, test_seed=5), expected_batch, 32)
    try:
        private.noisy_gradient()  # an empty Poisson batch: the update is noise alone
        noise = torch.cat([p.grad.reshape(-1) for p in trained.values()]).double()
    finally:
        private.close()
    std = sigma * clip / expected_batch
    assert noise.numel() > 2000
    assert stats.kstest((noise / std).numpy(), "norm").pvalue > 1e-3


def test_poisson_batches_have_the_expected_size_on_average(lora_model):
    base, params = lora_model
    trained = dict(params)
    private = PrivateSteps(base.model, trained, DpSgdConfig(1.0, 1.0, test_seed=9), 8, 256)
    try:
        stream = private.batches()
        sizes = [len(next(stream)) for _ in range(2000)]
    finally:
        private.close()
    assert private.rate == 8 / 256
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 8) < 5 * math.sqrt(256 * (8 / 256) * (1 - 8 / 256) / len(sizes))
    assert min(sizes) == 0 or max(sizes) > 8  # sizes vary: Poisson, not fixed batches
