"""Uploads with coded positions (X.positions) or bitmaps (X.mask): round trips, old files, crafted files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.algorithms.protocol import initial_state
from fedsrd_cli.cli import app
from fedsrd_cli.config import LoraSpec, SparsifyConfig
from fedsrd_cli.errors import ArtifactError
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import read_local
from fedsrd_cli.files.artifacts import Artifact, read_artifact, write_artifact
from fedsrd_cli.files.describe import dense_tensors, describe
from fedsrd_cli.files.safetensors_io import content_hash, encode_safetensors
from fedsrd_cli.math.importance import importance_a, importance_b, sparsify_delta
from fedsrd_cli.math.masks import pack_bits
from fedsrd_cli.math.positions import position_gaps, rice_parameter, rice_stream

from ..conftest import TOY_FINGERPRINT, make_local

SHAPES = {  # (d_out, d_in): factors of 768 to 1280 elements at r = 8
    "base_model.model.model.layers.0.self_attn.q_proj": (96, 80),
    "base_model.model.model.layers.0.mlp.down_proj": (64, 160),
}


def _global(path: Path) -> Path:
    payload = initial_state(SHAPES, LoraSpec(8, 16.0, ("down_proj", "q_proj")), 0, TOY_FINGERPRINT)
    write_artifact(path, payload.header, payload.tensors)
    return path


def _upload(tmp_path: Path, method: str, base_sparsity: float) -> tuple[Path, Path, Path]:
    g0 = _global(tmp_path / "g0.safetensors")
    local = make_local(g0, tmp_path / "local.safetensors", seed=4)
    cap = 0.0 if method == "fedsrd-fixed-ratio" else 0.11  # the fixed ratio uses no kurtosis term
    config = SparsifyConfig(base_sparsity=base_sparsity, kurtosis_cap=cap, value_dtype="fp32")
    payload = get_algorithm(method).upload(read_artifact(g0), read_local(local), "c0", 5, config)
    path = tmp_path / "up.safetensors"
    write_artifact(path, payload.header, payload.tensors)
    return g0, local, path


@pytest.mark.parametrize(
    ("method", "base_sparsity", "stored"),
    [
        ("fedsrd-fixed-ratio", 0.2, {"bitmap"}),  # 80% kept: the bitmap is shorter
        ("fedsrd-fixed-ratio", 0.96, {"positions"}),  # FedSRD's 4%
        ("fedsrd-fixed-ratio", 0.999, {"positions"}),  # one or two elements
        ("fedsrd", 0.85, {"positions"}),
    ],
)
def test_uploads_round_trip_bit_for_bit(tmp_path, method, base_sparsity, stored):
    g0, local, path = _upload(tmp_path, method, base_sparsity)
    state, trained, upload = read_artifact(g0), read_artifact(local), read_artifact(path)
    coeff, cap = (0.0, 0.0) if method == "fedsrd-fixed-ratio" else (0.1, 0.11)
    seen = set()
    for module in state.modules():
        a0, b0 = state.factors(module)
        a1, b1 = trained.factors(module)
        for factor, delta, scores in (
            ("B", b1 - b0, importance_b(b1 - b0, a0)),
            ("A", a1 - a0, importance_a(a1 - a0, b1)),
        ):
            name = naming.factor_key(module, factor)
            expected, kept, _ = sparsify_delta(delta, scores, base_sparsity, coeff, cap, True)
            assert torch.equal(upload.upload_kept(name), kept)
            assert torch.equal(upload.upload_delta(name), expected)
            seen.add(upload.mask_storage(name)["stored"])
    assert seen == stored


def _tensors(artifact: Artifact) -> dict[str, torch.Tensor]:
    return dict(artifact.iter_tensors())


def _craft(
    path: Path, upload: Artifact, tensors: dict[str, torch.Tensor], layout: dict | None = None
) -> Path:
    """Write `tensors` under upload's header (and `layout`) with a correct content hash (what an
    attacker can do)."""
    header = replace(upload.header, content_hash=content_hash(tensors), layout=layout or upload.header.layout)
    path.write_bytes(b"".join(bytes(part) for part in encode_safetensors(tensors, header.to_metadata())))
    return path


def test_old_bitmap_files_still_read(tmp_path):
    _, _, path = _upload(tmp_path, "fedsrd", 0.85)
    coded = read_artifact(path)
    tensors = _tensors(coded)
    for name in coded.header.layout:
        del tensors[naming.positions_key(name)]
        tensors[naming.mask_key(name)] = pack_bits(coded.upload_kept(name))
    old = read_artifact(_craft(tmp_path / "old.safetensors", coded, tensors))
    assert all(old.mask_storage(n) == {"stored": "bitmap", "bytes": math.ceil(math.prod(s) / 8)}
               for n, s in old.header.layout.items())  # fmt: skip
    for name in coded.header.layout:
        assert torch.equal(old.upload_delta(name), coded.upload_delta(name))
    assert old.path.stat().st_size > coded.path.stat().st_size
    assert describe(old)["paper_bytes"] == describe(coded)["paper_bytes"]  # 1 bit per element, both


def test_describe_keeps_the_paper_accounting_and_reports_what_is_stored(tmp_path):
    _, _, path = _upload(tmp_path, "fedsrd-fixed-ratio", 0.96)
    upload = read_artifact(path)
    report = describe(upload)
    paper = 0.0
    for tensor in report["tensors"]:
        numel = math.prod(tensor["shape"])
        paper += 4 * tensor["nonzeros"] + numel / 8
        mask = tensor["mask"]
        assert mask["stored"] == "positions" and 0 <= mask["rice_k"] <= 31
        assert mask["bytes"] == upload.shapes[naming.positions_key(tensor["name"])][0] < numel / 8
    assert report["paper_bytes"] == pytest.approx(paper)
    assert report["mask_bytes"] == sum(t["mask"]["bytes"] for t in report["tensors"])
    assert report["paper_mask_bytes"] == sum(math.prod(t["shape"]) / 8 for t in report["tensors"])
    dense = dense_tensors(upload)  # what `unpack` writes
    assert all(torch.equal(dense[name], upload.upload_delta(name)) for name in upload.header.layout)


# --------------------------------------------------------------------------- crafted files


def _coded_upload(tmp_path: Path) -> tuple[Artifact, str, dict[str, torch.Tensor]]:
    _, _, path = _upload(tmp_path, "fedsrd-fixed-ratio", 0.96)
    upload = read_artifact(path)
    name = sorted(upload.header.layout)[0]
    return upload, name, _tensors(upload)


def _refused(path: Path, words: str) -> None:
    for verify in (True, False):  # verify=False: the layout check, then decoding, still refuse
        with pytest.raises(ArtifactError, match=words) as caught:
            artifact = read_artifact(path, verify=verify)
            for name in artifact.header.layout:
                artifact.upload_delta(name)
        assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def _with_positions(tensors, name, data: list[int]) -> dict[str, torch.Tensor]:
    return {**tensors, naming.positions_key(name): torch.tensor(data, dtype=torch.uint8)}


def test_crafted_streams_are_refused(tmp_path):
    upload, name, tensors = _coded_upload(tmp_path)
    stored = upload.tensor(naming.positions_key(name)).tolist()
    values = tensors[naming.values_key(name)]
    cases = {
        "outside": _with_positions(tensors, name, [40, *stored[1:]]),  # k = 40
        "ends early": _with_positions(tensors, name, stored[:-1]),
        "bits follow": _with_positions(tensors, name, [*stored, 0]),
        "codes": {**tensors, naming.values_key(name): values[:-1]},  # one value fewer than positions
        "ends early ": {**tensors, naming.values_key(name): torch.cat([values, values[:1]])},
    }
    for i, (words, crafted) in enumerate(cases.items()):
        _refused(_craft(tmp_path / f"crafted-{i}.safetensors", upload, crafted), words.strip())


def test_crafted_layouts_are_refused_before_decoding(tmp_path):
    upload, name, tensors = _coded_upload(tmp_path)
    numel = math.prod(upload.header.layout[name])
    kept = upload.upload_kept(name)
    cases = {
        "both a .mask and a .positions": {**tensors, naming.mask_key(name): pack_bits(kept)},
        "shorter than": _with_positions(tensors, name, [0] * math.ceil(numel / 8)),  # as long as the bitmap
        "1 to": _with_positions(tensors, name, []),
        "uint8": {**tensors, naming.positions_key(name): torch.zeros(3, dtype=torch.float32)},
    }
    for i, (words, crafted) in enumerate(cases.items()):
        _refused(_craft(tmp_path / f"layout-{i}.safetensors", upload, crafted), words)
    # a tensor of at most 8 elements: its 1-byte bitmap is never longer, so positions are refused
    tiny = {**tensors, naming.values_key(name): torch.ones(1)}
    tiny = _with_positions(tiny, name, [0, 0x80])
    small = {**upload.header.layout, name: [2, 4]}
    _refused(_craft(tmp_path / "tiny.safetensors", upload, tiny, small), "never longer")


def test_verifying_a_huge_declared_layout_reads_only_the_file(tmp_path):
    """A 40-byte stream under a layout of 2^32 - 1 elements: reading and verifying it (and
    describing it) touches the stream and one index per value, never numel of anything."""
    upload, name, tensors = _coded_upload(tmp_path)
    big = [65537, 65535]  # 4,294,967,295 elements: a 512 MiB bitmap, a 4 GiB bool mask
    positions = [0] + [100 * 65535 * i for i in range(1, 20)]
    mask_bytes = positions_tensor_for(positions, math.prod(big))
    crafted = {
        **{n: t for n, t in tensors.items() if not n.startswith(name)},
        naming.values_key(name): torch.ones(len(positions)),
        naming.positions_key(name): mask_bytes,
    }
    path = _craft(tmp_path / "huge.safetensors", upload, crafted, {**upload.header.layout, name: big})
    script = textwrap.dedent(
        """
        import resource, sys
        from fedsrd_cli.files.artifacts import read_artifact
        from fedsrd_cli.files.describe import describe
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        report = describe(read_artifact(sys.argv[1]))
        print(report["mask_bytes"], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        """
    )
    warm = "import fedsrd_cli.files.artifacts, fedsrd_cli.files.describe, torch; torch.zeros(1);"
    result = subprocess.run(
        [sys.executable, "-c", warm + script, str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    _, growth_mb = result.stdout.split()
    assert float(growth_mb) < 64, result.stdout


def positions_tensor_for(positions: list[int], numel: int) -> torch.Tensor:
    """X.positions of increasing `positions` in a tensor of `numel` elements, built sparsely."""
    gaps = position_gaps(torch.tensor(positions))
    k = rice_parameter(gaps)
    return torch.cat([torch.tensor([k], dtype=torch.uint8), rice_stream(gaps, k)])


def test_cli_inspects_and_unpacks_coded_uploads_and_refuses_a_crafted_one_in_one_line(tmp_path):
    upload, name, tensors = _coded_upload(tmp_path)
    runner = CliRunner()
    report = json.loads(runner.invoke(app, ["inspect", str(upload.path), "--json"]).stdout)
    assert report["mask_bytes"] < report["paper_mask_bytes"] and report["tensors"][0]["mask"]["rice_k"] >= 0
    dense = tmp_path / "dense.safetensors"
    assert runner.invoke(app, ["unpack", str(upload.path), "--out", str(dense)]).exit_code == 0
    with safe_open(str(dense), framework="pt") as plain:
        assert torch.equal(plain.get_tensor(name), upload.upload_delta(name))
    stored = upload.tensor(naming.positions_key(name)).tolist()
    crafted = _craft(tmp_path / "crafted.safetensors", upload, _with_positions(tensors, name, stored[:-1]))
    result = runner.invoke(app, ["inspect", str(crafted)])
    assert result.exit_code == 3
    assert (
        result.output.startswith("error: ")
        and result.output.count("\n") == 1
        and "ends early" in result.output
    )
