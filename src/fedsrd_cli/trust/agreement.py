"""Key agreement for secure aggregation: each site's X25519 key, published under its signature.

A site NAME holds `NAME.agreement.key` (X25519 private key, PKCS#8 PEM, mode 0600) and
publishes `NAME.agreement` (JSON), which the other parties put in their trust directory
beside `NAME.pub`:

    {"kind": "fedsrd-agreement-key", "version": 1, "party": NAME,
     "public": base64(raw 32-byte X25519 public key),
     "signer_key": "sha256:" + hex(sha256(NAME's raw Ed25519 public key)),
     "signature": base64(Ed25519 signature of MESSAGE)}
    MESSAGE = b"fedsrd-agreement-v1\\n" + NAME + b"\\n" + raw X25519 public key

so a trusted `NAME.pub` vouches for it. Two sites i and j derive their pair's mask key for one
roster as

    k_ij = HKDF-SHA256(X25519(i, j), salt = none, length 32,
                       info = b"fedsrd-secure-mask-v1\\n" + roster hash + b"\\n" + lo + b"\\n" + hi)

with lo < hi the two names; the masks are the ChaCha20 keystream under k_ij
(privacy.randomness). A new roster (hash) gives fresh, independent masks.
`cryptography` is imported inside the functions.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsrd_cli.errors import OutputExistsError, TrustError, UsageError
from fedsrd_cli.files.atomic import FileWrite, write_files_atomic
from fedsrd_cli.trust.signing import SigningKey, Trust, check_party_name, key_id

KEY_SUFFIX = ".agreement.key"
PUBLIC_SUFFIX = ".agreement"
MESSAGE_PREFIX = b"fedsrd-agreement-v1\n"
MASK_INFO_PREFIX = b"fedsrd-secure-mask-v1\n"


def _message(party: str, raw: bytes) -> bytes:
    return MESSAGE_PREFIX + party.encode() + b"\n" + raw


def _raw(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_agreement_key(signer: SigningKey, folder: Path, force: bool = False) -> tuple[Path, Path]:
    """Write FOLDER/NAME.agreement.key and FOLDER/NAME.agreement (signed by `signer`, whose name
    is NAME), both or neither. Returns (private key path, published file path)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key_path = folder / (signer.name + KEY_SUFFIX)
    public_path = folder / (signer.name + PUBLIC_SUFFIX)
    for path in (key_path, public_path):
        if path.exists() and not force:
            raise OutputExistsError(f"{path}: already exists (pass --force to replace it)")
    private = X25519PrivateKey.generate()
    raw = _raw(private.public_key())
    published = {
        "kind": "fedsrd-agreement-key",
        "version": 1,
        "party": signer.name,
        "public": base64.b64encode(raw).decode("ascii"),
        "signer_key": signer.key_id,
        "signature": base64.b64encode(signer.private.sign(_message(signer.name, raw))).decode("ascii"),
    }
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    text = (json.dumps(published, indent=2, sort_keys=True) + "\n").encode()
    write_files_atomic([FileWrite(key_path, pem, mode=0o600), FileWrite(public_path, text)], force)
    return key_path, public_path


@dataclass(frozen=True)
class AgreementKey:
    """A site's X25519 private key (NAME.agreement.key) and the party it belongs to."""

    party: str
    private: Any

    @classmethod
    def load(cls, path: str | os.PathLike) -> AgreementKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        path = Path(path)
        if not path.name.endswith(KEY_SUFFIX):
            raise UsageError(
                f"--agreement-key {path}: expected a NAME{KEY_SUFFIX} file (`fedsrd agreement-key`)"
            )
        party = check_party_name(path.name.removesuffix(KEY_SUFFIX), "--agreement-key")
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise UsageError(
                f"--agreement-key {path}: no such key file (make one with `fedsrd agreement-key`)"
            ) from None
        except (OSError, ValueError, TypeError) as err:
            raise TrustError(f"{path}: not a readable unencrypted PEM private key ({err})") from None
        if not isinstance(private, X25519PrivateKey):
            raise TrustError(f"{path}: not an X25519 key (secure aggregation agrees keys with X25519)")
        return cls(party, private)

    @property
    def public(self) -> bytes:
        return _raw(self.private.public_key())

    def mask_key(self, other: str, other_public: bytes, roster_hash: str) -> bytes:
        """k_ij for this party and `other` under the roster `roster_hash` (module docstring)."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        shared = self.private.exchange(X25519PublicKey.from_public_bytes(other_public))
        low, high = sorted((self.party, other))
        info = MASK_INFO_PREFIX + roster_hash.encode() + b"\n" + low.encode() + b"\n" + high.encode()
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def published_key(trust: Trust, party: str) -> bytes:
    """The raw X25519 public key `party` published, checked against its trusted Ed25519 key."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = trust.directory / (party + PUBLIC_SUFFIX)
    if party not in trust.keys:
        raise TrustError(f"no {party}.pub in {trust.directory}: {party!r} is not a trusted party")
    try:
        data = json.loads(path.read_text())
        raw = base64.b64decode(data["public"], validate=True)
        signature = base64.b64decode(data["signature"], validate=True)
        claimed = (data["kind"], data["version"], data["party"], data["signer_key"])
    except FileNotFoundError:
        raise TrustError(
            f"no {path.name} in {trust.directory}: {party!r} has not published an agreement key"
            " (`fedsrd agreement-key`)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TrustError(f"{path}: not a readable agreement key file ({type(err).__name__}: {err})") from None
    if claimed[:3] != ("fedsrd-agreement-key", 1, party) or len(raw) != 32:
        raise TrustError(f"{path}: is not {party!r}'s agreement key")
    if claimed[3] != key_id(trust.keys[party]):
        raise TrustError(f"{path}: signed with another key than {party}.pub: forged, or {party} changed keys")
    try:
        Ed25519PublicKey.from_public_bytes(trust.keys[party]).verify(signature, _message(party, raw))
    except InvalidSignature:
        raise TrustError(f"{path}: its signature does not verify against {party}.pub (modified?)") from None
    return raw
