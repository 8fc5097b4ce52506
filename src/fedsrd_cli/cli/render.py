"""Result views several commands share, printed through output.Output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsrd_cli.output import Output, human_bytes, key_value_table


def written(
    out: Output, path: Path, header: Any, extra: dict[str, Any] | None = None, sealed_for: Any = None
) -> None:
    """The result of a command that wrote one artifact: path, kind, round, size, hashes, `extra`.

    sealed_for: the Sealer (trust/sealed.py) the file was written through, if any: the "wrote" line says
    "sealed for NAME, ..." (--json: `sealed_for`), as the file itself shows nothing else.
    """
    from fedsrd_cli.files.safetensors_io import short

    size = path.stat().st_size
    data = {
        "path": str(path),
        "kind": header.kind,
        "round": header.round,
        "content_hash": header.content_hash,
        "parent_hash": header.parent_hash or None,
        "bytes": size,
        **({"sealed_for": sealed_for.parties} if sealed_for is not None else {}),
        **(extra or {}),
    }
    kind = header.kind
    if kind == "state" and (header.client_id or header.num_samples):
        kind = "local state"  # train-local's: it keeps the round of the state it was trained from
    sealed = f"; sealed for {', '.join(sealed_for.parties)}" if sealed_for is not None else ""
    rows = [
        ("wrote", f"{path} ({kind}, round {header.round}, {human_bytes(size)}{sealed})"),
        ("hash", short(header.content_hash)),
    ]
    if header.parent_hash:
        rows.append(("parent", short(header.parent_hash)))
    rows += [(k, shown(v)) for k, v in (extra or {}).items() if not isinstance(v, (dict, list))]
    out.result(data, key_value_table(rows))


def shown(value: Any) -> str:
    """A value as a person reads it (--json keeps it whole): 4 significant digits of a float,
    12 hex digits of a content hash."""
    from fedsrd_cli.files.safetensors_io import HASH_PREFIX, short

    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and value.startswith(HASH_PREFIX):
        return short(value)
    return str(value)


def worst(values: dict[str, float]) -> str:
    """The largest value and its key, as "0.9731 (key)"."""
    key = max(values, key=values.__getitem__)
    return f"{values[key]:.4g} ({key})"
