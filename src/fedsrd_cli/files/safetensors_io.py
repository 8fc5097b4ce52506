"""The safetensors bytes: fedsrd's canonical encoding, the content hash, and checked reading.

Everything here works below the meaning of a file (no kinds, no header rules):

    content hash    sha256 over the tensors in name order (docs/format.md, "Content hash");
                    `short` prints one; `all_finite` is the NaN/Inf check every read and
                    write makes on the way
    encoding        the canonical file: the same tensors and metadata always give the same
                    bytes (safetensors' own writer does not), returned as parts that signing
                    and sealing can extend before atomic.py writes them
    reading         refusing, in words, what is no safetensors file (empty, sealed, text,
                    truncated); opening a valid one; its tensors' shapes and dtypes; and
                    TensorFile, which reads one tensor at a time and notices a file that
                    changed underneath it

header.py parses the metadata, layout.py checks the tensors a kind needs, and artifacts.py
uses all three to read and write artifacts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fedsrd_cli.errors import ArtifactError

HASH_PREFIX = "sha256:"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
# A sealed file (trust/sealed.py) starts with this; readers say how to open it.
SEALED_MAGIC = b"fedsrd-sealed-1\n"

# safetensors dtype strings, used in the content hash (docs/format.md, "Content hash").
DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.bool: "BOOL",
}

# --------------------------------------------------------------------------- content hash


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
        hash_tensor(digest, name, tensors[name])
    return HASH_PREFIX + digest.hexdigest()


def hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    shape = json.dumps(list(tensor.shape), separators=(",", ":"))
    digest.update(f"{name}\0{DTYPE_NAMES[tensor.dtype]}\0{shape}\0".encode())
    digest.update(_tensor_bytes(tensor))


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or Inf: its min and max are finite (NaN
    propagates through both). One pass and two scalars, not a bool tensor of its size."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


# --------------------------------------------------------------------------- encoding


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
            "dtype": DTYPE_NAMES[tensor.dtype],
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


# --------------------------------------------------------------------------- reading


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
    """Whom a sealed file (trust/sealed.py) names as its recipients, for messages."""
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
    for dtype, label in DTYPE_NAMES.items():
        if label == dtype_name:
            return dtype
    raise ArtifactError(f"tensor {name} has unsupported dtype {dtype_name}")


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
