"""broadcast's download settings and diagnostics through the command line, and their warning."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.algorithms.diagnostics import STEP_WARNING, update_error_warning
from fedsrd_cli.config import AGGREGATE_METHODS, BroadcastConfig
from fedsrd_cli.files.artifacts import read_artifact

from ..conftest import make_global
from .test_cli import run, run_round
from .test_cli_methods import _round as method_round


def _broadcast(tmp: Path, g0: Path, tag: str, *flags: str) -> tuple[dict, Path, Path]:
    agg = tmp / f"agg-{tag}.safetensors"
    if not agg.exists():
        run_round(tmp, g0, tag=tag)
    bc, nxt = tmp / f"bc-{tag}-x.safetensors", tmp / f"g-{tag}-x.safetensors"
    out = run(
        "broadcast", "--global", g0, "--aggregate", agg, "--out", bc, "--out-global", nxt, "--json", *flags
    )
    return json.loads(out.stdout), bc, nxt


def test_broadcast_records_its_download_settings_and_update_error(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    report, bc, g1 = _broadcast(tmp_path, g0, "a")
    info = read_artifact(bc).header.info
    defaults = BroadcastConfig()
    assert (info["damping"], info["download_fit"], info["factor_choice"]) == (
        defaults.damping,
        defaults.download_fit,
        defaults.factor_choice,
    )
    assert report["update_error"] == info["update_error"]["overall"] > 0
    assert set(info["update_error"]["modules"]) == set(read_artifact(g0).modules())
    # Round 1 grows B from zero: no step is defined yet, and A is not sent.
    assert info["update_step"] == {"max": 0.0, "factors": {}}

    report, bc, _ = _broadcast(  # round 2, from round 1's state
        tmp_path, g1, "b", "--damping", "0.01", "--download-fit", "lstsq", "--factor-choice", "parity"
    )
    info = read_artifact(bc).header.info
    assert (info["damping"], info["download_fit"], info["factor_choice"]) == (0.01, "lstsq", "parity")
    assert info["update_error"]["overall"] <= 1.0 + 1e-4  # least squares on the kept elements
    sent = {name.removesuffix(".weight") for name in read_artifact(bc).header.layout}
    assert set(info["update_step"]["factors"]) == sent  # a step for every factor sent
    human = run("inspect", bc).stdout
    assert "fit lstsq, factor choice parity, damping 0.01" in human
    assert "server_lr" not in info  # recorded only when the step is not 1

    _, damped, _ = _broadcast(tmp_path, g1, "b", "--server-lr", "0.25", "--force")
    assert read_artifact(damped).header.info["server_lr"] == 0.25
    assert "server lr" in (human := run("inspect", damped).stdout) and "0.25: every factor" in human
    assert "update error" in human and "largest step" in human


def test_paper_download_flags_give_the_same_files_on_a_rerun(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    paper = ("--damping", "0", "--download-fit", "dare", "--factor-choice", "parity")
    _, bc, nxt = _broadcast(tmp_path, g0, "p1", *paper)
    first = bc.read_bytes(), nxt.read_bytes()
    _broadcast(tmp_path, g0, "p1", *paper, "--force")
    assert (bc.read_bytes(), nxt.read_bytes()) == first


def test_bad_download_flags_are_usage_errors_with_no_output(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    agg = run_round(tmp_path, g0)["aggregate"]
    for flags, words in (
        (("--damping", "-1"), "--damping must be in [0, 1]"),
        (("--damping", "nan"), "--damping must be in [0, 1]"),
        (("--download-fit", "exact"), "--download-fit must be one of"),
        (("--factor-choice", "odd"), "--factor-choice must be one of"),
        (("--server-lr", "0"), "--server-lr"),
        (("--server-lr", "16.5"), "--server-lr"),
    ):
        bc, nxt = tmp_path / "bc-bad.safetensors", tmp_path / "g-bad.safetensors"
        result = run(
            "broadcast", "--global", g0, "--aggregate", agg, "--out", bc, "--out-global", nxt, *flags, code=2
        )
        assert words in result.output
        assert not bc.exists() and not nxt.exists()


def test_warning_names_a_factor_that_moved_more_than_its_own_size(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    _, bc, _ = _broadcast(tmp_path, g0, "w")
    header = read_artifact(bc).header
    quiet = replace(
        header,
        round=5,
        info={**header.info, "update_step": {"max": 0.5, "factors": {"m.lora_A": 0.5}}},
    )
    assert update_error_warning(quiet) is None
    early = replace(
        header, round=2, info={**header.info, "update_step": {"max": 9.0, "factors": {"m.lora_A": 9.0}}}
    )
    assert update_error_warning(early) is None  # round 2 still grows B from zero
    jump = replace(
        header,
        round=5,
        info={**header.info, "update_step": {"max": 3.0, "factors": {"m.lora_A": 3.0, "m.lora_B": 0.2}}},
    )
    warning = update_error_warning(jump)
    assert warning and "m.lora_A by 3 times its own size" in warning and STEP_WARNING < 3.0
    off_target = replace(
        header,
        round=5,
        info={**quiet.info, "download_fit": "lstsq", "update_error": {"overall": 2.0, "modules": {}}},
    )
    assert "lands 2 (relative) from its target" in update_error_warning(off_target)


@pytest.mark.parametrize("method", [m for m in AGGREGATE_METHODS if get_algorithm(m).dense_download])
def test_a_whole_factor_broadcast_never_warns_on_its_step(tmp_path, method):
    """FlexLoRA's SVD re-split moves factors by about twice their size in healthy rounds; only a
    one-factor download (which records its download fit) is warned about a large step."""
    (tmp_path / "whole").mkdir()
    whole = read_artifact(method_round(tmp_path / "whole", method)["broadcast"]).header
    assert whole.method == method and "download_fit" not in whole.info
    big_step = {"update_step": {"max": 3.0, "factors": {"m.lora_B": 3.0}}}
    assert update_error_warning(replace(whole, round=5, info={**whole.info, **big_step})) is None
    g0 = make_global(tmp_path / "g0.safetensors")
    _, one_factor, _ = _broadcast(tmp_path, g0, "of")  # the default fedsrd download
    header = read_artifact(one_factor).header
    warning = update_error_warning(replace(header, round=5, info={**header.info, **big_step}))
    assert warning and "m.lora_B by 3 times its own size" in warning


def test_broadcast_prints_the_warning_when_a_round_diverges(tmp_path):
    """Round 3 of the paper's download on the fixture's noisy clients inverts a weak B."""
    g0 = make_global(tmp_path / "g0.safetensors")
    paper = ("--damping", "0", "--download-fit", "dare", "--factor-choice", "parity", "--value-dtype", "fp32")
    state = g0
    outputs = []
    for r in (1, 2, 3):
        agg = run_round(tmp_path, state, tag=f"d{r}")["aggregate"]
        bc, nxt = tmp_path / f"bc-d{r}-p.safetensors", tmp_path / f"g-d{r}-p.safetensors"
        args = ["broadcast", "--global", state, "--aggregate", agg, "--out", bc, "--out-global", nxt, *paper]
        outputs.append(run(*args).output)
        # --json: "warnings", a list (empty when none), as train-local and simulate give it (issue 32)
        report = json.loads(run(*args, "--json", "--force").stdout)
        assert "warning" not in report and isinstance(report["warnings"], list), report
        assert (report["warnings"] != []) == ("warning: round" in outputs[-1]), (report, outputs[-1])
        assert all(f"warning: {w}" in outputs[-1] for w in report["warnings"])
        state = nxt
    assert any("warning: round" in out and "times its own size" in out for out in outputs), outputs


def test_one_factor_residual_matches_a_dense_reference_and_warns_above_its_level(tmp_path):
    """The recorded one-factor residual is ||(B + dB) A - W|| / ||W - B A|| of the whole damped B
    update, target-weighted over modules, computed here from dense matrices; a two-factor
    broadcast records none; the warning fires above ONE_FACTOR_RESIDUAL_WARNING only."""
    import torch

    from fedsrd_cli.algorithms.diagnostics import ONE_FACTOR_RESIDUAL_WARNING
    from fedsrd_cli.files import naming

    g0 = make_global(tmp_path / "g0.safetensors")
    _, bc, g1 = _broadcast(tmp_path, g0, "r1", "--factor-choice", "b")
    _, bc2, _ = _broadcast(tmp_path, g1, "r2", "--factor-choice", "b")  # round 2: B is not zero
    for state, broadcast, tag in ((g0, bc, "r1"), (g1, bc2, "r2")):
        header = read_artifact(broadcast).header
        aggregate = read_artifact(tmp_path / f"agg-{tag}.safetensors")
        miss2 = target2 = 0.0
        for module in read_artifact(state).modules():
            a, b = (t.double() for t in read_artifact(state).factors(module))
            left, right = (aggregate.tensor(k).double() for k in naming.aggregate_keys(module))
            w = left @ right  # (d_out, d_in)
            gram = a @ a.T
            lam = header.info["damping"] * float(torch.linalg.eigvalsh(gram)[-1])
            delta_b = (
                (w - b @ a) @ a.T @ torch.linalg.inv(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype))
            )
            miss2 += float(((b + delta_b) @ a - w).norm()) ** 2
            target2 += float((w - b @ a).norm()) ** 2
        assert header.info["one_factor_residual"] == round((miss2 / target2) ** 0.5, 6)
    _, both, _ = _broadcast(tmp_path, g0, "both", "--factor-choice", "both")
    assert "one_factor_residual" not in read_artifact(both).header.info
    header = read_artifact(bc).header
    quiet = {**header.info, "update_error": {"overall": 0.5, "modules": {}}}
    below = replace(
        header, round=2, info={**quiet, "one_factor_residual": ONE_FACTOR_RESIDUAL_WARNING - 0.01}
    )
    assert update_error_warning(below) is None
    above = replace(header, round=2, info={**quiet, "one_factor_residual": ONE_FACTOR_RESIDUAL_WARNING + 0.1})
    warning = update_error_warning(above)
    assert warning and "outside what one factor can carry" in warning and "--server-lr 0.25" in warning
    # a coordinator that already shortens its step is not told to again
    damped = replace(above, info={**above.info, "server_lr": 0.25})
    assert update_error_warning(damped) is None


def test_quantized_broadcast_applies_as_the_coordinator_computed_and_bad_codes_are_refused(tmp_path):
    """broadcast --value-dtype int4 / int8: apply reproduces the coordinator's next state bit for
    bit (the result hash), each value is within half a block step of the unquantized update, and
    a file whose codes or scales do not fit the seeded mask is refused on read."""
    import pytest
    import torch

    from fedsrd_cli.errors import ArtifactError
    from fedsrd_cli.files import naming
    from fedsrd_cli.files.artifacts import write_artifact

    g0 = make_global(tmp_path / "g0.safetensors")
    _, plain, _ = _broadcast(tmp_path, g0, "q", "--factor-choice", "both", "--value-dtype", "fp32")
    for dtype in ("int8", "int4"):
        bc, nxt = tmp_path / f"bc-{dtype}.safetensors", tmp_path / f"g-{dtype}.safetensors"
        agg = tmp_path / "agg-q.safetensors"
        run("broadcast", "--global", g0, "--aggregate", agg, "--out", bc, "--out-global", nxt,
            "--factor-choice", "both", "--value-dtype", dtype)  # fmt: skip
        applied = tmp_path / f"applied-{dtype}.safetensors"
        run("apply", "--global", g0, "--broadcast", bc, "--out", applied)
        assert read_artifact(applied).header.content_hash == read_artifact(nxt).header.content_hash
        quantized, reference = read_artifact(bc), read_artifact(plain)
        for name in quantized.header.layout:  # the B values are the same solve; A's follow B as sent
            if name.endswith("lora_B.weight"):
                values = quantized.broadcast_values(name)
                exact = reference.broadcast_values(name)
                step = quantized.tensor(naming.scales_key(name)).repeat_interleave(64)[: values.numel()]
                assert bool(((values - exact).abs() <= step / 2 + 1e-6).all())
    name = next(n for n in quantized.header.layout)
    tensors = {n: quantized.tensor(n) for n in quantized.names}
    broken = dict(tensors)
    broken[naming.scales_key(name)] = tensors[naming.scales_key(name)][:-1]  # one scale short
    bad = tmp_path / "bad.safetensors"
    with pytest.raises(ArtifactError, match="scales"):
        write_artifact(bad, quantized.header, broken, force=True)
        read_artifact(bad)
    zero_nibble = dict(tensors)
    codes = tensors[naming.values_key(name)].clone()
    codes[0] = codes[0] & 0xF0  # a low nibble of 0: never written
    zero_nibble[naming.values_key(name)] = codes
    with pytest.raises(ArtifactError, match="is 0"):
        write_artifact(bad, quantized.header, zero_nibble, force=True)
        read_artifact(bad)
    assert torch.equal(read_artifact(bc).tensor(naming.values_key(name)), tensors[naming.values_key(name)])
