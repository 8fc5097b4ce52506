"""Ed25519 signatures of artifacts: keys, signing, and the trust checks of each party.

A party NAME (a client id, or `coordinator`) holds `NAME.key` (private, mode 0600)
and hands out `NAME.pub`. A trust directory holds the `NAME.pub` files of the
parties one accepts files from. The signature lives in the file's own safetensors
metadata (docs/format.md, "Signatures"):

    fedsrd.signer      NAME
    fedsrd.signer_key  "sha256:" + hex(sha256(raw 32-byte public key))
    fedsrd.signature   base64(Ed25519 signature of MESSAGE)

    MESSAGE = b"fedsrd-signature-v1\\n" + sha256(U)
    U       = the canonical file bytes with those three keys left out of the metadata
              (8-byte length, canonical header, unchanged tensor data)

The tensor data and its offsets do not depend on the metadata, so a verifier
rebuilds U from the file by re-encoding its header without the three keys. The
content hash covers tensors only, so signing never changes it. `cryptography` is
imported only inside the functions that sign or verify.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsrd_cli.errors import ArtifactError, OutputError, OutputExistsError, TrustError, UsageError
from fedsrd_cli.files.artifacts import Artifact, Header, read_artifact, write_artifact
from fedsrd_cli.files.atomic import FileWrite, check_output_folder, ensure_writable, write_files_atomic
from fedsrd_cli.files.safetensors_io import check_safetensors_start, encode_header

COORDINATOR = "coordinator"
SIGNER_KEY = "fedsrd.signer"
SIGNER_KEY_ID = "fedsrd.signer_key"
SIGNATURE_KEY = "fedsrd.signature"
SIGNATURE_FIELDS = (SIGNER_KEY, SIGNER_KEY_ID, SIGNATURE_KEY)
MESSAGE_PREFIX = b"fedsrd-signature-v1\n"
PARTY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 2**20


def check_party_name(name: str, what: str) -> str:
    if not PARTY_RE.match(name):
        raise UsageError(
            f"{what} {name!r}: a party name uses 1-128 letters, digits, '.', '_' or '-', starting"
            " with a letter or digit"
        )
    return name


def key_id(raw_public: bytes) -> str:
    """The fingerprint recorded in `fedsrd.signer_key`: sha256 of the raw 32-byte public key."""
    return "sha256:" + hashlib.sha256(raw_public).hexdigest()


def signed_message(unsigned_digest: bytes) -> bytes:
    """MESSAGE = b"fedsrd-signature-v1\\n" + sha256(unsigned canonical file bytes)."""
    return MESSAGE_PREFIX + unsigned_digest


# --------------------------------------------------------------------------- keys


def _raw_public(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_keypair(out: str | os.PathLike, force: bool = False) -> tuple[Path, Path, str]:
    """Write OUT.key (PKCS#8 PEM, mode 0600) and OUT.pub (SubjectPublicKeyInfo PEM), both or neither.

    The party name is the last path component of OUT. A missing folder of OUT is created
    with mode 0700 (keys are private), and removed again if the keys cannot be written.
    Returns (key path, pub path, key id).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out)
    if out.is_dir():
        raise UsageError(
            f"--out {out}: is a directory; give --out {out / 'NAME'} (NAME: the party's id, e.g. site-a)"
        )
    check_party_name(out.name, "--out")
    key_path, pub_path = out.with_name(out.name + ".key"), out.with_name(out.name + ".pub")
    for path in (key_path, pub_path):
        if path.exists() and not force:
            raise OutputExistsError(f"{path}: already exists (pass --force to replace it)")
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    created = _make_key_folder(out.parent)
    try:
        write_files_atomic(
            [FileWrite(key_path, private_pem, mode=0o600), FileWrite(pub_path, public_pem)], force
        )
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return key_path, pub_path, key_id(_raw_public(private.public_key()))


def _make_key_folder(folder: Path) -> Path | None:
    """Create `folder` (and missing parents) with mode 0700; returns the topmost folder created."""
    if folder.is_dir():
        return None
    if folder.exists():
        raise OutputError(f"{folder}: is not a directory, so no key can be written inside it")
    top = folder
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    check_output_folder(top.parent)
    try:
        folder.mkdir(mode=0o700, parents=True)
        folder.chmod(0o700)  # mkdir's mode is reduced by the umask
    except OSError as err:
        raise OutputError(f"{folder}: cannot create the key folder ({err.strerror or err})") from None
    return top


@dataclass(frozen=True)
class SigningKey:
    """A party's private key, loaded from NAME.key; `name` is the party it signs as."""

    name: str
    private: Any
    key_id: str

    @classmethod
    def load(cls, path: str | os.PathLike) -> SigningKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        path = Path(path)
        if path.suffix != ".key":
            raise UsageError(f"--sign-key {path}: expected a NAME.key file written by `fedsrd keygen`")
        name = check_party_name(path.stem, "--sign-key")
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:  # a flag that names no file: a usage error, like --trust's
            raise UsageError(f"--sign-key {path}: no such key file (make one with `fedsrd keygen`)") from None
        except (OSError, ValueError, TypeError) as err:
            raise TrustError(f"{path}: not a readable unencrypted PEM private key ({err})") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise TrustError(f"{path}: not an Ed25519 key (fedsrd signs with Ed25519)")
        return cls(name, private, key_id(_raw_public(private.public_key())))

    def sign_parts(self, parts: list[Any]) -> list[Any]:
        """Signed file parts from the canonical unsigned parts of `artifacts.serialize`."""
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        signature = self.private.sign(signed_message(digest.digest()))
        entries = json.loads(bytes(parts[1]))
        meta = entries.setdefault("__metadata__", {})
        meta[SIGNER_KEY] = self.name
        meta[SIGNER_KEY_ID] = self.key_id
        meta[SIGNATURE_KEY] = base64.b64encode(signature).decode("ascii")
        text = encode_header(entries)
        return [len(text).to_bytes(8, "little"), text, *parts[2:]]


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class FileSignature:
    """What a file says about its signature (before any check)."""

    signer: str
    key_id: str
    signature: bytes
    unsigned_digest: bytes


def read_signature(path: str | os.PathLike) -> FileSignature | None:
    """The signature fields of a file and the digest of its unsigned form; None if unsigned.

    Raises ArtifactError for a file whose safetensors header cannot be read and
    TrustError for one that is not in canonical form or has malformed signature fields.
    """
    path = Path(path)
    length = check_safetensors_start(path)
    try:
        handle = path.open("rb")
    except OSError as err:
        raise ArtifactError(f"{path}: cannot open ({err.strerror or err})") from None
    with handle:
        handle.seek(8)
        text = handle.read(length)
        try:
            entries = json.loads(text)
            meta = entries.get("__metadata__") or {}
            if not isinstance(meta, dict):
                raise ValueError("metadata is not an object")
        except (ValueError, AttributeError, RecursionError) as err:
            raise ArtifactError(f"{path}: unreadable safetensors header ({type(err).__name__})") from None
        if not any(field in meta for field in SIGNATURE_FIELDS):
            return None
        if encode_header(entries) != text:
            raise TrustError(
                f"{path}: its header is not in fedsrd's canonical form, so its signature cannot be"
                " checked (rewritten by another tool?)"
            )
        try:
            signer, found_id = str(meta.pop(SIGNER_KEY)), str(meta.pop(SIGNER_KEY_ID))
            signature = base64.b64decode(str(meta.pop(SIGNATURE_KEY)), validate=True)
        except (KeyError, ValueError) as err:
            raise TrustError(f"{path}: malformed signature fields ({type(err).__name__}: {err})") from None
        unsigned = encode_header(entries)
        digest = hashlib.sha256()
        digest.update(len(unsigned).to_bytes(8, "little"))
        digest.update(unsigned)
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return FileSignature(signer, found_id, signature, digest.digest())


@dataclass(frozen=True)
class Trust:
    """The public keys of the known parties: {NAME: raw 32-byte Ed25519 key} from DIR/NAME.pub."""

    directory: Path
    keys: dict[str, bytes]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Trust:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        directory = Path(directory)
        if not directory.is_dir():
            raise UsageError(f"--trust {directory}: not a directory of NAME.pub files")
        keys: dict[str, bytes] = {}
        for pub in sorted(directory.glob("*.pub")):
            name = check_party_name(pub.stem, f"trusted key {pub}:")
            try:
                public = serialization.load_pem_public_key(pub.read_bytes())
            except (OSError, ValueError) as err:
                raise TrustError(f"{pub}: not a readable PEM public key ({err})") from None
            if not isinstance(public, Ed25519PublicKey):
                raise TrustError(f"{pub}: not an Ed25519 public key")
            keys[name] = _raw_public(public)
        if not keys:
            raise UsageError(f"--trust {directory}: holds no NAME.pub files")
        return cls(directory, keys)

    def verify_file(self, path: str | os.PathLike) -> str:
        """Check the file's signature against the trusted keys; returns the signer's name.

        TrustError, each with its own message: unsigned; not canonical; unknown signer;
        a key that is not the trusted key of the name it claims (forged); a signature
        that does not verify (modified after signing).
        """
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        found = read_signature(path)
        if found is None:
            raise TrustError(
                f"{path}: is not signed, and --trust {self.directory} accepts only signed files"
                " (the sender must pass --sign-key)"
            )
        if found.signer not in self.keys:
            raise TrustError(
                f"{path}: signed by unknown party {found.signer!r}"
                f" (no {found.signer}.pub in {self.directory})"
            )
        raw = self.keys[found.signer]
        if found.key_id != key_id(raw):
            raise TrustError(
                f"{path}: claims to be signed by {found.signer!r} but with another key"
                f" ({found.key_id.removeprefix('sha256:')[:12]}, trusted"
                f" {key_id(raw).removeprefix('sha256:')[:12]}): forged, or {found.signer} changed keys"
            )
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(
                found.signature, signed_message(found.unsigned_digest)
            )
        except InvalidSignature:
            raise TrustError(
                f"{path}: the signature of {found.signer!r} does not verify: the file was modified after"
                " signing (tampered or corrupt copy)"
            ) from None
        return found.signer


def read_verified(
    path: str | os.PathLike,
    kind: str | None,
    trust: Trust | None,
    accept: Collection[str] | None = None,
) -> Artifact:
    """read_artifact, after checking the signature when `trust` is given.

    Uploads must be signed by the client they name (signer == header.client_id);
    every other kind by one of `accept` (default: the coordinator).
    """
    if trust is None:
        return read_artifact(path, kind=kind)
    signer = trust.verify_file(path)
    artifact = read_artifact(path, kind=kind)
    check_signer(artifact, signer, accept)
    return artifact


def check_signer(artifact: Artifact, signer: str, accept: Collection[str] | None = None) -> None:
    head = artifact.header
    if head.kind in ("upload", "masked_upload"):
        if signer != head.client_id:
            raise TrustError(
                f"{artifact.path}: upload of client {head.client_id!r} is signed by {signer!r}; a"
                " client may sign only its own uploads"
            )
        return
    allowed = tuple(accept) if accept else (COORDINATOR,)
    if signer not in allowed:
        raise TrustError(
            f"{artifact.path}: {head.kind} signed by {signer!r}, but only {_names(allowed)} may sign it"
        )


def describe_signature(path: str | os.PathLike, verified: bool) -> dict[str, Any] | None:
    """{"signer", "key_id", "verified"} of a file, None when unsigned (for inspect)."""
    found = read_signature(path)
    if found is None:
        return None
    return {"signer": found.signer, "key_id": found.key_id, "verified": verified}


@dataclass(frozen=True)
class SignedFile:
    """What `sign_file` did: the file written, its header, and the signature it replaced."""

    path: Path
    header: Header
    replaced: str | None  # the earlier signer, when the file was signed by someone else


def sign_file(
    path: str | os.PathLike, key: SigningKey, out: str | os.PathLike | None = None, force: bool = False
) -> SignedFile:
    """Sign an existing artifact as `key`'s party: in place (atomically) or into `out`.

    The artifact is read and validated first, then written again canonically with the
    signature (the tensors and the content hash do not change). Refused: an upload signed
    by anyone but the client it names (UsageError); a file already signed by another party,
    or by this party with another key, unless `force` (TrustError); an existing `out`
    without `force` (OutputExistsError). Signing a file again with the same key rewrites
    the same bytes.
    """
    path = Path(path)
    target = path if out is None else Path(out)
    in_place = target == path or (target.exists() and path.exists() and target.samefile(path))
    if not in_place:
        ensure_writable(target, force)
    artifact = read_artifact(path)
    head = artifact.header
    if head.kind in ("upload", "masked_upload") and key.name != head.client_id:
        raise UsageError(
            f"{path}: is the upload of client {head.client_id!r}; --sign-key signs as {key.name!r}, and an"
            " upload is accepted only when signed by the client it names"
        )
    found = _current_signature(path, force)
    replaced = None
    if found is not None and (found.signer, found.key_id) != (key.name, key.key_id):
        if not force:
            same = "another key of" if found.signer == key.name else "party"
            raise TrustError(
                f"{path}: is already signed by {same} {found.signer!r}"
                f" ({found.key_id.removeprefix('sha256:')[:12]}); pass --force to replace that"
                f" signature with one by {key.name!r}"
            )
        replaced = found.signer
    write_artifact(target, head, dict(artifact.iter_tensors()), force or in_place, sign=key.sign_parts)
    return SignedFile(target, head, replaced)


def _current_signature(path: Path, force: bool) -> FileSignature | None:
    """The file's signature; with force, a malformed one counts as none (it is replaced)."""
    if not force:
        return read_signature(path)
    try:
        return read_signature(path)
    except TrustError:
        return None


def _names(names: Iterable[str]) -> str:
    return " or ".join(repr(n) for n in names)


def load_signer_and_trust(
    sign_key: Path | None, trust_dir: Path | None
) -> tuple[SigningKey | None, Trust | None]:
    """The signing key and trust directory a party was given (each may be None): the CLI's
    --sign-key / --trust flags and Flower's node and run config use this one function."""
    signer = SigningKey.load(sign_key) if sign_key is not None else None
    trust = Trust.load(trust_dir) if trust_dir is not None else None
    return signer, trust
