"""The tensor layout each kind of artifact requires: names, shapes and dtypes, no data read.

`check_layout(header, shapes, dtypes, where)` runs before any tensor is read and before any
file is written (docs/format.md, "Tensor names" and the sections after it):

    state          lora_A (r, d_in) and lora_B (d_out, r) of every module, float
    upload         per layout entry X: X.values, dense (the layout's shape) or sparse (1-D)
                   with either X.mask (a bitmap) or X.positions (coded positions); with
                   info.value_dtype int8 / int4, 1-D codes with their X.scales instead
    broadcast      per layout entry X: 1-D X.values, float, or int8 / packed-int4 codes with
                   their X.scales (`Header.quantized_dtype`, `stored_value_count`)
    masked_upload  X.masked for the lora_B factor X of every module, int32 (d_out, r); from
                   version 5 int16 or int32, 1-D (kept,) below density 1, and with
                   info.secure.spread the 1-D update_spread.masked in the same words
    aggregate      the left and right factors of every module, which multiply

What needs the data (the content hash, a mask's count, the codes' decoding) is checked by
Artifact.verify in artifacts.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedsrd_cli.errors import ArtifactError, a_or_an
from fedsrd_cli.files import naming
from fedsrd_cli.files.header import Header
from fedsrd_cli.files.safetensors_io import DTYPE_NAMES
from fedsrd_cli.math.quantize import BLOCK, block_count

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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
        # Version 5 (a version-2 roster's density and word width): int16 or int32; 1-D (kept,)
        # at the round's public positions when the density is below 1 (their count is checked
        # against the global state, algorithms.secure.check_masked_upload).
        secure = header.info.get("secure", {}) if isinstance(header.info, dict) else {}
        bits, density = secure.get("word_bits", 32), secure.get("density", 1.0)
        dtype = {16: torch.int16, 32: torch.int32}.get(bits) if isinstance(bits, int) else None
        if dtype is None or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ArtifactError(f"{where}: a masked upload of word width {bits} and density {density}")
        for name, shape in shapes.items():
            if name == naming.MASKED_SPREAD and secure.get("spread") is True:
                # the limbs of the site's masked squared update norm (their count: check_masked_upload)
                if dtypes[name] != dtype or len(shape) != 1:
                    raise ArtifactError(f"{where}: {name} should be {dtype} of shape (limbs,)")
                continue
            parsed = naming.parse_factor_key(name.removesuffix(naming.MASKED))
            if not name.endswith(naming.MASKED) or parsed is None or parsed[1] != "B":
                raise ArtifactError(f"{where}: unexpected tensor {name!r} in a masked upload")
            want = f"(d_out, {rank})" if density == 1 else "(kept,)"
            fits = len(shape) == 2 and shape[1] == rank if density == 1 else len(shape) == 1
            if dtypes[name] != dtype or not fits:
                raise ArtifactError(
                    f"{where}: {name} should be {dtype} of shape {want}, not {dtypes[name]} {list(shape)}"
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
    quantized = header.quantized_dtype()  # "int8", "int4" or None, for every entry alike
    for name, logical in header.layout.items():
        if naming.parse_factor_key(name) is None:
            raise ArtifactError(f"{where}: layout names {name!r}, not a LoRA factor")
        values_name = naming.values_key(name)
        mask_name = naming.mask_key(name)
        expected.add(values_name)
        if values_name not in shapes:
            raise ArtifactError(f"{where}: {values_name} is missing")
        if quantized is not None:
            _check_quantized_layout(header.kind, name, quantized, shapes, dtypes, where)
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
                        f" {DTYPE_NAMES.get(dtypes[positions_name], dtypes[positions_name])}"
                        f" {list(shapes[positions_name])}"
                    )
            if len(values_shape) != 1 or values_shape[0] > stored_value_count(quantized, numel)[0]:
                raise ArtifactError(f"{where}: {values_name} has shape {list(values_shape)}")
        elif header.kind == "upload" and quantized is not None:
            codes = stored_value_count(quantized, numel)[0]
            if list(values_shape) != [codes]:
                raise ArtifactError(
                    f"{where}: dense {values_name} of {a_or_an(quantized)} upload should hold {codes}"
                    f" codes for shape {logical}, not {list(values_shape)}"
                )
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


def _check_quantized_layout(
    kind: str,
    name: str,
    value_dtype: str,
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype],
    where: str,
) -> None:
    """A quantized tensor: X.values int8 (int8) or uint8 (packed int4) and X.scales float32,
    both 1-D. An upload's scale count is checked here: b code bytes of int4 hold 2b - 1 or 2b
    values, which fill the same ceil(2b / BLOCK) blocks. The code count against the kept count
    (an upload's mask, a broadcast's seeded mask) is checked by Artifact.verify."""
    values_name, scales_name = naming.values_key(name), naming.scales_key(name)
    code_dtype = torch.int8 if value_dtype == "int8" else torch.uint8
    if dtypes[values_name] != code_dtype or len(shapes[values_name]) != 1:
        raise ArtifactError(
            f"{where}: {values_name} of {a_or_an(value_dtype)} {kind} should be 1-D"
            f" {DTYPE_NAMES[code_dtype]}, not {DTYPE_NAMES.get(dtypes[values_name], dtypes[values_name])}"
            f" {list(shapes[values_name])}"
        )
    if scales_name not in shapes:
        raise ArtifactError(f"{where}: {scales_name} is missing ({value_dtype} values need their scales)")
    if dtypes[scales_name] != torch.float32 or len(shapes[scales_name]) != 1:
        raise ArtifactError(
            f"{where}: {scales_name} should be 1-D F32, not"
            f" {DTYPE_NAMES.get(dtypes[scales_name], dtypes[scales_name])} {list(shapes[scales_name])}"
        )
    if kind == "upload":
        codes = shapes[values_name][0]
        blocks = block_count(codes * (2 if value_dtype == "int4" else 1))
        if shapes[scales_name][0] != blocks:
            raise ArtifactError(
                f"{where}: {scales_name} should hold {blocks} scales (one per {BLOCK} values of"
                f" {values_name}), not {shapes[scales_name][0]}"
            )


def stored_value_count(value_dtype: str | None, kept: int) -> tuple[int, int | None]:
    """(X.values length, X.scales length or None) that an upload or broadcast keeping `kept`
    elements stores."""
    if value_dtype == "int4":
        return math.ceil(kept / 2), block_count(kept)
    if value_dtype == "int8":
        return kept, block_count(kept)
    return kept, None
