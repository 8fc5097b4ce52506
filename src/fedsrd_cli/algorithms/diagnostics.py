"""What a broadcast records about itself, and when `broadcast` warns (docs/algorithms.md).

Per module, two figures, both computed from thin factors (math.lowrank), never from a
(d_out, d_in) matrix:

- update error = ||B' A' - W||_F / ||W - B A||_F: how far the update that is sent lands from
  the target the clients' aggregate W asks for (0: exactly; 1: no closer than sending
  nothing). The round's overall error weights modules by their targets:
  sqrt(sum miss^2 / sum target^2).
- step = ||X' - X||_F / ||X||_F for each factor X the broadcast changes: how large the update
  is against the factor it updates (not recorded while X is still zero).
- one-factor residual (one-factor downloads) = ||B' A' - W||_F / ||W - B A||_F for the whole
  least-squares update of the chosen factor, before any mask: the part of the target that no
  update of that factor can carry, whatever the download sparsity. Overall, target-weighted.

A one-factor least-squares solve that inverts a weak factor shows up first in the step: the
factor it updates jumps by more than its own size, is then out of scale with the other one,
and the clients' next updates (and their noise) grow with it. On SmolLM2-135M at rank 64,
the paper's download (parity schedule, DARE rescale; damping 1e-3) made a step of 1.86 in
round 8, one round before its eval loss broke; healthy runs stayed below 1 after round 2
(docs/results.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedsrd_cli.errors import MismatchError
from fedsrd_cli.files import naming
from fedsrd_cli.files.artifacts import Header
from fedsrd_cli.math.extrapolation import fedexp_step
from fedsrd_cli.math.lowrank_products import (
    TargetProducts,
    outside_row_space,
    product_inner,
    update_error_norms,
)
from fedsrd_cli.math.masks import text_seed
from fedsrd_cli.math.sketch import product_sketch, sketch_hashes

Pair = tuple[torch.Tensor, torch.Tensor]  # a thin product's (left (d_out, k), right (k, d_in))

# `broadcast` warns when, from round STEP_WARN_FROM_ROUND on, a factor's step in a one-factor
# download exceeds STEP_WARNING (the first rounds grow B from zero, where large steps are normal) ...
STEP_WARNING = 1.5
STEP_WARN_FROM_ROUND = 3
# ... or when the overall update error exceeds ERROR_WARNING times the level the download
# fit gives a well-conditioned factor: 1 for "lstsq" (it cannot do worse than sending
# nothing), 1 / sqrt(1 - p) for "dare" (a fit error of at most 1 plus the mask's variance
# p / (1 - p)).
ERROR_WARNING = 1.5
# ... or when the one-factor residual exceeds ONE_FACTOR_RESIDUAL_WARNING: the clients moved the
# factor the download keeps (A) so far that most of the round's target lies outside what one
# factor can carry. On SmolLM2-135M-Instruct (docs/results.md, "Few, long rounds") it was 0.77
# to 0.88 for each client and 0.79 for the aggregate in round 1 with 30 local steps at lr 1e-3,
# where FedSRD's default loses to FedAvg; 0.18 to 0.21 (client) and 0.19 (aggregate) with 10
# steps at lr 1e-4, and at most 0.70 (client) with 10 DP-SGD steps at lr 1e-3. train-local
# warns at the same level for the client's own update.
ONE_FACTOR_RESIDUAL_WARNING = 0.75
# Local training's reach, known before anything trains. Adam moves each weight by about lr per
# step at most, so local steps x lr bounds how far one client's round can go. On SmolLM2-135M-
# Instruct (docs/results.md, "Few, long rounds") FedSRD's default lost to FedAvg at steps x lr =
# 0.01 (5 rounds of 20 steps at lr 5e-4: +5.7%, 3 seeds; 10 DP-SGD steps at lr 1e-3, epsilon 8: +7.0%,
# though epsilon 3 and 1 won there) and 0.03 (3 rounds of 30 steps at lr 1e-3: +154%, +3.4% with
# a quarter step from round 3), and won at 0.001 (10 steps at lr 1e-4: -7.0%) and 0.0002. Nothing
# between 0.001 and 0.01 was measured. `simulate` and `train-local` warn from LONG_LOCAL_TRAINING
# on, for the methods that send FedSRD's one-factor download (fedsrd-e shares it; only fedsrd
# was measured).
LONG_LOCAL_TRAINING = 1e-2
ONE_FACTOR_DOWNLOAD_METHODS = ("fedsrd", "fedsrd-e")


@dataclass(frozen=True)
class ModuleMeasure:
    """One module's broadcast figures: the update error's miss and target norms (None when the
    target is not known), the chosen factor's whole-update miss, and each changed factor's
    relative step {"A" or "B": ||after - before|| / ||before||}."""

    miss: float | None
    target: float | None
    reach_miss: float | None
    steps: dict[str, float]


class BroadcastDiagnostics:
    """Collects the update error and step of every module of one broadcast.

    target_known False (organisation-level DP): the target W is the sites' un-noised sum, so
    the update error, a function of it, is neither computed nor recorded; the step compares
    two public states and is.
    """

    def __init__(self, target_known: bool = True) -> None:
        self.target_known = target_known
        self.errors: dict[str, float] = {}
        self.steps: dict[str, float] = {}
        self._miss2 = 0.0
        self._target2 = 0.0
        self._reach2: float | None = None

    def measure(
        self,
        left: torch.Tensor,
        right: torch.Tensor,
        before: dict[str, torch.Tensor],
        after: dict[str, torch.Tensor],
        reach_miss: float | None = None,
        products: TargetProducts | None = None,
    ) -> ModuleMeasure:
        """One module's figures, touching nothing shared (broadcast measures modules on several
        threads, then adds them in order). Target W = left (d_out, k) @ right (k, d_in);
        before/after: {"A": (r, d_in), "B": (d_out, r)}, the factors before the broadcast and
        after it is applied (a factor left as it was is the same tensor in both); reach_miss:
        the chosen factor's whole-update miss (steps.ModuleUpdate), for one-factor downloads;
        products: that solve's thin products of this target and these previous factors
        (float64), reused instead of formed again."""
        miss = target = None
        if self.target_known:
            if products is None:
                b_prev, a_prev = before["B"].double(), before["A"].double()
                b_next, a_next = after["B"].double(), after["A"].double()
            else:
                b_prev, a_prev = products.b_prev, products.a_prev
                b_next = b_prev if after["B"] is before["B"] else after["B"].double()
                a_next = a_prev if after["A"] is before["A"] else after["A"].double()
            miss, target = update_error_norms(left, right, b_prev, a_prev, b_next, a_next, products)
        steps = {}
        for factor in ("A", "B"):
            size = float(before[factor].norm())
            change = float((after[factor] - before[factor]).norm())
            if change > 0 and size > 0:
                steps[factor] = round(change / size, 6)
        return ModuleMeasure(miss, target, reach_miss if self.target_known else None, steps)

    def add(self, module: str, measured: ModuleMeasure) -> None:
        """Record one module's figures (in module order: the header lists them so)."""
        if measured.miss is not None and measured.target is not None:
            miss, target = measured.miss, measured.target
            self.errors[module] = round(miss / target, 6) if target > 0 else 0.0
            self._miss2 += miss**2
            self._target2 += target**2
            if measured.reach_miss is not None:
                self._reach2 = (self._reach2 or 0.0) + measured.reach_miss**2
        for factor, step in measured.steps.items():
            self.steps[f"{module}.lora_{factor}"] = step

    def record(self) -> dict[str, Any]:
        """The header's info entries "update_error" (when the target is known) and "update_step"."""
        step = {"update_step": {"max": max(self.steps.values(), default=0.0), "factors": self.steps}}
        if not self.target_known:
            return step
        overall = math.sqrt(self._miss2 / self._target2) if self._target2 > 0 else 0.0
        record = {"update_error": {"overall": round(overall, 6), "modules": self.errors}, **step}
        if self._reach2 is not None:
            reach = math.sqrt(self._reach2 / self._target2) if self._target2 > 0 else 0.0
            record["one_factor_residual"] = round(reach, 6)
        return record


class Fidelity:
    """How well an estimate E of an update D matches it, summed over modules:
    norm_ratio = ||E||_F / ||D||_F and cosine = <E, D>_F / (||E||_F ||D||_F), both computed
    from thin factors (math.lowrank_products.product_inner), never from a (d_out, d_in) matrix.

    Uploads record it for the site's own update (D = B' A' - B A, its exact full-rank update;
    E = the update the coordinator reconstructs from the upload). `simulate` records it for the
    round's exact mean update against the coordinator's target and against what the broadcast
    delivered. norm_ratio 1 and cosine 1: the estimate is the update; FedSRD's L1-rescaled
    upload measured norm_ratio ~4 and cosine ~0.4 on SmolLM2 (docs/results.md).
    """

    def __init__(self) -> None:
        self.exact2 = 0.0
        self.estimate2 = 0.0
        self.inner = 0.0

    def add(self, exact: Sequence[Pair], estimate: Sequence[Pair]) -> None:
        """One module: exact = D and estimate = E, each a sum of thin products (left, right)."""
        self.exact2 += product_inner(exact, exact)
        self.estimate2 += product_inner(estimate, estimate)
        self.inner += product_inner(estimate, exact)

    def record(self) -> dict[str, float]:
        """{"exact_norm", "norm_ratio", "cosine"} (ratio and cosine 0 when either norm is 0)."""
        exact, estimate = math.sqrt(max(self.exact2, 0.0)), math.sqrt(max(self.estimate2, 0.0))
        both = exact * estimate
        return {
            "exact_norm": round(exact, 9),
            "norm_ratio": round(estimate / exact, 6) if exact > 0 else 0.0,
            "cosine": round(self.inner / both, 6) if both > 0 else 0.0,
        }


def upload_fidelity(uploads: Sequence[Any], weights: Sequence[float]) -> dict[str, Any]:
    """The aggregate's info entry "upload_fidelity": each upload's own record (as the site
    reported it) by client id, their weight-averaged norm ratio and cosine, and their gain

        gain = sum_i w_i <E_i, D_i> / sum_i w_i ||D_i||^2,   <E_i, D_i> = cosine_i ratio_i ||D_i||^2

    (the least-squares slope of the reconstructions E_i on the exact updates D_i: how many times
    the sites' own updates the uploads carry along them; 1 for a dense upload); {} when no upload
    records one (uploads written before the record existed, or masked ones)."""
    records = [
        (u.header.client_id, u.header.info.get("fidelity"), w) for u, w in zip(uploads, weights, strict=True)
    ]
    known = [(client, record, w) for client, record, w in records if record]
    if not known:
        return {}
    total = sum(w for _, _, w in known) or 1.0
    along = sum(w * r["cosine"] * r["norm_ratio"] * r["exact_norm"] ** 2 for _, r, w in known)
    exact2 = sum(w * r["exact_norm"] ** 2 for _, r, w in known)
    return {
        "upload_fidelity": {
            "norm_ratio": round(sum(w * r["norm_ratio"] for _, r, w in known) / total, 6),
            "cosine": round(sum(w * r["cosine"] for _, r, w in known) / total, 6),
            "gain": round(along / exact2, 6) if exact2 > 0 else 0.0,
            "clients": {client: record for client, record, _ in known},
        }
    }


# info.update_sketch's width (`sparsify --update-sketch`): on SmolLM2 with 4 sites, FedExP's eta
# from the sketches was within 9% of the exact updates' in every round (docs/results.md).
UPDATE_SKETCH_WIDTH = 1024


def sketch_seed(state_hash: str) -> int:
    """The public seed of a round's update sketches: sha256(f"{state_hash}:update_sketch") read
    as a 60-bit integer (every site and the coordinator draw the same hashes)."""
    return text_seed(f"{state_hash}:update_sketch")


def module_sketch(seed: int, module: str, pairs: Sequence[Pair], width: int) -> torch.Tensor:
    """One module's sketch (width,) of sum_j L_j R_j (math.sketch), rows hashed under
    f"{module}:out" and columns under f"{module}:in"."""
    d_out, d_in = pairs[0][0].shape[0], pairs[0][1].shape[1]
    out_hashes = sketch_hashes(seed, f"{module}:out", d_out, width)
    in_hashes = sketch_hashes(seed, f"{module}:in", d_in, width)
    return product_sketch(pairs, out_hashes, in_hashes, width)


def sketch_record(sketch: torch.Tensor) -> dict[str, Any]:
    """An upload's info entry "update_sketch": {"width", "values"} (7 significant digits)."""
    return {"width": sketch.numel(), "values": [float(f"{v:.7g}") for v in sketch.tolist()]}


def uploaded_sketches(uploads: Sequence[Any]) -> torch.Tensor:
    """(sites, width) float64: every upload's info.update_sketch; MismatchError naming the first
    upload without one or of another width."""
    rows = []
    for upload in uploads:
        found = upload.header.info.get("update_sketch")
        if not isinstance(found, dict) or found.get("width") != UPDATE_SKETCH_WIDTH:
            raise MismatchError(
                f"{upload.path}: carries no update sketch of width {UPDATE_SKETCH_WIDTH}; the"
                " coordinator of sparsified uploads estimates the sites' mean update from their"
                " sketches: sparsify it again with --update-sketch"
            )
        values = torch.tensor(found["values"], dtype=torch.float64)
        if values.shape != (UPDATE_SKETCH_WIDTH,) or not bool(values.isfinite().all()):
            raise MismatchError(f"{upload.path}: its update sketch is malformed")
        rows.append(values)
    return torch.stack(rows)


@dataclass(frozen=True)
class ModuleSpread:
    """module_spread's figures, for one module or (`plus`) summed over modules: ||E_i||^2 per
    site, ||T||^2 and T's sketch (None without one)."""

    own: list[float]
    combined: float
    sketch: torch.Tensor | None

    def plus(self, other: ModuleSpread) -> ModuleSpread:
        sketch = other.sketch if self.sketch is None else self.sketch + other.sketch
        own = [a + b for a, b in zip(self.own, other.own, strict=True)]
        return ModuleSpread(own, self.combined + other.combined, sketch)


def module_spread(clients: Any, weights: Sequence[float], seed: int | None) -> ModuleSpread:
    """One module's share of the aggregate's "update_spread", from thin factors: each site's
    update as the coordinator rebuilds it, E_i = B'_i A'_i - B A, as ||E_i||^2; their combination
    T = sum_i v_i E_i as ||T||^2; and with a seed (sparsified uploads) T's sketch.

    clients: steps.ClientFactors (its first len(weights) entries are the sites); weights v_i:
    each site's weight times its clip scale (steps.clip_clients), so T is the clipped aggregate's
    update (for FedSRD its target W - B A).
    """
    b_prev, a_prev = clients.b_prev, clients.a_prev  # (d_out, r), (r, d_in), float64
    own = []
    for i in range(len(weights)):
        pairs = [(clients.bs[i], clients.as_[i]), (-b_prev, a_prev)]
        own.append(product_inner(pairs, pairs))
    combined = [(v * clients.bs[i], clients.as_[i]) for i, v in enumerate(weights)]
    combined.append((-sum(weights) * b_prev, a_prev))
    sketch = None if seed is None else module_sketch(seed, clients.module, combined, UPDATE_SKETCH_WIDTH)
    return ModuleSpread(own, product_inner(combined, combined), sketch)


def update_spread(
    uploads: Sequence[Any],
    weights: Sequence[float],
    scales: Sequence[float],
    spread: ModuleSpread,
    dense: bool,
    cap: float,
) -> dict[str, Any]:
    """The aggregate's info entry "update_spread" (`aggregate --update-spread`): what FedExP's
    step reads (math.extrapolation), all modules together (`spread`: module_spread's figures
    summed). With v_i = w_i s_i (s_i the clip scale) and D_i site i's exact update:

        client_sq = sum_i w_i s_i^2 ||D_i||^2,   mean_sq = ||D||^2,   D = sum_i v_i D_i

    Dense uploads (`dense`): the coordinator's own E_i are the D_i (to the value dtype's
    rounding): client_sq and mean_sq are computed exactly from them (source "uploads").
    Sparsified uploads: ||D_i|| as each site reports it (info.fidelity) and the cross terms from
    the sites' sketches S_i (source "sketches"):

        mean_sq = sum_i v_i^2 ||D_i||^2 + sum_{i != j} v_i v_j <S_i, S_j>

    and how the coordinator's update T = sum_i v_i E_i (FedSRD's target) matches D, estimated:
    norm_ratio ||T|| / ||D||, cosine <sketch(T), sum_i v_i S_i> / (||T|| ||D||).
    extrapolation: FedExP's eta, capped at `cap`; 1 when the sketches' estimate is 0 or below."""
    effective = [w * s for w, s in zip(weights, scales, strict=True)]
    if dense:
        exact_sq = list(spread.own)
        mean_sq, extra = spread.combined, {"source": "uploads"}
    else:
        reported = [u.header.info.get("fidelity", {}).get("exact_norm", math.nan) for u in uploads]
        exact_sq = [float(norm) ** 2 for norm in reported]
        if not all(math.isfinite(d) for d in exact_sq):
            raise MismatchError("an upload records no exact update norm (info.fidelity): sparsify it again")
        sketches = uploaded_sketches(uploads)  # (sites, width)
        v = torch.tensor(effective, dtype=torch.float64)
        mixed = v @ sketches  # sum_i v_i S_i
        cross = float(mixed @ mixed) - float(((v**2)[:, None] * sketches**2).sum())
        estimate = sum(x * x * d for x, d in zip(effective, exact_sq, strict=True)) + cross
        mean_sq = max(0.0, estimate)  # only the sketches' noise takes it below 0
        mean = math.sqrt(mean_sq)
        target = math.sqrt(max(spread.combined, 0.0))
        along = float(spread.sketch @ mixed) if spread.sketch is not None else 0.0
        extra = {
            "source": "sketches",
            "target": {
                "norm_ratio": round(target / mean, 6) if mean > 0 else 0.0,
                "cosine": round(along / (target * mean), 6) if target * mean > 0 else 0.0,
            },
        }
    client_sq = sum(w * s * s * d for w, s, d in zip(weights, scales, exact_sq, strict=True))
    # An estimate of 0 is no evidence that the sites' updates cancel: no extrapolation then.
    eta = 1.0 if not dense and mean_sq <= 0.0 else fedexp_step(client_sq, mean_sq, cap)
    return {
        "update_spread": {
            "client_sq": client_sq,
            "mean_sq": mean_sq,
            "extrapolation": round(eta, 6),
            **extra,
        }
    }


def mean_update_fidelity(
    global_state: Any,
    locals_: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[float],
    aggregate: Any,
    next_state: dict[str, torch.Tensor],
) -> dict[str, dict[str, float]]:
    """How the round's exact mean update compares with what the coordinator aimed at and what it
    delivered: {"target": Fidelity.record(), "delivered": Fidelity.record()}.

    Only a simulation holds every site's trained factors (locals_, PEFT names -> tensors); per module
        mean update  D = sum_i w_i B'_i A'_i - B A               (weights sum to 1)
        target       T = L R - B A       (the aggregate's factors L (d_out, k), R (k, d_in))
        delivered    U = B_next A_next - B A
    all as sums of thin products. global_state: the round's starting state (Artifact);
    next_state: the state after the broadcast, PEFT names -> tensors.
    """
    target, delivered = Fidelity(), Fidelity()
    for module in global_state.modules():
        a_prev, b_prev = (t.double() for t in global_state.factors(module))
        name_a, name_b = naming.factor_key(module, "A"), naming.factor_key(module, "B")
        mean = [
            (w * local[name_b].double(), local[name_a].double())
            for local, w in zip(locals_, weights, strict=True)
        ]
        mean.append((-b_prev, a_prev))
        left_name, right_name = naming.aggregate_keys(module)
        left, right = aggregate.tensor(left_name).double(), aggregate.tensor(right_name).double()
        target.add(mean, [(left, right), (-b_prev, a_prev)])
        delivered.add(mean, [(next_state[name_b].double(), next_state[name_a].double()), (-b_prev, a_prev)])
    return {"target": target.record(), "delivered": delivered.record()}


def fidelity_line(record: dict[str, Any]) -> str:
    """inspect's words for a fidelity record (an upload's, or an aggregate's mean)."""
    return f"{record['norm_ratio']:.3g} times the exact update's norm, cosine {record['cosine']:.3g}"


def error_level(header: Header) -> float | None:
    """The overall update error a well-conditioned factor gives under this broadcast's download
    fit; None for broadcasts that send whole factors (their error is rounding only)."""
    fit = header.info.get("download_fit")
    if fit == "lstsq":
        return 1.0
    if fit == "dare":
        return 1.0 / math.sqrt(1.0 - header.download_sparsity)
    return None


def update_error_warning(header: Header) -> str | None:
    """One line when a broadcast looks like the start of a divergence, else None."""
    info = header.info
    steps = info.get("update_step", {}).get("factors", {})
    # Only a one-factor solve (its broadcast records its download fit) inverts a factor. A
    # whole-factor broadcast may move a factor by more than its size and be healthy: FlexLoRA's
    # re-split W_r = (U sqrt(S)) (sqrt(S) Vh) moved factors by 2.0 times their size in rounds 2
    # and 3 of the real-task suite while its loss kept falling (docs/results.md).
    if "download_fit" in info and header.round >= STEP_WARN_FROM_ROUND and steps:
        name = max(steps, key=steps.__getitem__)
        if steps[name] > STEP_WARNING:
            return (
                f"round {header.round} changes {name} by {steps[name]:.3g} times its own size: the"
                " one-factor solve is inverting a weak factor and may diverge (see docs/algorithms.md:"
                " fewer local steps or a lower --lr, or a larger --damping)"
            )
    reach = info.get("one_factor_residual")
    damped = info.get("server_lr", 1.0) < 1.0  # the coordinator already shortens its step
    if reach is not None and reach > ONE_FACTOR_RESIDUAL_WARNING and not damped:
        return (
            f"round {header.round}'s target lies {reach:.3g} (relative) outside what one factor can"
            f" carry (above {ONE_FACTOR_RESIDUAL_WARNING:g}): few, long rounds, where FedSRD's whole"
            " steps overshoot and FedAvg wins; from round 3 on, broadcast with --server-lr 0.25"
            ' (docs/results.md, "Few, long rounds")'
        )
    level = error_level(header)
    error = info.get("update_error", {}).get("overall")
    if level is not None and error is not None and error > ERROR_WARNING * level:
        return (
            f"round {header.round}'s update lands {error:.3g} (relative) from its target, above"
            f" {ERROR_WARNING * level:.3g}, {ERROR_WARNING:g} times what {info['download_fit']} gives a"
            " well-conditioned factor; check `fedsrd inspect` of this broadcast for the worst modules"
        )
    return None


def local_one_factor_residual(global_state: Any, local: dict[str, torch.Tensor]) -> float:
    """A client's own update, before sparsification: sqrt(sum ||dW (I - P_A)||^2 / sum ||dW||^2)
    over modules (math.lowrank_products.outside_row_space), the share of it that FedSRD's default
    one-factor download cannot carry. global_state: the state trained from (Artifact);
    local: the trained state's tensors under PEFT names."""
    outside2 = total2 = 0.0
    for module in global_state.modules():
        a_prev, b_prev = (t.double() for t in global_state.factors(module))
        a_new = local[f"{module}.lora_A.weight"].double()
        b_new = local[f"{module}.lora_B.weight"].double()
        out2, all2 = outside_row_space(b_new, a_new, b_prev, a_prev)
        outside2 += out2
        total2 += all2
    return math.sqrt(outside2 / total2) if total2 > 0 else 0.0


def local_update_warning(residual: float) -> str | None:
    """One line for train-local when the client's update is in the regime (few, long rounds)
    where FedSRD's default one-factor download loses to FedAvg, else None."""
    if residual <= ONE_FACTOR_RESIDUAL_WARNING:
        return None
    return (
        f"{residual:.3g} of this update lies outside what FedSRD's default one-factor download can"
        f" carry (above {ONE_FACTOR_RESIDUAL_WARNING:g}): long local training, where FedSRD's whole"
        " steps overshoot and lose to FedAvg; fewer steps or a lower --lr, or a coordinator that"
        ' broadcasts with --server-lr 0.25 from round 3 on (docs/results.md, "Few, long rounds")'
    )


def long_local_training_warning(steps: int, lr: float, methods: tuple[str, ...] | None) -> str | None:
    """One line when `steps` local steps at `lr` are long local training (steps x lr >=
    LONG_LOCAL_TRAINING), where FedSRD's default download lost to FedAvg, and one of `methods`
    sends that download; None otherwise. methods None: not known yet (train-local on a round-0
    state, which no method has written), so the line says which methods it is about."""
    if methods is not None and not set(methods) & set(ONE_FACTOR_DOWNLOAD_METHODS):
        return None
    reach = steps * lr
    if reach < LONG_LOCAL_TRAINING * (1 - 1e-9):  # 20 x 5e-4 is at the level, whatever the rounding
        return None
    who = "FedSRD" if methods is not None else "FedSRD (if the coordinator aggregates with it)"
    return (
        f"{steps} local steps at lr {lr:g} (steps x lr = {reach:.3g}, at or above {LONG_LOCAL_TRAINING:g})"
        f" is long local training, where {who} lost to FedAvg on SmolLM2-135M (by 6% to 154% in eval"
        " loss at 20 to 30 steps, lr 5e-4 to 1e-3, against FedAvg taking its clients' step, and by more"
        " against FedAvg with --server-lr 2); use fedavg with --server-lr 2, or shorter rounds, or with"
        ' 3 rounds --server-lr 0.25 from round 3 (docs/results.md, "An honest step", "Few, long rounds")'
    )
