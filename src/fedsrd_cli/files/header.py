"""The header: the fedsrd metadata every artifact carries, and the rules it obeys on its own.

A fedsrd file is a safetensors file whose `__metadata__` holds string keys named
`fedsrd.*` (docs/format.md, "Metadata"). `Header` is those keys as one frozen dataclass:

    to_metadata     the header as the string map that is written into the file
    from_metadata   a file's string map parsed back, then checked
    check           the rules a header obeys whatever tensors come with it: a known kind,
                    a non-negative round, an upload's client id, a broadcast's download
                    sparsity, a well-formed layout and privacy ledger

Which tensors each kind holds is layout.py's concern; the bytes around the header are
safetensors_io.py's; artifacts.py puts the three together to read and write files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedsrd_cli.config import LoraSpec
from fedsrd_cli.errors import ArtifactError, a_or_an
from fedsrd_cli.math.quantize import QUANTIZED_BITS
from fedsrd_cli.privacy.ledger import parse_privacy

# Version 2 added coded upload positions (X.positions); version 1 files are read as before.
# A reader of version 1 refuses version 2 files with a one-line "upgrade fedsrd". Version 3
# added the masked upload of secure aggregation: only that kind is written as version 3, so
# every other file stays as it was, and an older fedsrd refuses a masked upload with "upgrade".
# Version 4 added quantized upload values (int8 / int4 codes with X.scales, info.value_dtype):
# only such uploads are written as version 4, so an fp32/bf16/fp16 upload is byte for byte what
# it was, and an older fedsrd refuses a quantized upload with "upgrade" instead of misreading it.
# Version 5 added sparse and narrow masked uploads (a version-2 roster's density and word width,
# info.secure.density and word_bits): only those are written as version 5; a masked upload of a
# version-1 roster is version 3 as before.
FORMAT_VERSION = 2
MASKED_UPLOAD_VERSION = 3
QUANTIZED_UPLOAD_VERSION = 4
SPARSE_MASKED_UPLOAD_VERSION = 5
READABLE_FORMAT_VERSIONS = (1, 2, 3, 4, 5)
KINDS = ("state", "upload", "aggregate", "broadcast", "masked_upload")
MAX_METADATA_CHARS = 16 * 2**20
SECURE_RESIDUAL = "secure_residual"  # files/residual.py's kind: a site's own file, no artifact
# Keeps a broadcast's layout within ~1000x its stored values, so checking its mask stays cheap.
MAX_DOWNLOAD_SPARSITY = 0.999


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

    def quantized_dtype(self) -> str | None:
        """ "int8" or "int4" for an upload or broadcast whose values are block-quantized codes
        (its info.value_dtype), else None."""
        value_dtype = self.info.get("value_dtype") if isinstance(self.info, dict) else None
        if self.kind in ("upload", "broadcast") and value_dtype in QUANTIZED_BITS:
            return value_dtype
        return None

    def site_rank(self) -> int | None:
        """The rank r_i a local state or upload of `train-local --rank r_i` records
        (info.site_rank), None when none (or no whole number) is recorded: the global rank."""
        found = self.info.get("site_rank") if isinstance(self.info, dict) else None
        return found if isinstance(found, int) and not isinstance(found, bool) else None

    def format_version(self) -> int:
        """The format version this header is written as: 3 for a masked upload, 4 for a quantized
        upload, 2 for everything else."""
        if self.kind == "masked_upload":
            secure = self.info.get("secure") if isinstance(self.info, dict) else None
            narrow = isinstance(secure, dict) and "word_bits" in secure
            return SPARSE_MASKED_UPLOAD_VERSION if narrow else MASKED_UPLOAD_VERSION
        if self.kind == "upload" and self.quantized_dtype() is not None:
            return QUANTIZED_UPLOAD_VERSION
        return FORMAT_VERSION

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "format": "pt",
            "fedsrd.format_version": str(self.format_version()),
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
        if meta.get("fedsrd.kind") == SECURE_RESIDUAL:
            raise ArtifactError(
                f"{where}: is a site's secure residual (kept by `sparsify --secure --residual-out`, never"
                " sent), not a round artifact; only that site's next `sparsify --secure --residual-in`"
                " reads it"
            )
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
        # Versions 4 and 5 are each one kind of file: a file of that version must be that kind,
        # and that kind must be written as that version (an older reader then says "upgrade").
        only = {
            QUANTIZED_UPLOAD_VERSION: "an upload with int8 or int4 values (info.value_dtype)",
            SPARSE_MASKED_UPLOAD_VERSION: "a masked upload of a version-2 roster (info.secure.word_bits)",
        }
        for special, what in only.items():
            if special in (version, header.format_version()) and version != header.format_version():
                raise ArtifactError(
                    f"{where}: format version {version}, but only {what} is written as version {special}"
                )
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
