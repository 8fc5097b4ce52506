"""fedsrd artifacts inside Flower Messages: the safetensors file's bytes, unchanged.

An artifact travels as an ArrayRecord holding one Array whose `data` is the whole file (header,
metadata, signature and tensors, byte for byte), marked with stype `fedsrd.safetensors`. It is
not a dense tensor: Flower only carries it, so the receiver gets exactly the file the sender
wrote: same content hash, same lineage, same signature. An ArrayRecord, not a bytes value of a
ConfigRecord, because Flower splits Arrays into chunks for transport, so a large upload or
state (a 3B model's LoRA) does not have to fit in one gRPC/HTTP message.

Message content, key by key (every key optional except where a step needs it):

    "fedsrd"    ConfigRecord: the instruction or the answer (round, hashes, flags, client id)
    "state"     the global state file, for a node that does not hold it
    "upload"    the client's upload file (train reply)
    "broadcast" the coordinator's broadcast file (apply instruction)
    "metrics"   MetricRecord: train loss, sample count, eval loss, bytes
"""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsrd_cli.errors import ArtifactError

STYPE = "fedsrd.safetensors"
FILE_KEY = "file"
CONFIG = "fedsrd"
METRICS = "metrics"
STATE, UPLOAD, BROADCAST = "state", "upload", "broadcast"

# Message types (category.action, as ClientApp routes them)
QUERY_STATE = "query.fedsrd_state"
EVALUATE = "evaluate"
TRAIN = "train"
APPLY = "train.fedsrd_apply"
REMASK = "train.fedsrd_remask"  # a secure round's re-issued roster: mask the same local state again


def artifact_record(data: bytes) -> ArrayRecord:
    """An ArrayRecord carrying one artifact file's bytes as they are."""
    array = Array(dtype="u8", shape=(len(data),), stype=STYPE, data=bytes(data))
    return ArrayRecord({FILE_KEY: array})


def artifact_bytes(content: RecordDict, key: str) -> bytes | None:
    """The artifact file under `key` of a message's content, or None if the message carries none."""
    if key not in content.array_records:
        return None
    record = content.array_records[key]
    array = record.get(FILE_KEY)
    if array is None or array.stype != STYPE:
        raise ArtifactError(
            f"message record {key!r}: not a fedsrd artifact (stype {getattr(array, 'stype', None)})"
        )
    data = bytes(array.data)
    if tuple(array.shape) != (len(data),):
        raise ArtifactError(
            f"message record {key!r}: declares {list(array.shape)} bytes, carries {len(data)}"
        )
    return data


def content(
    config: dict[str, Any] | None = None,
    metrics: dict[str, float | int] | None = None,
    **artifacts: bytes | None,
) -> RecordDict:
    """A message's content: the ConfigRecord, the MetricRecord and the artifact files given."""
    records: dict[str, Any] = {}
    if config is not None:
        records[CONFIG] = ConfigRecord(config)
    if metrics:
        records[METRICS] = MetricRecord(metrics)
    for key, data in artifacts.items():
        if data is not None:
            records[key] = artifact_record(data)
    return RecordDict(records)


def config_of(content_: RecordDict) -> dict[str, Any]:
    if CONFIG not in content_.config_records:
        raise ArtifactError("message without its fedsrd instructions (config record 'fedsrd')")
    return dict(content_.config_records[CONFIG])


def metrics_of(content_: RecordDict) -> dict[str, Any]:
    return dict(content_.metric_records[METRICS]) if METRICS in content_.metric_records else {}
