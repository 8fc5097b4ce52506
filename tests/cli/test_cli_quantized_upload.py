"""sparsify --value-dtype int4 through the command line: a whole round, inspect, refusals."""

from __future__ import annotations

import json

from fedsrd_cli.files.artifacts import read_artifact

from ..conftest import make_global, make_local
from .test_cli import run


def test_an_int4_round_through_the_cli_applies_bit_for_bit(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    uploads = []
    for i in range(2):
        local = make_local(g0, tmp_path / f"local-{i}.safetensors", seed=i + 1)
        up = tmp_path / f"up-{i}.safetensors"
        run("sparsify", "--global", g0, "--local", local, "--client", f"c{i}", "--out", up,
            "--base-sparsity", "0.55", "--value-dtype", "int4")  # fmt: skip
        uploads.append(up)
    agg, bc, nxt = (tmp_path / f"{n}.safetensors" for n in ("agg", "bc", "g1"))
    run("aggregate", "--global", g0, "--out", agg, *uploads)
    run("broadcast", "--global", g0, "--aggregate", agg, "--out", bc, "--out-global", nxt)
    applied = tmp_path / "applied.safetensors"
    run("apply", "--global", g0, "--broadcast", bc, "--out", applied)
    assert applied.read_bytes() == nxt.read_bytes()

    upload = read_artifact(uploads[0])
    assert upload.header.info["value_dtype"] == "int4"
    report = json.loads(run("inspect", uploads[0], "--json").stdout)
    for tensor in report["tensors"]:  # kept counts read from the mask, not from the packed bytes
        assert tensor["nonzeros"] == upload.upload_value_count(tensor["name"])
    assert "int4: block-quantized codes, a float32 scale per 64 values" in run("inspect", uploads[0]).stdout


def test_sparsify_refuses_an_unknown_or_unquantizable_value_dtype_in_one_line(tmp_path):
    g0 = make_global(tmp_path / "g0.safetensors")
    local = make_local(g0, tmp_path / "local.safetensors", seed=1)
    up = tmp_path / "up.safetensors"
    base = ("sparsify", "--global", g0, "--local", local, "--client", "c0", "--out", up)
    bad = run(*base, "--value-dtype", "int2", code=2)
    assert "--value-dtype must be one of ['fp32', 'bf16', 'fp16', 'int8', 'int4']" in bad.output
    secure = run(*base, "--value-dtype", "int8", "--secure", code=2)
    assert "a --secure upload sends masked int32 fixed-point sums" in secure.output
    assert not up.exists()
