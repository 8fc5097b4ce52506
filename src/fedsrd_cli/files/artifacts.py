"""Artifacts: reading and writing fedsrd's files, each validated whole.

Five kinds (docs/format.md): `state` (global or local LoRA factors), `upload`
(one client's sparse deltas), `masked_upload` (an upload of secure aggregation),
`aggregate` (the coordinator's factored W_r) and `broadcast` (the sparse
one-factor update). Every read validates the header, the tensor layout, the
content hash and finiteness before anything uses the file; every write validates
the same things first, then hands the bytes to atomic.py, which writes a
temporary file and renames it, refusing to replace an existing file unless forced.

    Artifact                    a validated file on disk: its header, tensor names and
                                shapes, and each kind's tensors decoded on demand
    read_artifact               open and validate a file (`verify` reads every tensor once)
    serialize                   a header and tensors as the canonical, hashed file parts
    write_artifact(s)           serialize, optionally sign and seal, and write atomically

The pieces it puts together: header.py (the metadata and its rules), layout.py (the
tensors each kind needs) and safetensors_io.py (the bytes, the content hash and the
low-level reading). A PEFT adapter trained elsewhere is read as a local state by adapters.py.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedsrd_cli.errors import ArtifactError, MismatchError, a_or_an
from fedsrd_cli.files import naming
from fedsrd_cli.files.atomic import FileWrite, write_files_atomic
from fedsrd_cli.files.header import Header
from fedsrd_cli.files.layout import check_layout, stored_value_count
from fedsrd_cli.files.safetensors_io import (
    DTYPE_NAMES,
    HASH_PREFIX,
    TensorFile,
    all_finite,
    checked_exists,
    content_hash,
    encode_safetensors,
    hash_tensor,
    open_safetensors,
    short,
    tensor_layout,
)
from fedsrd_cli.math.masks import (
    count_kept,
    count_set_bits,
    padding_is_clean,
    seeded_keep_mask,
    unpack_bits,
)
from fedsrd_cli.math.positions import PositionCodeError, read_positions_tensor
from fedsrd_cli.math.quantize import dequantize_blocks, unpack_int4


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
        dense tensor (values then hold every element, row-major); None if not uploaded. int8 and
        int4 values are dequantized from their codes and block scales (math.quantize)."""
        if name not in self.header.layout:
            return None
        if naming.positions_key(name) in self.shapes:
            count = self._upload_count(name)
            return self._kept_positions(name, count), self._decoded_values(name, count)
        if naming.mask_key(name) in self.shapes:
            numel = math.prod(self.header.layout[name])
            positions = unpack_bits(self.tensor(naming.mask_key(name)), numel).nonzero().reshape(-1)
            return positions, self._decoded_values(name, positions.numel())
        return None, self._decoded_values(name, math.prod(self.header.layout[name])).reshape(-1)

    def upload_value_count(self, name: str) -> int | None:
        """How many values an upload keeps of layout tensor `name`; None for a dense tensor."""
        if naming.mask_key(name) not in self.shapes and naming.positions_key(name) not in self.shapes:
            return None
        return self._upload_count(name)

    def _upload_count(self, name: str) -> int:
        """The kept count of a sparse upload tensor, from its stored values: their length, or for
        int4 codes (b bytes) 2b, less one when the last byte's high nibble is 0 (an odd count:
        pack_int4 writes no other 0 nibble)."""
        values_name = naming.values_key(name)
        stored = self.shapes[values_name][0]
        if self.header.quantized_dtype() != "int4" or stored == 0:
            return stored
        last = int(self.tensor(values_name)[-1])
        return 2 * stored - (1 if last >> 4 == 0 else 0)

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

    def _kept_positions(self, name: str, count: int | None = None) -> torch.Tensor:
        """The (count,) int64 row-major positions X.positions codes, decoded and validated
        (ArtifactError) in memory bounded by the file: the stream and one index per value.
        count: the stored values' count (_upload_count) when the caller has it."""
        positions_name = naming.positions_key(name)
        numel = math.prod(self.header.layout[name])
        count = self._upload_count(name) if count is None else count
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
            hash_tensor(digest, name, tensor)
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
            quantized = self.header.quantized_dtype()
            if self.header.kind == "upload":
                if naming.positions_key(name) in self.shapes:
                    kept = self._upload_count(name)
                    self._kept_positions(name, kept)  # decoding checks everything, the count included
                    if quantized is not None:
                        self._verify_quantized(name, quantized, kept)
                    continue
                if naming.mask_key(name) not in self.shapes:
                    if quantized is not None:  # dense codes: their count was checked with the layout
                        self._verify_quantized(name, quantized, numel)
                    continue  # dense values: their shape was checked with the layout
                packed = self.tensor(naming.mask_key(name))
                if not padding_is_clean(packed, numel):
                    raise ArtifactError(f"{self.where}: mask of {name} has bits set past its end")
                kept = count_set_bits(packed)
            else:
                kept = self._broadcast_kept(name, numel)
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
        self._decoded_values(name, kept)  # decodes (int4: no unused nibble) and checks finite scales

    def broadcast_values(self, name: str, kept: int | None = None) -> torch.Tensor:
        """A broadcast tensor's kept values (kept,) as every client applies them: float32,
        dequantized from their codes and block scales when the broadcast is int8 or int4.
        kept: the seeded mask's count when the caller has it (int4 needs it; else counted)."""
        if kept is None and self.header.quantized_dtype() == "int4":
            head = self.header
            kept = count_kept(head.seed, name, math.prod(head.layout[name]), head.download_sparsity)
        return self._decoded_values(name, kept)

    def _decoded_values(self, name: str, kept: int | None) -> torch.Tensor:
        """X.values as float32: as stored (float dtypes, their stored shape) or (kept,) values
        dequantized from int8 / int4 codes and X.scales (kept: the count, which int4 needs)."""
        values = self.tensor(naming.values_key(name))
        quantized = self.header.quantized_dtype()
        if quantized is None:
            return values.float()
        scales = self.tensor(naming.scales_key(name))
        if not all_finite(scales) or bool((scales < 0).any()):
            raise ArtifactError(f"{self.where}: {naming.scales_key(name)} holds a negative or infinite scale")
        if quantized == "int8":
            return dequantize_blocks(values, scales)
        if kept is None:
            raise ValueError("int4 codes decode only with their count")  # a programming error
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
        if self.header.quantized_dtype() == "int4":
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
        if tensor.dtype not in DTYPE_NAMES:
            raise ArtifactError(f"{where}: {name} has unsupported dtype {tensor.dtype}")
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ArtifactError(f"{where}: {name} contains NaN or Inf (check the inputs)")
        prepared[name] = tensor.detach().to("cpu").contiguous()
    shapes = {n: tuple(t.shape) for n, t in prepared.items()}
    dtypes = {n: t.dtype for n, t in prepared.items()}
    check_layout(header, shapes, dtypes, where)
    header = replace(header, content_hash=content_hash(prepared))
    return header, encode_safetensors(prepared, header.to_metadata())


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
