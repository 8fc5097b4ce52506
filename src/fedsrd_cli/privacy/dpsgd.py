"""DP-SGD for the trained LoRA factors: Poisson-sampled records, per-example clipping, noise.

One optimizer step, for an expected batch of L records out of a population of N:

  1. Poisson sampling: each record joins the step independently with probability q = L / N
     (privacy.randomness, a secret ChaCha20 stream); the batch may be empty, or larger than L.
  2. Per-example gradients g_i of exactly the trained parameters (Opacus's hooks,
     GradSampleHooks: one gradient per record, computed in the same backward pass), clipped
     to norm C across all of them: g_i * min(1, C / ||g_i||) (Opacus's DPOptimizer).
  3. The update direction (sum_i clipped g_i + N(0, sigma^2 C^2 I)) / L, the noise drawn from
     the same secret stream, handed to the plain optimizer (AdamW).

A record's loss is the mean cross-entropy over its own response tokens, so each record's
gradient is bounded by C whatever its length. A sampled batch is processed in micro-batches
of at most `micro_batch` records; their clipped gradients add up before the noise.

The privacy of a run of S such steps is that of the subsampled Gaussian mechanism
(sigma, q) composed S times (privacy.accounting); everything the site sends afterwards is
post-processing (docs/privacy.md). torch and Opacus only: no transformers, no files.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fedsrd_cli.errors import DataError, UsageError
from fedsrd_cli.privacy.randomness import SecretRandom


@dataclass(frozen=True)
class DpSgdConfig:
    """noise_multiplier sigma (0 only in tests: no noise, no guarantee), max_grad_norm C,
    test_seed: a known randomness seed, for tests only (None: a secret key per run)."""

    noise_multiplier: float
    max_grad_norm: float
    test_seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise UsageError(f"--dp-noise-multiplier must be >= 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise UsageError(f"--dp-max-grad-norm must be > 0, got {self.max_grad_norm}")


def sample_rate(expected_batch: int, population: int) -> float:
    """q = L / N, at most 1 (a batch of at least N records takes every record)."""
    return min(1.0, expected_batch / population)


class PrivateSteps:
    """Per-example clipping and noise for `trained`, attached to `model` until close().

    Use, per step:  indices = batches.next()  (Poisson);  for each micro-batch: backward of the
    sum of its records' losses, then accumulate();  finally noisy_gradient() puts the private
    gradient into every trained parameter's .grad for the optimizer.
    """

    def __init__(
        self,
        model: Any,
        trained: dict[str, torch.nn.Parameter],
        config: DpSgdConfig,
        expected_batch: int,
        population: int,
    ):
        from opacus.grad_sample import GradSampleHooks
        from opacus.optimizers import DPOptimizer

        self.trained = trained
        self.config = config
        self.expected_batch = expected_batch
        self.population = population
        self.rate = sample_rate(expected_batch, population)
        self.random = SecretRandom() if config.test_seed is None else SecretRandom.for_tests(config.test_seed)
        # Per-example gradients of every module that holds a trainable parameter (the LoRA
        # Linear layers); "sum": our loss is the sum of the records' losses.
        self.hooks = GradSampleHooks(model, loss_reduction="sum", strict=False)
        # Clipping and accumulation only; the noise is added in noisy_gradient(), from the
        # secret stream. "mean" divides the sum by the expected batch L, as DP-SGD does.
        holder = torch.optim.SGD(list(trained.values()), lr=0.0)
        self.clipper = DPOptimizer(
            holder,
            noise_multiplier=0.0,
            max_grad_norm=config.max_grad_norm,
            expected_batch_size=expected_batch,
            loss_reduction="mean",
        )

    def batches(self) -> Iterator[list[int]]:
        """Endless Poisson batches: each record index with probability q, independently."""
        while True:
            yield self.random.poisson_sample(self.population, self.rate)

    def accumulate(self, count: int) -> None:
        """After the backward pass of a micro-batch of `count` records: clip each record's
        gradient and add it to the step's sum (DataError if a trained parameter has none)."""
        for name, param in self.trained.items():
            sample = getattr(param, "grad_sample", None)
            if sample is None or sample.shape[0] != count:
                raise DataError(
                    f"DP-SGD: no per-example gradient for {name} (an unsupported layer); the clipping"
                    " would not cover every trained parameter"
                )
        self._clip()

    def _clip(self) -> None:
        self.clipper.signal_skip_step(do_skip=True)
        self.clipper.step()  # clip_and_accumulate, then skip: the sum is kept in summed_grad
        self.clipper.zero_grad(set_to_none=True)

    def per_example_norms(self) -> torch.Tensor:
        """(n,) norms of the per-example gradients of the micro-batch just back-propagated,
        before clipping, over every trained parameter (for tests and diagnostics)."""
        squares = [p.grad_sample.flatten(1).pow(2).sum(1) for p in self.trained.values()]
        return torch.stack(squares).sum(0).sqrt()

    def noisy_gradient(self) -> None:
        """Set each trained parameter's .grad to (sum of clipped gradients + noise) / L.

        An empty chunk closes the step (also when Poisson sampling took no record): Opacus then
        divides the accumulated sum by L; the noise, N(0, (sigma C / L)^2) per coordinate, is
        added here from the secret stream.
        """
        for param in self.trained.values():
            param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype)
        self.clipper.pre_step()  # p.grad = (sum of clipped per-example gradients) / L
        std = self.config.noise_multiplier * self.config.max_grad_norm / self.expected_batch
        for param in self.trained.values():
            if std > 0:
                noise = self.random.normal(tuple(param.shape), std)
                param.grad += noise.to(device=param.device, dtype=param.dtype)
            param.summed_grad = None
            param.grad_sample = None

    def close(self) -> None:
        """Remove the hooks and every attribute Opacus put on the parameters."""
        self.hooks.cleanup()
