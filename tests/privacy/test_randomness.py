"""privacy.randomness: the secret stream's uniforms, normals and Poisson samples, tested as
distributions (scipy's Kolmogorov-Smirnov test, a binomial bound) with a known test key."""

from __future__ import annotations

import math

import pytest
import torch

from fedsrd_cli.privacy.randomness import SecretRandom

stats = pytest.importorskip("scipy.stats")


def test_normals_follow_the_normal_distribution():
    draws = SecretRandom.for_tests(1).normal((200_000,), 2.5)
    assert draws.dtype == torch.float64
    result = stats.kstest(draws.numpy() / 2.5, "norm")
    assert result.pvalue > 1e-3
    assert float(draws.std()) == pytest.approx(2.5, rel=0.01)


def test_uniforms_are_in_the_half_open_unit_interval_and_uniform():
    draws = SecretRandom.for_tests(2).uniform(200_000)
    assert float(draws.min()) > 0.0 and float(draws.max()) <= 1.0
    assert stats.kstest(draws.numpy(), "uniform").pvalue > 1e-3


def test_poisson_sampling_takes_each_item_at_its_rate():
    random = SecretRandom.for_tests(3)
    n, rate = 100_000, 0.03
    count = len(random.poisson_sample(n, rate))
    spread = math.sqrt(n * rate * (1 - rate))
    assert abs(count - n * rate) < 5 * spread
    assert random.poisson_sample(5, 1.0) == [0, 1, 2, 3, 4]
    assert random.poisson_sample(5, 0.0) == []


def test_a_test_key_repeats_and_a_secret_key_does_not():
    assert torch.equal(
        SecretRandom.for_tests(4).normal((8,), 1.0), SecretRandom.for_tests(4).normal((8,), 1.0)
    )
    assert not torch.equal(SecretRandom().normal((8,), 1.0), SecretRandom().normal((8,), 1.0))
    with pytest.raises(ValueError):
        SecretRandom(b"short")
