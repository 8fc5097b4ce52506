"""Coded positions against 1-bit bitmaps: bytes and seconds of a FedSRD upload on Llama-3.2-3B shapes.

    python benchmarks/coded_masks.py [--layers 1] [--repeat 28]

Builds `--layers` decoder layers of Llama-3.2-3B (hidden 3072, MLP 8192, 8 KV heads of 128,
r = 64 on all seven linear layers) with benchmarks/coordinator.py's synthetic global and
local states, makes one client's FedSRD upload at the defaults (Method.upload, which stores
each mask as X.positions or X.mask, whichever is shorter), and writes it twice: as written,
and with every mask as a bitmap (what fedsrd wrote before coded positions). It prints:

1. per upload, bytes on disk of both files, of the values and of the masks, and the paper's
   accounting, scaled from `--layers` to 28 layers (MB = 2^20 bytes);
2. seconds to encode (store_mask) and decode (read_positions_tensor; the dense deltas with
   upload_delta) the masks of a whole upload: each of the built layers' masks `--repeat`
   times / layers, so `--layers 1 --repeat 28` times 28 layers' worth of real masks, on
   one thread.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.coordinator import build_global, build_local  # noqa: E402
from fedsrd_cli.algorithms import get_algorithm  # noqa: E402
from fedsrd_cli.config import SparsifyConfig  # noqa: E402
from fedsrd_cli.files import naming  # noqa: E402
from fedsrd_cli.files.adapters import read_local  # noqa: E402
from fedsrd_cli.files.artifacts import read_artifact, write_artifact  # noqa: E402
from fedsrd_cli.files.describe import describe  # noqa: E402
from fedsrd_cli.math.masks import pack_bits, unpack_bits  # noqa: E402
from fedsrd_cli.math.positions import read_positions_tensor, store_mask  # noqa: E402

MB = 2**20
MODEL_LAYERS = 28


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=MODEL_LAYERS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    scale = MODEL_LAYERS / args.layers

    with tempfile.TemporaryDirectory(prefix="fedsrd-masks-") as tmp:
        work = Path(tmp)
        g0, local = work / "global.safetensors", work / "local.safetensors"
        build_global(g0, args.layers)
        build_local(g0, local, seed=100)
        state = read_artifact(g0, verify=False)
        payload = get_algorithm("fedsrd").upload(state, read_local(local), "client-0", 1000, SparsifyConfig())
        coded_path, bitmap_path = work / "upload.safetensors", work / "upload-bitmaps.safetensors"
        write_artifact(coded_path, payload.header, payload.tensors)
        upload = read_artifact(coded_path)
        masks = {name: upload.upload_kept(name) for name in upload.header.layout}
        bitmaps = {n: t for n, t in payload.tensors.items() if not n.endswith(naming.POSITIONS)}
        bitmaps.update({naming.mask_key(name): pack_bits(kept) for name, kept in masks.items()})
        write_artifact(bitmap_path, payload.header, bitmaps)
        old = read_artifact(bitmap_path)

        coded_report, bitmap_report = describe(upload), describe(old)
        kept = sum(int(m.sum()) for m in masks.values())
        numel = sum(m.numel() for m in masks.values())
        values_bytes = sum(
            t.numel() * t.element_size() for n, t in payload.tensors.items() if n.endswith(naming.VALUES)
        )
        stored = [upload.mask_storage(name) for name in masks]
        print(
            f"one FedSRD upload, Llama-3.2-3B shapes, r = 64: {args.layers} layer(s) built, scaled x{scale:g}"
            f" to {MODEL_LAYERS} layers; {kept:,} of {numel:,} elements kept ({kept / numel:.2%})"
        )
        print(
            f"    masks stored: {sum(s['stored'] == 'positions' for s in stored)} as positions,"
            f" {sum(s['stored'] == 'bitmap' for s in stored)} as bitmaps;"
            f" Rice k {sorted({s['rice_k'] for s in stored if 'rice_k' in s})}"
        )
        rows = [
            ("file on disk", bitmap_report["bytes_on_disk"], coded_report["bytes_on_disk"]),
            ("  values", values_bytes, values_bytes),
            ("  masks", bitmap_report["mask_bytes"], coded_report["mask_bytes"]),
            ("paper accounting", bitmap_report["paper_bytes"], coded_report["paper_bytes"]),
        ]
        print(f"[1] {'MB per upload':18} {'bitmaps (before)':>17} {'coded (after)':>14} {'after/before':>13}")
        for label, before, after in rows:
            mb_before, mb_after = before * scale / MB, after * scale / MB
            print(f"    {label:18} {mb_before:17.2f} {mb_after:14.2f} {after / before:13.3f}")
        print(
            f"    mask bits per element: {8 * coded_report['mask_bytes'] / numel:.3f} coded,"
            f" {8 * bitmap_report['mask_bytes'] / numel:.3f} bitmap"
        )

        whole = [kept for _ in range(args.repeat) for kept in masks.values()]
        whole_numel = sum(m.numel() for m in whole)
        start = time.perf_counter()
        encoded = [store_mask(m) for m in whole]
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        for kept, (coded, stored) in zip(whole, encoded, strict=True):
            if coded:
                read_positions_tensor(stored, kept.numel(), int(kept.sum()))
            else:
                unpack_bits(stored, kept.numel())
        decode_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.repeat):
            for name in masks:
                upload.upload_delta(name)
        coded_delta_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.repeat):
            for name in masks:
                old.upload_delta(name)
        bitmap_delta_s = time.perf_counter() - start
        start = time.perf_counter()
        for kept in whole:
            pack_bits(kept)
        pack_s = time.perf_counter() - start
        print(
            f"[2] a whole upload's masks ({len(whole)} tensors, {whole_numel:,} elements,"
            f" {math.fsum(m.sum().item() for m in whole):,.0f} kept), 1 thread:"
        )
        print(f"    encode (store_mask):            {encode_s:6.2f} s   (pack_bits alone: {pack_s:.2f} s)")
        print(f"    decode (read_positions_tensor): {decode_s:6.2f} s")
        print(
            f"    dense deltas (upload_delta):    {coded_delta_s:6.2f} s coded,"
            f" {bitmap_delta_s:.2f} s from bitmaps"
        )


if __name__ == "__main__":
    main()
