"""Property-based fuzzing of everything that reads a file: every bad input ends in a FedsrdError.

Truncations, flipped bytes, rewritten safetensors headers (odd dtypes, declared shapes far larger
than the file, broken offsets), mutated fedsrd metadata, huge metadata and odd file names go
through `read_artifact` (the bulk) and the CLI (a subset). Example counts and deadlines are
bounded so the whole module runs in well under a minute on a 2-core CI machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.cli import app
from fedsrd_cli.config import AggregateConfig, BroadcastConfig, SparsifyConfig
from fedsrd_cli.errors import ArtifactError, FedsrdError
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import read_local
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
from fedsrd_cli.files.safetensors_io import content_hash, encode_safetensors
from fedsrd_cli.trust.signing import SigningKey, Trust, generate_keypair

from ..conftest import make_global, make_local
from ..math.test_positions import reference_read

# FEDSRD_FUZZ_EXAMPLES=5000 runs a deeper, randomised search locally; CI runs the fixed 300.
DEEP = int(os.environ.get("FEDSRD_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=DEEP or 300,
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=not DEEP,
)
KINDS = ("state", "upload", "aggregate", "broadcast")
runner = CliRunner()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One valid file of every kind (each signed by its rightful party), as bytes, plus a trust dir."""
    root = tmp_path_factory.mktemp("fuzz")
    keys, trust = root / "keys", root / "trust"
    keys.mkdir()
    trust.mkdir()
    for party in ("coordinator", "alice"):
        generate_keypair(keys / party)
        shutil.copy(keys / f"{party}.pub", trust)
    coordinator = SigningKey.load(keys / "coordinator.key")
    alice = SigningKey.load(keys / "alice.key")
    g0 = make_global(root / "g0.safetensors")
    state = read_artifact(g0)
    write_artifact(g0, state.header, dict(state.iter_tensors()), force=True, sign=coordinator.sign_parts)
    state = read_artifact(g0)
    algorithm = get_algorithm("fedsrd")
    local = read_local(make_local(g0, root / "local.safetensors", seed=1))
    up = algorithm.upload(state, local, "alice", 10, SparsifyConfig())
    write_artifact(root / "upload.safetensors", up.header, up.tensors, sign=alice.sign_parts)
    upload = read_artifact(root / "upload.safetensors")
    agg = algorithm.aggregate(state, [upload], AggregateConfig())
    write_artifact(root / "aggregate.safetensors", agg.header, agg.tensors, sign=coordinator.sign_parts)
    bc, _ = algorithm.broadcast(state, read_artifact(root / "aggregate.safetensors"), BroadcastConfig(seed=3))
    write_artifact(root / "broadcast.safetensors", bc.header, bc.tensors, sign=coordinator.sign_parts)
    files = {"state": g0, **{k: root / f"{k}.safetensors" for k in KINDS[1:]}}
    return Corpus(
        {
            "bytes": {k: p.read_bytes() for k, p in files.items()},
            "trust": Trust.load(trust),
            "scratch": root / "scratch",
        }
    )


class Corpus(dict):
    """The fixture's dict, with a short repr for hypothesis' failure reports."""

    def __repr__(self) -> str:
        return "<corpus>"


def _write(corpus: dict, data: bytes, name: str = "case.safetensors") -> Path:
    scratch = corpus["scratch"]
    scratch.mkdir(exist_ok=True)
    path = scratch / name
    path.write_bytes(data)
    return path


def _split(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


@FUZZ
@given(kind=st.sampled_from(KINDS), cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_files_are_refused(corpus: dict, kind: str, cut: float) -> None:
    data = corpus["bytes"][kind]
    path = _write(corpus, data[: int(cut * len(data))])
    with pytest.raises(FedsrdError):
        read_artifact(path)


flips = st.lists(
    st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)),
    min_size=1,
    max_size=3,
    unique_by=lambda f: f[0],
)


def _flip(data: bytes, changes: list[tuple[float, int]]) -> bytes:
    raw = bytearray(data)
    positions = set()
    for where, xor in changes:
        pos = int(where * len(raw))
        if pos in positions:
            continue
        positions.add(pos)
        raw[pos] ^= xor
    return bytes(raw)


@FUZZ
@given(kind=st.sampled_from(KINDS), changes=flips)
def test_any_changed_byte_is_refused_with_trust(corpus: dict, kind: str, changes: list) -> None:
    path = _write(corpus, _flip(corpus["bytes"][kind], changes))
    with pytest.raises(FedsrdError):
        corpus["trust"].verify_file(path)
        read_artifact(path)


@FUZZ
@given(kind=st.sampled_from(KINDS), changes=flips)
def test_changed_bytes_without_trust_never_change_tensors_silently(
    corpus: dict, kind: str, changes: list
) -> None:
    original = _write(corpus, corpus["bytes"][kind], "original.safetensors")
    path = _write(corpus, _flip(corpus["bytes"][kind], changes))
    try:
        artifact = read_artifact(path)
    except FedsrdError:
        return
    # Accepted: then only descriptive metadata or padding changed, never a tensor.
    assert artifact.header.content_hash == read_artifact(original).header.content_hash


DTYPES = ("F32", "F16", "BF16", "F64", "U8", "I64", "BOOL", "I8", "F8_E4M3", "X", "", 7)
dims = st.one_of(st.integers(0, 64), st.integers(2**20, 2**40), st.integers(-5, -1))
tensor_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(DTYPES),
        "shape": st.lists(dims, max_size=3),
        "data_offsets": st.lists(st.integers(-1, 2**40), min_size=0, max_size=3),
    }
)
json_leaf = st.one_of(
    st.text(max_size=40), st.integers(), st.floats(allow_nan=True), st.none(), st.booleans()
)


@FUZZ
@given(
    kind=st.sampled_from(KINDS),
    new_tensors=st.dictionaries(st.text(min_size=1, max_size=30), tensor_entry, max_size=3),
    drop=st.integers(0, 3),
    body_cut=st.integers(0, 64),
)
def test_rewritten_tensor_table_is_refused_or_harmless(
    corpus: dict, kind: str, new_tensors: dict, drop: int, body_cut: int
) -> None:
    header, body = _split(corpus["bytes"][kind])
    names = sorted(k for k in header if k != "__metadata__")
    for name in names[:drop]:
        del header[name]
    header.update(new_tensors)
    path = _write(corpus, _join(header, body[: max(0, len(body) - body_cut)]))
    if not new_tensors and not drop and not body_cut:
        read_artifact(path)  # only the header's spacing changed
        return
    with pytest.raises(FedsrdError):
        read_artifact(path)


FEDSRD_FIELDS = (
    "fedsrd.kind",
    "fedsrd.round",
    "fedsrd.lora",
    "fedsrd.layout",
    "fedsrd.content_hash",
    "fedsrd.parent_hash",
    "fedsrd.num_samples",
    "fedsrd.seed",
    "fedsrd.download_sparsity",
    "fedsrd.format_version",
    "fedsrd.client_id",
    "fedsrd.info",
)
meta_value = st.one_of(
    st.text(max_size=60),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["nan", "inf", "-1", "1e308", "[]", "{}", '{"r": 4}', "null"]),
    st.dictionaries(st.text(max_size=20), st.lists(st.integers(0, 2**40), max_size=3), max_size=3).map(
        json.dumps
    ),
    st.just("[" * 5000 + "]" * 5000),
)


@FUZZ
@given(
    kind=st.sampled_from(KINDS),
    changes=st.dictionaries(
        st.sampled_from(FEDSRD_FIELDS), st.one_of(meta_value, st.none()), min_size=1, max_size=3
    ),
)
def test_mutated_fedsrd_metadata_never_crashes(corpus: dict, kind: str, changes: dict) -> None:
    header, body = _split(corpus["bytes"][kind])
    meta = header["__metadata__"]
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path = _write(corpus, _join(header, body))
    with contextlib.suppress(FedsrdError):
        read_artifact(path)  # may be accepted: then only descriptive metadata changed
    with pytest.raises(FedsrdError):
        corpus["trust"].verify_file(path)


bit_flips = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=3)


@FUZZ
@given(pick=st.integers(0, 10**6), flips=bit_flips, cut=st.integers(-2, 2), extra_values=st.integers(-2, 2))
def test_crafted_positions_with_a_valid_hash_are_refused_or_read_as_specified(
    corpus: dict, pick: int, flips: list, cut: int, extra_values: int
) -> None:
    """An attacker rewrites an upload's X.positions (and its value count) and fixes the content
    hash: the reader refuses exactly what the plain-Python reference decoder refuses (one line),
    and reads what it accepts as the reference does."""
    upload = read_artifact(_write(corpus, corpus["bytes"]["upload"], "original.safetensors"))
    coded = sorted(n for n in upload.header.layout if naming.positions_key(n) in upload.shapes)
    name = coded[pick % len(coded)]
    tensors = dict(upload.iter_tensors())
    stored = bytearray(tensors[naming.positions_key(name)].tolist())
    for at, bit in flips:
        stored[at % len(stored)] ^= 1 << bit
    stored = stored[: len(stored) + cut] if cut < 0 else stored + bytes(cut)
    values = tensors[naming.values_key(name)]
    values = (
        values[: len(values) + extra_values]
        if extra_values < 0
        else torch.cat([values, values[:extra_values]])
    )
    tensors[naming.positions_key(name)] = torch.tensor(list(stored), dtype=torch.uint8)
    tensors[naming.values_key(name)] = values
    header = replace(upload.header, content_hash=content_hash(tensors))
    path = _write(corpus, b"".join(bytes(p) for p in encode_safetensors(tensors, header.to_metadata())))
    expected = reference_read(bytes(stored), math.prod(upload.header.layout[name]), len(values))
    try:
        crafted = read_artifact(path)
    except ArtifactError as err:
        assert expected is None, err
        assert "\n" not in str(err)
        return
    assert expected is not None
    assert crafted.upload_kept(name).reshape(-1).nonzero().reshape(-1).tolist() == expected


@settings(max_examples=40, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), cut=st.floats(0.0, 1.0, exclude_max=True), changes=flips)
def test_cli_gives_one_error_line_never_a_traceback(
    corpus: dict, kind: str, cut: float, changes: list
) -> None:
    data = _flip(corpus["bytes"][kind], changes)
    path = _write(corpus, data[: max(1, int(cut * len(data)))])
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code in (3, 4), result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


odd_names = st.text(
    alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=300
)


@settings(max_examples=40, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=odd_names, exists=st.booleans())
def test_odd_file_names(corpus: dict, name: str, exists: bool) -> None:
    scratch = corpus["scratch"]
    scratch.mkdir(exist_ok=True)
    path = scratch / name
    if exists and name not in (".", "..") and len(name.encode()) <= 255:
        path.write_bytes(corpus["bytes"]["upload"][:50])
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 3, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    if exists and path.is_file():
        path.unlink()


def test_huge_metadata_is_refused(corpus: dict) -> None:
    header, body = _split(corpus["bytes"]["state"])
    header["__metadata__"]["fedsrd.info"] = json.dumps({"x": "y" * (17 * 2**20)})
    path = _write(corpus, _join(header, body))
    with pytest.raises(FedsrdError, match="too large"):
        read_artifact(path)


BOMBS = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path
    from fedsrd_cli.files.artifacts import read_artifact
    from fedsrd_cli.errors import ArtifactError, FedsrdError

    def join(header, body):
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text + body

    scratch = Path(sys.argv[1])
    state = Path(sys.argv[2]).read_bytes()
    broadcast = Path(sys.argv[3]).read_bytes()
    n = int.from_bytes(state[:8], "little")
    sh, sb = json.loads(state[8 : 8 + n]), state[8 + n :]
    n = int.from_bytes(broadcast[:8], "little")
    bh, bb = json.loads(broadcast[8 : 8 + n]), broadcast[8 + n :]
    cases = {}
    # A tensor declaring 2^20 x 2^20 fp32 (4 TiB) in a small file.
    name = sorted(k for k in sh if k != "__metadata__")[0]
    h = json.loads(json.dumps(sh)); h[name]["shape"] = [2**20, 2**20]
    cases["4 TiB tensor shape"] = join(h, sb)
    h = json.loads(json.dumps(sh)); h[name]["data_offsets"] = [0, 2**42]
    cases["4 TiB data offsets"] = join(h, sb)
    # Broadcast layouts declaring ~2^32-element factors behind a few stored values.
    h = json.loads(json.dumps(bh)); layout = json.loads(h["__metadata__"]["fedsrd.layout"])
    first = sorted(layout)[0]
    layout[first] = [65535, 65535]
    h["__metadata__"]["fedsrd.layout"] = json.dumps(layout)
    cases["4 G-element broadcast layout"] = join(h, bb)
    h2 = json.loads(json.dumps(h)); h2["__metadata__"]["fedsrd.download_sparsity"] = "0.999"
    cases["4 G-element layout at high sparsity"] = join(h2, bb)
    h3 = json.loads(json.dumps(h)); h3["__metadata__"]["fedsrd.download_sparsity"] = "0.9999999"
    cases["4 G-element layout at extreme sparsity"] = join(h3, bb)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for label, data in cases.items():
        path = scratch / "bomb.safetensors"
        path.write_bytes(data)
        start = time.monotonic()
        try:
            read_artifact(path)
        except FedsrdError as err:
            print(label, "->", type(err).__name__, f"{time.monotonic() - start:.3f}s")
        else:
            raise SystemExit(f"{label}: accepted")
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"maxrss growth {growth_mb:.1f} MB")
    if growth_mb > 64:
        raise SystemExit(f"peak memory grew by {growth_mb:.1f} MB")
    """
)


def test_declared_sizes_far_beyond_the_file_fail_fast_in_bounded_memory(corpus: dict, tmp_path: Path) -> None:
    state = _write(corpus, corpus["bytes"]["state"], "state.safetensors")
    broadcast = _write(corpus, corpus["bytes"]["broadcast"], "broadcast.safetensors")
    warm = "import fedsrd_cli.files.artifacts, torch; torch.zeros(1);"
    result = subprocess.run(
        [sys.executable, "-c", warm + BOMBS, str(tmp_path), str(state), str(broadcast)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout)
    for line in result.stdout.splitlines()[:-1]:
        assert float(line.rsplit(" ", 1)[1].rstrip("s")) < 2.0, line
