"""Artifacts: the file format. Reads, validates, hashes and serializes fedsrd's safetensors files.

Four kinds (docs/format.md): `state` (global or local LoRA factors), `upload`
(one client's sparse deltas), `aggregate` (the coordinator's factored W_r) and
`broadcast` (the sparse one-factor update). Every read validates the header,
the tensor layout, the content hash and finiteness before anything uses the
file; every write validates the same things first, then hands the bytes to
atomic.py, which writes a temporary file and renames it, refusing to replace an
existing file unless forced.

A PEFT adapter trained elsewhere is read as a local state by adapters.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fedsrd_cli.config import LoraSpec
from fedsrd_cli.errors import ArtifactError, MismatchError, a_or_an
from fedsrd_cli.files import naming
from fedsrd_cli.files.atomic import FileWrite, write_files_atomic
from fedsrd_cli.math.masks import (
    count_kept,
    count_set_bits,
    padding_is_clean,
    seeded_keep_mask,
    unpack_bits,
)
from fedsrd_cli.math.positions import PositionCodeError, read_positions_tensor
from fedsrd_cli.math.quantize import QUANTIZED_BITS, block_count, dequantize_blocks, unpack_int4
from fedsrd_cli.privacy.ledger import parse_privacy

# Version 2 added coded upload positions (X.positions); version 1 files are read as before.
# A reader of version 1 refuses version 2 files with a one-line "upgrade fedsrd". Version 3
# added the masked upload of secure aggregation: only that kind is written as version 3, so
# every other file stays as it was, and an older fedsrd refuses a masked upload with "upgrade".
FORMAT_VERSION = 2
MASKED_UPLOAD_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)
KINDS = ("state", "upload", "aggregate", "broadcast", "masked_upload")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HASH_PREFIX = "sha256:"
MAX_METADATA_CHARS = 16 * 2**20
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
# Keeps a broadcast's layout within ~1000x its stored values, so checking its mask stays cheap.
MAX_DOWNLOAD_SPARSITY = 0.999
# A sealed file (sealed.py) starts with this; readers say how to open it.
SEALED_MAGIC = b"fedsrd-sealed-1\n"

# safetensors dtype strings, used in the content hash (docs/format.md, "Content hash").
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class Header:
    """An artifact's metadata. `content_hash` is filled in when it is written.

    layout: logical shape of every sparse/dense-delta tensor (uploads, broadcasts).
    info: descriptive JSON (ratios, sparsify settings, clients, ...) that no check relies on.
    privacy: the privacy ledgers (privacy.ledger.Privacy.to_json()); empty without DP, and then
        not written, so a file made without --dp-* is what it was before privacy existed.
    """

    kind: str
    round: int
    lora: LoraSpec
    base_fingerprint: str
    parent_hash: str = ""
    content_hash: str = ""
    method: str = ""
    client_id: str = ""
    num_samples: int = 0
    result_hash: str = ""
    aggregate_hash: str = ""
    seed: int = 0
    download_sparsity: float = 0.0
    layout: dict[str, list[int]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "format": "pt",
            "fedsrd.format_version": str(
                MASKED_UPLOAD_VERSION if self.kind == "masked_upload" else FORMAT_VERSION
            ),
            "fedsrd.kind": self.kind,
            "fedsrd.round": str(self.round),
            "fedsrd.lora": self.lora.to_json(),
            "fedsrd.base_fingerprint": self.base_fingerprint,
            "fedsrd.parent_hash": self.parent_hash,
            "fedsrd.content_hash": self.content_hash,
        }
        if self.method:
            meta["fedsrd.method"] = self.method
        if self.kind in ("upload", "masked_upload") or self.client_id:
            meta["fedsrd.client_id"] = self.client_id
        if self.kind in ("upload", "masked_upload") or self.num_samples:
            meta["fedsrd.num_samples"] = str(self.num_samples)
        if self.kind == "broadcast":
            meta["fedsrd.result_hash"] = self.result_hash
            meta["fedsrd.aggregate_hash"] = self.aggregate_hash
            meta["fedsrd.seed"] = str(self.seed)
            meta["fedsrd.download_sparsity"] = repr(float(self.download_sparsity))
        if self.layout:
            meta["fedsrd.layout"] = json.dumps(self.layout, sort_keys=True)
        if self.info:
            meta["fedsrd.info"] = json.dumps(self.info, sort_keys=True)
        if self.privacy:
            meta["fedsrd.privacy"] = json.dumps(self.privacy, sort_keys=True, allow_nan=False)
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], where: str) -> Header:
        """Parse and validate; `where` names the file in error messages."""
        if "fedsrd.kind" not in meta:
            raise ArtifactError(
                f"{where}: not a fedsrd artifact (its safetensors header has no fedsrd metadata)"
            )
        total = sum(len(k) + len(v) for k, v in meta.items())
        if total > MAX_METADATA_CHARS:
            raise ArtifactError(f"{where}: metadata of {total} characters is too large")
        try:
            version = int(meta.get("fedsrd.format_version", ""))
        except ValueError:
            raise ArtifactError(f"{where}: unreadable fedsrd.format_version") from None
        if version not in READABLE_FORMAT_VERSIONS:
            readable = " and ".join(str(v) for v in READABLE_FORMAT_VERSIONS)
            raise ArtifactError(
                f"{where}: format version {version}, this fedsrd reads versions {readable}"
                " (upgrade fedsrd, or re-create the file with this version)"
            )
        try:
            header = cls(
                kind=meta["fedsrd.kind"],
                round=int(meta["fedsrd.round"]),
                lora=LoraSpec.from_dict(json.loads(meta["fedsrd.lora"])),
                base_fingerprint=meta["fedsrd.base_fingerprint"],
                parent_hash=meta.get("fedsrd.parent_hash", ""),
                content_hash=meta["fedsrd.content_hash"],
                method=meta.get("fedsrd.method", ""),
                client_id=meta.get("fedsrd.client_id", ""),
                num_samples=int(meta.get("fedsrd.num_samples", "0")),
                result_hash=meta.get("fedsrd.result_hash", ""),
                aggregate_hash=meta.get("fedsrd.aggregate_hash", ""),
                seed=int(meta.get("fedsrd.seed", "0")),
                download_sparsity=float(meta.get("fedsrd.download_sparsity", "0")),
                layout={
                    str(k): [int(d) for d in v]
                    for k, v in json.loads(meta.get("fedsrd.layout", "{}")).items()
                },
                info=json.loads(meta.get("fedsrd.info", "{}")),
                privacy=json.loads(meta.get("fedsrd.privacy", "{}")),
            )
        except Exception as err:  # any malformed field: KeyError, ValueError, TypeError, ...
            raise ArtifactError(f"{where}: malformed fedsrd metadata ({type(err).__name__}: {err})") from None
        header.check(where)
        return header

    def check(self, where: str) -> None:
        """Header-level rules that hold for every artifact of its kind."""
        if self.kind not in KINDS:
            raise ArtifactError(f"{where}: unknown artifact kind {self.kind!r}")
        if self.round < 0:
            raise ArtifactError(f"{where}: negative round {self.round}")
        if self.kind in ("upload", "masked_upload") and not self.client_id:
            raise ArtifactError(f"{where}: upload without a client id")
        if self.num_samples < 0:
            raise ArtifactError(f"{where}: negative sample count")
        if self.kind == "broadcast" and not 0.0 <= self.download_sparsity <= MAX_DOWNLOAD_SPARSITY:
            raise ArtifactError(
                f"{where}: download sparsity {self.download_sparsity} outside [0, {MAX_DOWNLOAD_SPARSITY}]"
            )
        if self.layout and self.kind not in ("upload", "broadcast"):
            raise ArtifactError(f"{where}: {a_or_an(self.kind)} has no layout, but this header declares one")
        for name, shape in self.layout.items():
            if len(shape) != 2 or min(shape) < 1 or math.prod(shape) >= 2**32:
                raise ArtifactError(f"{where}: layout of {name} has an invalid shape {shape}")
        if self.privacy:
            parse_privacy(self.privacy, self.kind, where)


def short(digest: str) -> str:
    """A content hash as people read it: the first 12 hex digits."""
    return digest.removeprefix(HASH_PREFIX)[:12] if digest else "-"


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def content_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: name, dtype, shape, then raw little-endian bytes.

    For each name (sorted by UTF-8 bytes):
        name + b"\\0" + dtype + b"\\0" + json(shape) + b"\\0" + data
    where dtype is the safetensors dtype string (F32, BF16, U8, ...) and
    json(shape) is like "[3,4]" (no spaces).
    """
    digest = hashlib.sha256()
    for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
        _hash_one(digest, name, tensors[name])
    return HASH_PREFIX + digest.hexdigest()


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or Inf: its min and max are finite (NaN
    propagates through both). One pass and two scalars, not a bool tensor of its size."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _hash_one(digest: Any, name: str, tensor: torch.Tensor) -> None:
    shape = json.dumps(list(tensor.shape), separators=(",", ":"))
    digest.update(f"{name}\0{_DTYPE_NAMES[tensor.dtype]}\0{shape}\0".encode())
    digest.update(_tensor_bytes(tensor))


# --------------------------------------------------------------------------- layout rules


def _shape(tensor_shapes: Mapping[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    return tuple(tensor_shapes[name])


def check_layout(
    header: Header,
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype],
    where: str,
) -> None:
    """The tensor names, shapes and dtypes a header's kind requires (no data read)."""
    rank = header.lora.rank
    if not shapes:
        raise ArtifactError(f"{where}: the artifact holds no tensors")
    if header.kind == "state":
        modules: dict[str, set[str]] = {}
        for name, shape in shapes.items():
            parsed = naming.parse_factor_key(name)
            if parsed is None:
                raise ArtifactError(f"{where}: unexpected tensor {name!r} in a state")
            if dtypes[name] not in FLOAT_DTYPES:
                raise ArtifactError(f"{where}: {name} has non-float dtype {dtypes[name]}")
            module, factor = parsed
            modules.setdefault(module, set()).add(factor)
            if (
                len(shape) != 2
                or (factor == "A" and shape[0] != rank)
                or (factor == "B" and shape[1] != rank)
            ):
                raise ArtifactError(f"{where}: {name} has shape {list(shape)}, not rank {rank}")
        for module, factors in modules.items():
            if factors != {"A", "B"}:
                raise ArtifactError(f"{where}: module {module} lacks lora_A or lora_B")
            a_shape = shapes[naming.factor_key(module, "A")]
            b_shape = shapes[naming.factor_key(module, "B")]
            if a_shape[0] != b_shape[1]:
                raise ArtifactError(f"{where}: {module} has A {list(a_shape)} and B {list(b_shape)}")
    elif header.kind in ("upload", "broadcast"):
        _check_delta_layout(header, shapes, dtypes, where)
    elif header.kind == "masked_upload":
        for name, shape in shapes.items():
            parsed = naming.parse_factor_key(name.removesuffix(naming.MASKED))
            if not name.endswith(naming.MASKED) or parsed is None or parsed[1] != "B":
                raise ArtifactError(f"{where}: unexpected tensor {name!r} in a masked upload")
            if dtypes[name] != torch.int32 or len(shape) != 2 or shape[1] != rank:
                raise ArtifactError(
                    f"{where}: {name} should be int32 of shape (d_out, {rank}),"
                    f" not {dtypes[name]} {list(shape)}"
                )
    elif header.kind == "aggregate":
        for name, shape in shapes.items():
            left = naming.strip_suffix(name, naming.AGG_LEFT)
            right = naming.strip_suffix(name, naming.AGG_RIGHT)
            module = left or right
            if module is None:
                raise ArtifactError(f"{where}: unexpected tensor {name!r} in an aggregate")
            left_name, right_name = naming.aggregate_keys(module)
            if left_name not in shapes or right_name not in shapes:
                raise ArtifactError(f"{where}: {module} lacks its left or right factor")
            if dtypes[name] not in FLOAT_DTYPES or len(shape) != 2:
                raise ArtifactError(f"{where}: {name} is not a 2-D float tensor")
            if shapes[left_name][1] != shapes[right_name][0]:
                raise ArtifactError(f"{where}: {module}'s factors do not multiply")


def _check_delta_layout(
    header: Header,
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype],
    where: str,
) -> None:
    expected: set[str] = set()
    for name, logical in header.layout.items():
        if naming.parse_factor_key(name) is None:
            raise ArtifactError(f"{where}: layout names {name!r}, not a LoRA factor")
        values_name = naming.values_key(name)
        mask_name = naming.mask_key(name)
        expected.add(values_name)
        if values_name not in shapes:
            raise ArtifactError(f"{where}: {values_name} is missing")
        quantized = _quantized_dtype(header)
        if quantized is not None:
            _check_quantized_layout(name, quantized, shapes, dtypes, where)
            expected.add(naming.scales_key(name))
        elif dtypes[values_name] not in FLOAT_DTYPES:
            raise ArtifactError(f"{where}: {values_name} has non-float dtype {dtypes[values_name]}")
        numel = math.prod(logical)
        values_shape = shapes[values_name]
        positions_name = naming.positions_key(name)
        if header.kind == "upload" and mask_name in shapes and positions_name in shapes:
            raise ArtifactError(f"{where}: {name} has both a .mask and a .positions tensor (one at most)")
        if header.kind == "upload" and (mask_name in shapes or positions_name in shapes):
            if mask_name in shapes:
                expected.add(mask_name)
                if dtypes[mask_name] != torch.uint8 or shapes[mask_name] != (math.ceil(numel / 8),):
                    raise ArtifactError(
                        f"{where}: {mask_name} should be {math.ceil(numel / 8)} bytes of uint8 for "
                        f"shape {logical}"
                    )
            else:
                expected.add(positions_name)
                limit = math.ceil(numel / 8) - 1  # coded positions are stored only when shorter
                if limit < 1:
                    raise ArtifactError(
                        f"{where}: {positions_name} for shape {logical}, whose 1-byte bitmap is never"
                        " longer (a writer stores the bitmap)"
                    )
                if (
                    dtypes[positions_name] != torch.uint8
                    or len(shapes[positions_name]) != 1
                    or not 1 <= shapes[positions_name][0] <= limit
                ):
                    raise ArtifactError(
                        f"{where}: {positions_name} should be 1 to {limit} bytes of uint8 for shape"
                        f" {logical} (shorter than its {limit + 1}-byte bitmap), not"
                        f" {_DTYPE_NAMES.get(dtypes[positions_name], dtypes[positions_name])}"
                        f" {list(shapes[positions_name])}"
                    )
            if len(values_shape) != 1 or values_shape[0] > numel:
                raise ArtifactError(f"{where}: {values_name} has shape {list(values_shape)}")
        elif header.kind == "upload":
            if list(values_shape) != list(logical):
                raise ArtifactError(
                    f"{where}: dense {values_name} has shape {list(values_shape)}, layout {logical}"
                )
        elif len(values_shape) != 1 or values_shape[0] > numel:
            raise ArtifactError(f"{where}: {values_name} has shape {list(values_shape)}")
    extra = set(shapes) - expected
    if extra:
        raise ArtifactError(f"{where}: tensors not in the layout: {sorted(extra)[:3]}")


def _quantized_dtype(header: Header) -> str | None:
    """ "int8" or "int4" for a broadcast whose values are block-quantized codes, else None."""
    value_dtype = header.info.get("value_dtype") if isinstance(header.info, dict) else None
    if header.kind == "broadcast" and value_dtype in QUANTIZED_BITS:
        return value_dtype
    return None


def _check_quantized_layout(
    name: str,
    value_dtype: str,
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype],
    where: str,
) -> None:
    """A quantized broadcast tensor: X.values int8 (int8) or uint8 (packed int4) and X.scales
    float32, both 1-D; their counts are checked against the seeded mask by Artifact.verify."""
    values_name, scales_name = naming.values_key(name), naming.scales_key(name)
    code_dtype = torch.int8 if value_dtype == "int8" else torch.uint8
    if dtypes[values_name] != code_dtype or len(shapes[values_name]) != 1:
        raise ArtifactError(
            f"{where}: {values_name} of a {value_dtype} broadcast should be 1-D"
            f" {_DTYPE_NAMES[code_dtype]}, not {_DTYPE_NAMES.get(dtypes[values_name], dtypes[values_name])}"
            f" {list(shapes[values_name])}"
        )
    if scales_name not in shapes:
        raise ArtifactError(f"{where}: {scales_name} is missing ({value_dtype} values need their scales)")
    if dtypes[scales_name] != torch.float32 or len(shapes[scales_name]) != 1:
        raise ArtifactError(f"{where}: {scales_name} should be 1-D float32")


def stored_value_count(value_dtype: str | None, kept: int) -> tuple[int, int | None]:
    """(X.values length, X.scales length or None) that a broadcast keeping `kept` elements stores."""
    if value_dtype == "int4":
        return math.ceil(kept / 2), block_count(kept)
    if value_dtype == "int8":
        return kept, block_count(kept)
    return kept, None


# --------------------------------------------------------------------------- reading


class TensorFile:
    """Reads one tensor of a safetensors file at a time, with plain reads: no mapping, no
    descriptor held between reads (an aggregate of 1,000 uploads stays within the open-file
    limit, and its memory holds what it decoded, not every file it touched).

    The file is identified by (device, inode, size, modification time) when opened; a read
    that finds another file, or this one changed, raises ArtifactError instead of returning
    bytes that were never verified.
    """

    def __init__(self, path: Path, data_start: int, offsets: dict[str, tuple[int, int]], identity: tuple):
        self.path = path
        self.data_start = data_start  # 8 + header length
        self.offsets = offsets  # name -> (start, end) in the data section
        self.identity = identity

    @classmethod
    def open(cls, path: Path) -> TensorFile:
        """The offsets of a file safe_open has already validated (header length, then JSON)."""
        try:
            with path.open("rb") as handle:
                identity = _identity(os.fstat(handle.fileno()))
                header_length = int.from_bytes(handle.read(8), "little")
                entries = json.loads(handle.read(header_length))
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{path}: cannot be read ({err})") from None
        offsets = {
            name: (int(entry["data_offsets"][0]), int(entry["data_offsets"][1]))
            for name, entry in entries.items()
            if name != "__metadata__"
        }
        return cls(path, 8 + header_length, offsets, identity)

    def read(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...], count: int | None = None
    ) -> torch.Tensor:
        """Tensor `name` (or only its first `count` elements, flat) as stored."""
        start, end = self.offsets[name]
        numel = math.prod(shape) if count is None else count
        out = torch.empty(numel, dtype=dtype)
        buffer = memoryview(out.view(torch.uint8).numpy()) if numel else memoryview(b"")
        try:
            with self.path.open("rb") as handle:
                if _identity(os.fstat(handle.fileno())) != self.identity:
                    raise ArtifactError(
                        f"{self.path}: changed while it was being read (size or modification time"
                        " differs); make sure nothing writes to it, then run the command again"
                    )
                handle.seek(self.data_start + start)
                got = handle.readinto(buffer) if numel else 0
        except OSError as err:
            raise ArtifactError(f"{self.path}: cannot be read ({err.strerror or err})") from None
        if got != min(len(buffer), end - start):
            raise ArtifactError(f"{self.path}: ends inside tensor {name}; truncated copy?")
        return out if count is not None else out.reshape(shape)


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class Artifact:
    """A validated artifact on disk. Tensors are read one at a time, on demand."""

    def __init__(self, path: Path, header: Header, reader: TensorFile, shapes: dict, dtypes: dict):
        self.path = path
        self.header = header
        self._reader = reader
        self.shapes: dict[str, tuple[int, ...]] = shapes
        self.dtypes: dict[str, torch.dtype] = dtypes

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def names(self) -> list[str]:
        return sorted(self.shapes)

    def tensor(self, name: str) -> torch.Tensor:
        return self._reader.read(name, self.dtypes[name], self.shapes[name])

    def numel(self) -> int:
        """Total elements of all tensors (for a state: the LoRA parameter count)."""
        return sum(math.prod(shape) for shape in self.shapes.values())

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.tensor(name)

    def modules(self) -> list[str]:
        """Adapted modules, in natural order (states: from names; deltas: from the layout)."""
        if self.header.kind == "state":
            found = (naming.parse_factor_key(n) for n in self.shapes)
        elif self.header.kind == "aggregate":
            return naming.sorted_modules(
                n.removesuffix(naming.AGG_LEFT) for n in self.shapes if n.endswith(naming.AGG_LEFT)
            )
        elif self.header.kind == "masked_upload":
            found = (naming.parse_factor_key(n.removesuffix(naming.MASKED)) for n in self.shapes)
        else:
            found = (naming.parse_factor_key(n) for n in self.header.layout)
        return naming.sorted_modules(p[0] for p in found if p)

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A state's (A (r, d_in), B (d_out, r)) of one module."""
        return (
            self.tensor(naming.factor_key(module, "A")),
            self.tensor(naming.factor_key(module, "B")),
        )

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """A state's {module: (d_out, d_in)}."""
        out = {}
        for module in self.modules():
            r_a, d_in = self.shapes[naming.factor_key(module, "A")]
            d_out, _ = self.shapes[naming.factor_key(module, "B")]
            out[module] = (d_out, d_in)
        return out

    def upload_delta(self, name: str) -> torch.Tensor | None:
        """An upload's dense delta of PEFT tensor `name` (fp32), or None if not uploaded."""
        found = self.upload_entries(name)
        if found is None:
            return None
        positions, values = found
        shape = tuple(self.header.layout[name])
        if positions is None:
            return values.reshape(shape)
        dense = torch.zeros(math.prod(shape), dtype=torch.float32)
        dense[positions] = values
        return dense.reshape(shape)

    def upload_entries(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """An upload's delta of PEFT tensor `name` as stored: (positions, values) with the
        (count,) int64 row-major positions of the (count,) fp32 kept values, positions None for a
        dense tensor (values then hold every element, row-major); None if not uploaded."""
        if name not in self.header.layout:
            return None
        values = self.tensor(naming.values_key(name)).float()
        if naming.positions_key(name) in self.shapes:
            return self._kept_positions(name), values
        if naming.mask_key(name) in self.shapes:
            numel = math.prod(self.header.layout[name])
            return unpack_bits(self.tensor(naming.mask_key(name)), numel).nonzero().reshape(-1), values
        return None, values.reshape(-1)

    def upload_kept(self, name: str) -> torch.Tensor | None:
        """An upload's mask of layout tensor `name` (bool, its layout shape) from X.mask or
        X.positions; None for a dense tensor."""
        shape = tuple(self.header.layout[name])
        numel = math.prod(shape)
        if naming.mask_key(name) in self.shapes:
            return unpack_bits(self.tensor(naming.mask_key(name)), numel).reshape(shape)
        if naming.positions_key(name) not in self.shapes:
            return None
        kept = torch.zeros(numel, dtype=torch.bool)
        kept[self._kept_positions(name)] = True
        return kept.reshape(shape)

    def _kept_positions(self, name: str) -> torch.Tensor:
        """The (count,) int64 row-major positions X.positions codes, decoded and validated
        (ArtifactError) in memory bounded by the file: the stream and one index per value."""
        positions_name = naming.positions_key(name)
        numel = math.prod(self.header.layout[name])
        count = self.shapes[naming.values_key(name)][0]
        try:
            return read_positions_tensor(self.tensor(positions_name), numel, count)
        except PositionCodeError as err:
            raise ArtifactError(f"{self.where}: {positions_name} is corrupt: {err}") from None

    def mask_storage(self, name: str) -> dict[str, Any] | None:
        """How an upload stores the mask of layout tensor `name`: {"stored": "bitmap" | "positions",
        "bytes": stored bytes, "rice_k": k (positions only)}; None for a dense tensor."""
        if naming.mask_key(name) in self.shapes:
            return {"stored": "bitmap", "bytes": self.shapes[naming.mask_key(name)][0]}
        positions_name = naming.positions_key(name)
        if positions_name not in self.shapes:
            return None
        k = int(self._reader.read(positions_name, torch.uint8, self.shapes[positions_name], count=1)[0])
        return {"stored": "positions", "bytes": self.shapes[positions_name][0], "rice_k": k}

    def broadcast_mask(self, name: str) -> torch.Tensor:
        """The seeded download mask of a broadcast tensor (bool, its layout shape)."""
        shape = tuple(self.header.layout[name])
        return seeded_keep_mask(self.header.seed, name, shape, self.header.download_sparsity)

    def verify(self) -> None:
        """Read every tensor once: check the content hash, finiteness and sparse-mask counts."""
        digest = hashlib.sha256()
        for name in sorted(self.shapes, key=lambda n: n.encode("utf-8")):
            tensor = self.tensor(name)
            if tensor.is_floating_point() and not all_finite(tensor):
                raise ArtifactError(f"{self.where}: tensor {name} contains NaN or Inf")
            _hash_one(digest, name, tensor)
        actual = HASH_PREFIX + digest.hexdigest()
        if actual != self.header.content_hash:
            raise ArtifactError(
                f"{self.where}: content hash mismatch (header {short(self.header.content_hash)}, "
                f"data {short(actual)}): the file is corrupt or was modified; copy it again"
            )
        self._verify_masks()

    def _verify_masks(self) -> None:
        for name, shape in self.header.layout.items():
            numel = math.prod(shape)
            if self.header.kind == "upload":
                if naming.positions_key(name) in self.shapes:
                    self._kept_positions(name)  # decoding checks everything, the count included
                    continue
                if naming.mask_key(name) not in self.shapes:
                    continue  # dense values: their shape was checked with the layout
                packed = self.tensor(naming.mask_key(name))
                if not padding_is_clean(packed, numel):
                    raise ArtifactError(f"{self.where}: mask of {name} has bits set past its end")
                kept = count_set_bits(packed)
            else:
                kept = self._broadcast_kept(name, numel)
                quantized = _quantized_dtype(self.header)
                if quantized is not None:
                    self._verify_quantized(name, quantized, kept)
                    continue
            stored = self.shapes[naming.values_key(name)][0]
            if kept != stored:
                raise ArtifactError(
                    f"{self.where}: the mask of {name} keeps {kept} elements but {stored} values are stored"
                )

    def _verify_quantized(self, name: str, value_dtype: str, kept: int) -> None:
        """The code and scale counts fit the mask's kept count, and packed int4 codes decode."""
        codes, scales = stored_value_count(value_dtype, kept)
        stored = self.shapes[naming.values_key(name)][0]
        stored_scales = self.shapes[naming.scales_key(name)][0]
        if (stored, stored_scales) != (codes, scales):
            raise ArtifactError(
                f"{self.where}: the mask of {name} keeps {kept} elements, which {value_dtype} stores as"
                f" {codes} code bytes and {scales} scales, but the file has {stored} and {stored_scales}"
            )
        self.broadcast_values(name, kept)  # decodes (int4: no unused nibble) and checks finite scales

    def broadcast_values(self, name: str, kept: int | None = None) -> torch.Tensor:
        """A broadcast tensor's kept values (kept,) as every client applies them: float32,
        dequantized from their codes and block scales when the broadcast is int8 or int4.
        kept: the seeded mask's count when the caller has it (int4 needs it; else counted)."""
        values = self.tensor(naming.values_key(name))
        quantized = _quantized_dtype(self.header)
        if quantized is None:
            return values.float()
        scales = self.tensor(naming.scales_key(name))
        if not all_finite(scales) or bool((scales < 0).any()):
            raise ArtifactError(f"{self.where}: {naming.scales_key(name)} holds a negative or infinite scale")
        if quantized == "int8":
            return dequantize_blocks(values, scales)
        if kept is None:
            head = self.header
            kept = count_kept(head.seed, name, math.prod(head.layout[name]), head.download_sparsity)
        try:
            codes = unpack_int4(values, kept)
        except ValueError as exc:
            raise ArtifactError(f"{self.where}: {naming.values_key(name)}: {exc}") from None
        return dequantize_blocks(codes, scales)

    def _broadcast_kept(self, name: str, numel: int) -> int:
        """Elements the seeded mask keeps, counted in bounded memory after a cheap plausibility check.

        The mask keeps each element independently with probability q = 1 - p, so the count is
        Binomial(numel, q); a stored count more than 10 standard deviations (+10) from numel q
        cannot come from this layout, and is refused before the O(numel) count.
        """
        stored = self.shapes[naming.values_key(name)][0]
        if _quantized_dtype(self.header) == "int4":
            stored *= 2  # two codes a byte (the last byte may hold one)
        keep = 1.0 - self.header.download_sparsity
        spread = 10.0 * math.sqrt(numel * keep * (1.0 - keep)) + 10.0
        if abs(stored - numel * keep) > spread:
            raise ArtifactError(
                f"{self.where}: {name} stores {stored} values, but its layout {self.header.layout[name]} at"
                f" download sparsity {self.header.download_sparsity:g} keeps about {numel * keep:.0f}"
            )
        return count_kept(self.header.seed, name, numel, self.header.download_sparsity)


def read_artifact(path: str | os.PathLike, kind: str | None = None, verify: bool = True) -> Artifact:
    """Open and validate an artifact; `kind` is the kind the caller needs.

    Raises ArtifactError for a missing, unreadable, corrupt or malformed file and
    MismatchError for a valid artifact of another kind.
    """
    path = Path(path)
    if not checked_exists(path):
        raise ArtifactError(f"{path}: no such file")
    if path.is_dir():
        raise ArtifactError(f"{path}: is a directory, expected a .safetensors file")
    handle = open_safetensors(path)
    header = Header.from_metadata(handle.metadata() or {}, str(path))
    if kind is not None and header.kind != kind:
        raise MismatchError(f"{path}: is {a_or_an(header.kind)} artifact, expected {a_or_an(kind)}")
    shapes, dtypes = tensor_layout(handle)
    del handle  # validated; reads go through TensorFile, so nothing stays mapped
    check_layout(header, shapes, dtypes, str(path))
    artifact = Artifact(path, header, TensorFile.open(path), shapes, dtypes)
    if verify:
        artifact.verify()
    return artifact


def checked_exists(path: Path) -> bool:
    """Path.exists, with the errors it does not swallow (name too long, ...) as ArtifactError."""
    try:
        return path.exists()
    except OSError as err:
        raise ArtifactError(f"{path}: cannot access ({err.strerror or err})") from None


def check_safetensors_start(path: str | os.PathLike) -> int:
    """Refuse, in words, a file that is no safetensors file at all; returns its header length.

    A safetensors file starts with an 8-byte little-endian header length N, then N bytes of
    JSON beginning with '{'. A text file, an image or a pickle does not, and is "not a
    safetensors file"; a file whose header runs past its end is a truncated copy.
    """
    path = Path(path)
    if not checked_exists(path):
        raise ArtifactError(f"{path}: no such file")
    if path.is_dir():
        raise ArtifactError(f"{path}: is a directory, expected a .safetensors file")
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            start = handle.read(9)
    except OSError as err:
        raise ArtifactError(f"{path}: cannot be read ({err.strerror or err})") from None
    if size == 0:
        raise ArtifactError(f"{path}: is empty, not a safetensors file")
    if start.startswith(SEALED_MAGIC[:9]):
        raise ArtifactError(
            f"{path}: is sealed ({sealed_for(path)}); open it first:"
            f" `fedsrd open {path} --agreement-key keys/NAME.agreement.key --out PLAIN`"
        )
    length = int.from_bytes(start[:8], "little")
    if len(start) < 9 or start[8:9] != b"{" or not 2 <= length <= MAX_HEADER_BYTES:
        raise ArtifactError(
            f"{path}: not a safetensors file (it does not start with a safetensors header;"
            " fedsrd reads and writes .safetensors files only)"
        )
    if 8 + length > size:
        raise ArtifactError(
            f"{path}: not a readable safetensors file (its {length}-byte header runs past the end of"
            f" the {size}-byte file); truncated or corrupt copy?"
        )
    return length


def sealed_for(path: Path) -> str:
    """Whom a sealed file (sealed.py) names as its recipients, for messages."""
    try:
        with path.open("rb") as handle:
            data = handle.read(len(SEALED_MAGIC) + 4)
            header = json.loads(handle.read(min(int.from_bytes(data[-4:], "little"), 1 << 20)))
        return "for " + ", ".join(str(entry["party"]) for entry in header["recipients"])
    except (OSError, ValueError, KeyError, TypeError):
        return "its header is unreadable"


def open_safetensors(path: Path) -> Any:
    """safe_open a file, with every way it can fail as one ArtifactError."""
    check_safetensors_start(path)
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # SafetensorError, OSError: anything here means an unusable file
        detail = str(err).removeprefix("Error while deserializing header: ")
        raise ArtifactError(
            f"{path}: not a readable safetensors file ({detail}); truncated or corrupt copy?"
        ) from None


def tensor_layout(handle: Any) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    """The shape and dtype of every tensor of a safe_open handle (no data read)."""
    shapes, dtypes = {}, {}
    for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
        sl = handle.get_slice(name)
        shapes[name] = tuple(sl.get_shape())
        dtypes[name] = _dtype_from_name(sl.get_dtype(), name)
    return shapes, dtypes


def _dtype_from_name(dtype_name: str, name: str) -> torch.dtype:
    for dtype, label in _DTYPE_NAMES.items():
        if label == dtype_name:
            return dtype
    raise ArtifactError(f"tensor {name} has unsupported dtype {dtype_name}")


# --------------------------------------------------------------------------- writing


def serialize(header: Header, tensors: Mapping[str, torch.Tensor]) -> tuple[Header, list[Any]]:
    """Validate a complete artifact in memory: (header with its content hash, file parts).

    Refuses (ArtifactError) anything `read_artifact` would refuse: wrong layout for
    the kind, non-finite values, unsupported dtypes. The file is the concatenation
    of the parts; `sum(len(p) for p in parts)` is its size.
    """
    where = f"refusing to write the {header.kind}"
    header.check(where)
    prepared: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise ArtifactError(f"{where}: tensor names must be non-empty strings")
        if tensor.dtype not in _DTYPE_NAMES:
            raise ArtifactError(f"{where}: {name} has unsupported dtype {tensor.dtype}")
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ArtifactError(f"{where}: {name} contains NaN or Inf (check the inputs)")
        prepared[name] = tensor.detach().to("cpu").contiguous()
    shapes = {n: tuple(t.shape) for n, t in prepared.items()}
    dtypes = {n: t.dtype for n, t in prepared.items()}
    check_layout(header, shapes, dtypes, where)
    header = replace(header, content_hash=content_hash(prepared))
    return header, encode_safetensors(prepared, header.to_metadata())


def encode_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> list[Any]:
    """A canonical safetensors file, as parts: the same input always gives the same bytes.

    8-byte little-endian header length, the JSON header with sorted keys and no
    spaces, padded with spaces to a multiple of 8, then the tensors' bytes ordered by
    (item size descending, name) so every tensor stays aligned to its item size.
    (safetensors' own writer orders metadata differently from run to run.)
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n.encode("utf-8")))
    entries: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    data = []
    for name in order:
        tensor = tensors[name]
        raw = _tensor_bytes(tensor)
        entries[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + raw.nbytes],
        }
        offset += raw.nbytes
        data.append(raw)
    text = encode_header(entries)
    return [len(text).to_bytes(8, "little"), text, *data]


def encode_header(entries: Mapping[str, Any]) -> bytes:
    """The canonical safetensors JSON header: sorted keys, no spaces, space-padded to a multiple of 8."""
    text = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def write_artifact(
    path: str | os.PathLike,
    header: Header,
    tensors: Mapping[str, torch.Tensor],
    force: bool = False,
    sign: Callable[[list[Any]], list[Any]] | None = None,
    allow_identical: bool = False,
    also: Sequence[FileWrite] = (),
    seal: Callable[[list[Any]], list[Any]] | None = None,
) -> Header:
    """Validate, hash and atomically write an artifact; returns the header as written.

    sign: turns the canonical file parts into signed parts (signing.SigningKey.sign_parts);
    it adds signature metadata only, so the content hash and the header are unchanged.
    also: other files written with it, all or none (train-local's loss log).
    seal: turns the (signed) file into a sealed one (sealed.sealer), written instead.
    """
    header, data = serialize(header, tensors)
    if sign is not None:
        data = sign(data)
    if seal is not None:
        data = seal(data)
    write_files_atomic([FileWrite(Path(path), data, allow_identical), *also], force)
    return header


def write_artifacts(
    writes: Sequence[tuple[str | os.PathLike, Header, Mapping[str, torch.Tensor], bool]],
    force: bool = False,
    sign: Callable[[list[Any]], list[Any]] | None = None,
    seal: Mapping[int, Callable[[list[Any]], list[Any]]] | None = None,
) -> list[Header]:
    """write_artifact for several artifacts, all or none (see write_files_atomic).

    writes: (path, header, tensors, allow_identical) per artifact, placed in this order.
    seal: {index in `writes`: sealer} for the files written sealed.
    Returns the headers as written, in the same order.
    """
    headers, files = [], []
    for index, (path, header, tensors, allow_identical) in enumerate(writes):
        header, data = serialize(header, tensors)
        headers.append(header)
        if sign is not None:
            data = sign(data)
        if seal and index in seal:
            data = seal[index](data)
        files.append(FileWrite(Path(path), data, allow_identical))
    write_files_atomic(files, force)
    return headers
