"""What fedsrd needs to know about a base model without loading its weights.

A base is either a directory saved by `save_pretrained` or one GGUF file (llama.cpp's
format); `resolve_base` is the one place that decides which, and every command goes
through it. `fingerprint_base` identifies a base: a directory by its config.json
(`base_fingerprint`), a GGUF file by the sha256 of its bytes. `lora_module_shapes`
builds the model on the meta device (no memory, no weights) and lets PEFT choose the
adapted modules, so names and shapes are exactly PEFT's. transformers and peft are
imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedsrd_cli.config import LoraSpec
from fedsrd_cli.errors import DataError, UsageError

_FINGERPRINT_SKIP_SUFFIX = "_token_id"
GGUF_MAGIC = b"GGUF"  # the first 4 bytes of every GGUF file
_HASH_CHUNK = 1 << 20
_EXPECTED = "expected a model directory saved by save_pretrained, or a .gguf file"


@dataclass(frozen=True)
class BaseSource:
    """A base model on disk: a save_pretrained directory, or one GGUF file."""

    path: Path
    is_gguf: bool

    @property
    def folder(self) -> str:
        """What transformers' from_pretrained takes as the model: the directory, or the GGUF's folder."""
        return str(self.path.parent if self.is_gguf else self.path)

    def pretrained_kwargs(self) -> dict[str, Any]:
        """Extra from_pretrained arguments: the GGUF file as an absolute path, so that transformers
        never picks a file of the same name from the working directory."""
        return {"gguf_file": str(self.path.resolve())} if self.is_gguf else {}

    def fingerprint(self) -> str:
        """A directory: `base_fingerprint` of its config.json; a GGUF file: "sha256:" + its bytes' sha256."""
        if self.is_gguf:
            return "sha256:" + file_sha256(self.path)
        return base_fingerprint(read_model_config(self.path))


def resolve_base(path: str | Path) -> BaseSource:
    """The base model at `path`; DataError (one line) for a path that is neither kind."""
    path = Path(path)
    if path.is_dir():
        read_model_config(path)  # its own messages: no config.json, unreadable config
        return BaseSource(path, is_gguf=False)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory ({_EXPECTED})")
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as err:
        raise DataError(f"{path}: unreadable ({err.strerror or err})") from None
    if magic != GGUF_MAGIC:
        raise DataError(f"{path}: not a model directory or a GGUF file ({_EXPECTED})")
    return BaseSource(path, is_gguf=True)


def fingerprint_base(path: str | Path) -> str:
    """The fingerprint of the base model at `path` (see BaseSource.fingerprint)."""
    return resolve_base(path).fingerprint()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks.

    Remembered per (path, size, modification time, inode) for this process, so that a
    command that checks a multi-GB GGUF base and then loads it reads it for hashing once.
    """
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError as err:
        raise DataError(f"{path}: unreadable ({err.strerror or err})") from None
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@lru_cache(maxsize=16)
def _sha256_of(path: str, _size: int, _mtime_ns: int, _inode: int) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as err:
        raise DataError(f"{path}: unreadable ({err.strerror or err})") from None
    return digest.hexdigest()


def read_model_config(model_dir: str | Path) -> dict:
    """config.json of a local model directory, as a dict (DataError if absent or unreadable)."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise DataError(f"{model_dir}: not a directory (expected a local transformers model)")
    if not path.exists():
        raise DataError(f"{model_dir}: no config.json (expected a model saved by save_pretrained)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable model config ({err})") from None


def base_fingerprint(config: dict) -> str:
    """sha256 of the architecture: model_type plus every integer field except token ids.

    fingerprint = "sha256:" + sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")))
    It tells architectures and sizes apart (Llama-3.2-1B vs 3B, Qwen vs Llama), not two
    checkpoints of one architecture.
    """
    fields: dict[str, object] = {"model_type": config.get("model_type", "")}
    for key, value in config.items():
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if is_int and not key.endswith(_FINGERPRINT_SKIP_SUFFIX) and not key.startswith("_"):
            fields[key] = value
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def parse_targets(targets: str) -> list[str] | str:
    """--targets: "all-linear" or a comma-separated list of module names."""
    if targets.strip() == "all-linear":
        return "all-linear"
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise UsageError("--targets names no module")
    return names


def lora_module_shapes(
    model_dir: str | Path, targets: str, rank: int, alpha: float
) -> tuple[LoraSpec, dict[str, tuple[int, int]]]:
    """PEFT's adapted modules of a local model: (LoRA spec with expanded targets, {module: (d_out, d_in)}).

    Module names are PEFT's state-dict prefixes (base_model.model.<path>). `model_dir` may
    also be a GGUF file: only its metadata is read (no tensor is dequantized). UsageError
    (exit 2): a target the model has no module of (naming its linear modules), a module
    PEFT cannot adapt, or a rank above min(d_in, d_out) of a targeted module.
    """
    source = resolve_base(model_dir)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        extra = source.pretrained_kwargs()
        config = AutoConfig.from_pretrained(source.folder, local_files_only=True, **extra)
    except Exception as err:  # transformers raises many types for a bad directory or file
        raise DataError(f"{model_dir}: transformers cannot read this model config ({err})") from None
    wanted = parse_targets(targets)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
        if isinstance(wanted, list):
            _check_targets_exist(model, wanted, model_dir)
        try:
            peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=wanted))
        except ValueError as err:
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise UsageError(f"--targets {targets}: PEFT cannot adapt these modules ({first})") from None
    shapes: dict[str, tuple[int, int]] = {}
    for name, param in peft_model.named_parameters():
        if name.endswith(".lora_A.default.weight"):
            module = name.removesuffix(".lora_A.default.weight")
            b_param = peft_model.get_parameter(module + ".lora_B.default.weight")
            shapes[module] = (int(b_param.shape[0]), int(param.shape[1]))
    if not shapes:
        raise UsageError(f"--targets {targets}: no module of {model_dir} matches")
    _check_rank_fits(rank, shapes)
    leaf_names = tuple(sorted({module.rsplit(".", 1)[-1] for module in shapes}))
    return LoraSpec(rank, alpha, leaf_names), shapes


def linear_module_names(model: Any) -> list[str]:
    """The leaf names of a model's linear layers (what --targets usually lists), lm_head aside."""
    found = set()
    for name, module in model.named_modules():
        if type(module).__name__ in ("Linear", "Conv1D") and name and name.rsplit(".", 1)[-1] != "lm_head":
            found.add(name.rsplit(".", 1)[-1])
    return sorted(found)


def _check_targets_exist(model: Any, targets: list[str], model_dir: str | Path) -> None:
    """Every --targets name must be the name, or the last dotted part(s), of some module."""
    names = [name for name, _ in model.named_modules() if name]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            linear = ", ".join(linear_module_names(model)) or "none"
            raise UsageError(
                f"--targets {target}: {model_dir} has no module named {target!r}; its linear modules"
                f" are {linear} (or give --targets all-linear)"
            )


def _check_rank_fits(rank: int, shapes: dict[str, tuple[int, int]]) -> None:
    """A rank above min(d_in, d_out) adds parameters but no expressiveness: refuse it."""
    module, (d_out, d_in) = min(shapes.items(), key=lambda item: min(item[1]))
    if rank > min(d_out, d_in):
        raise UsageError(
            f"--rank {rank} is above min(d_in, d_out) = {min(d_out, d_in)} of the targeted module"
            f" {module} ({d_out}x{d_in}); use --rank {min(d_out, d_in)} or less"
        )
