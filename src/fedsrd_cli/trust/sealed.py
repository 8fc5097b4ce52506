"""Sealed files: a fedsrd file encrypted to the parties it is for, so a lost copy reveals nothing.

A sealed file is

    MAGIC                     b"fedsrd-sealed-1\\n" (16 bytes)
    length                    4 bytes, little-endian: the header's length
    header                    JSON: {"recipients": [{"party", "key" (sha256 of its raw X25519
                              public key), "ephemeral" (base64 raw X25519 public key), "wrapped"
                              (base64: the file key, sealed to that party)}], "nonce" (base64, 12),
                              "length" (the body's bytes, so a copy cut short is told from one
                              changed; files sealed before it have none)}
    body                      ChaCha20-Poly1305(file key, nonce, the whole plain file,
                              associated data = MAGIC + length + header)

The file key is 32 random bytes. For each recipient, a fresh ephemeral X25519 key pair gives
kek = HKDF-SHA256(X25519(ephemeral, recipient), salt none, length 32, info = b"fedsrd-seal-v1\\n"
+ ephemeral public + recipient public), and wrapped = ChaCha20-Poly1305(kek, nonce = 12 zero
bytes (each kek is used once), file key, associated data = the recipient's name). The plain file
keeps its own signature inside, so the reader checks who wrote it after opening it. The
recipients' public keys are their published agreement keys (agreement.py), checked against
their trusted NAME.pub. Everything comes from `cryptography` (OpenSSL): X25519, HKDF and
ChaCha20-Poly1305.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedsrd_cli.errors import ArtifactError, TrustError
from fedsrd_cli.files.safetensors_io import SEALED_MAGIC
from fedsrd_cli.trust.agreement import AgreementKey

MAGIC = SEALED_MAGIC
KEK_INFO = b"fedsrd-seal-v1\n"
MAX_HEADER = 1 << 20
MAX_PLAIN = (1 << 31) - 1  # what one ChaCha20-Poly1305 call of `cryptography` encrypts
TAG_BYTES = 16  # ChaCha20-Poly1305's tag, at the end of the body


def is_sealed(start: bytes) -> bool:
    return start.startswith(MAGIC)


def _kek(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = KEK_INFO + ephemeral + recipient
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def seal(plain: bytes, recipients: Mapping[str, bytes]) -> bytes:
    """The sealed form of `plain` for {party: raw X25519 public key}."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    if not recipients:
        raise ValueError("a sealed file needs at least one recipient")
    if len(plain) > MAX_PLAIN:
        raise ArtifactError(f"a file of {len(plain):,} bytes is too large to seal (at most {MAX_PLAIN:,})")
    file_key = ChaCha20Poly1305.generate_key()
    entries = []
    for party, public in sorted(recipients.items()):
        ephemeral = X25519PrivateKey.generate()
        ephemeral_public = ephemeral.public_key().public_bytes_raw()
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(public))
        wrapped = ChaCha20Poly1305(_kek(shared, ephemeral_public, public)).encrypt(
            bytes(12), file_key, party.encode()
        )
        entries.append(
            {
                "party": party,
                "key": "sha256:" + hashlib.sha256(public).hexdigest(),
                "ephemeral": base64.b64encode(ephemeral_public).decode("ascii"),
                "wrapped": base64.b64encode(wrapped).decode("ascii"),
            }
        )
    nonce = os.urandom(12)
    header = json.dumps(
        {
            "recipients": entries,
            "nonce": base64.b64encode(nonce).decode("ascii"),
            "length": len(plain) + TAG_BYTES,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    prefix = MAGIC + len(header).to_bytes(4, "little") + header
    return prefix + ChaCha20Poly1305(file_key).encrypt(nonce, plain, prefix)


def _cut_short(where: str, detail: str) -> ArtifactError:
    """A sealed file cut short, wherever the cut: exit 3, as any truncated file (docs/cli.md)."""
    return ArtifactError(f"{where}: a sealed file cut short ({detail}); truncated copy?")


def recipients_of(
    data: bytes, where: str, size: int | None = None
) -> tuple[list[dict[str, Any]], bytes, bytes]:
    """(the recipient entries, the nonce, the authenticated prefix) of a sealed file, whose first
    bytes are `data` and whose whole size is `size` (len(data) when None). TrustError when the
    header does not parse (changed or damaged); ArtifactError when it is not sealed or is cut short
    (in its header, or in its body when the header records the body's length)."""
    size = len(data) if size is None else size
    if not is_sealed(data):
        if data and MAGIC.startswith(data[: len(MAGIC)]):
            raise _cut_short(where, f"{size:,} bytes, within its first line")
        raise ArtifactError(f"{where}: not a sealed fedsrd file")
    length = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "little")
    end = len(MAGIC) + 4 + length
    if len(data) < len(MAGIC) + 4 or length > MAX_HEADER or end > len(data):
        raise _cut_short(where, f"{size:,} bytes: its header runs past its end")
    try:
        header = json.loads(data[len(MAGIC) + 4 : end])
        entries = list(header["recipients"])
        nonce = base64.b64decode(header["nonce"], validate=True)
        body = header.get("length")  # absent in files sealed before it was recorded
        if body is not None and (not isinstance(body, int) or isinstance(body, bool) or body < TAG_BYTES):
            raise TypeError("length")
        for entry in entries:
            for field in ("party", "key", "ephemeral", "wrapped"):
                if not isinstance(entry[field], str):
                    raise TypeError(field)
    except (ValueError, KeyError, TypeError, AttributeError):
        # The header is authenticated with the body (it is the AEAD's associated data), so a header
        # that no longer parses was changed after sealing, exactly like one that parses but fails
        # the tag: one refusal for both, whichever byte the damage hit.
        raise TrustError(
            f"{where}: cannot be opened: its header was changed after sealing, or is damaged"
        ) from None
    if body is not None and size - end < body:
        raise _cut_short(where, f"{size - end:,} of its {body:,} bytes after the header")
    return entries, nonce, data[:end]


def open_sealed(data: bytes, key: AgreementKey, where: str) -> bytes:
    """The plain file inside a sealed one, opened with this party's agreement key. TrustError when
    it is not sealed for this key, or was changed after sealing."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    entries, nonce, prefix = recipients_of(data, where)  # a copy cut short: ArtifactError
    mine = "sha256:" + hashlib.sha256(key.public).hexdigest()
    entry = next((e for e in entries if e["party"] == key.party and e["key"] == mine), None)
    if entry is None:
        named = ", ".join(e["party"] for e in entries) or "nobody"
        raise TrustError(f"{where}: is sealed for {named}, not for this key of {key.party!r}")
    try:
        ephemeral = base64.b64decode(entry["ephemeral"], validate=True)
        wrapped = base64.b64decode(entry["wrapped"], validate=True)
        shared = key.private.exchange(X25519PublicKey.from_public_bytes(ephemeral))
        file_key = ChaCha20Poly1305(_kek(shared, ephemeral, key.public)).decrypt(
            bytes(12), wrapped, key.party.encode()
        )
        return ChaCha20Poly1305(file_key).decrypt(nonce, data[len(prefix) :], prefix)
    except (InvalidTag, ValueError):
        raise TrustError(f"{where}: cannot be opened: it was changed after sealing, or is damaged") from None


@dataclass(frozen=True)
class Sealer:
    """The `seal=` argument of artifacts.write_artifact: file parts -> [the sealed bytes]; it keeps
    its recipients' names, so the command can say whom the file it wrote is sealed for."""

    recipients: Mapping[str, bytes]

    @property
    def parties(self) -> list[str]:
        return sorted(self.recipients)

    def __call__(self, parts: list[Any]) -> list[Any]:
        return [seal(b"".join(bytes(p) for p in parts), self.recipients)]


def sealer(recipients: Mapping[str, bytes]) -> Sealer:
    return Sealer(dict(recipients))
