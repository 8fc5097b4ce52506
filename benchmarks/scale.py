"""How the coordinator scales with the number of clients m: seconds and peak memory per m.

    python benchmarks/scale.py [--clients 4,16,64,256,1000] [--llama-clients 4,16,64]
                               [--exact-up-to 64] [--workdir DIR]

Part 1, reduced shapes: 2 decoder layers of hidden 1,024 (intermediate 2,816, 4 KV heads of
64: k/v out 256), LoRA r = 16 on q, k, v, o, gate, up, down. For each m, `fedsrd aggregate`
runs as a subprocess on the first m uploads (made once, by the real `sparsify` step from
synthetic local states: the state some rounds in, plus Gaussian deltas with 2% larger
entries), with the default --truncation auto; for m up to --exact-up-to also with
--truncation exact, and the ratio of the two. Then `fedsrd status` on the inbox of all uploads.
Part 2: one Llama-3.2-3B decoder layer (hidden 3,072, intermediate 8,192, k/v out 1,024),
r = 64, the same for the m in --llama-clients.

It prints, all measured in this run: wall seconds and peak RSS (MB) of each command, the
route `auto` took, and the growth from m = 64 to the largest m against linear (m / 64).
Targets (issue): from m = 64 to m = 1,000 time grows at most 1.2 x 1000 / 64 and peak RSS
stays within 1.5 x m = 64's; 1,000 uploads of the reduced model aggregate in 60 s or less.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from coordinator import module_shapes, run_cli, state_some_rounds_in, trained_locally  # beside this file

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.config import SparsifyConfig
from fedsrd_cli.files.adapters import read_local
from fedsrd_cli.files.artifacts import read_artifact, write_artifact

REDUCED = {"hidden": 1024, "intermediate": 2816, "kv": 256, "layers": 2, "rank": 16}
LLAMA_3B_LAYER = {"hidden": 3072, "intermediate": 8192, "kv": 1024, "layers": 1, "rank": 64}


def make_round(work: Path, shape: dict, clients: int) -> tuple[Path, list[Path]]:
    """A global state some rounds in and `clients` uploads made by FedSRD's sparsify step."""
    shapes = module_shapes(shape["layers"], shape["hidden"], shape["intermediate"], shape["kv"])
    generator = torch.Generator().manual_seed(1)  # the state, then every client's local factors
    payload = state_some_rounds_in(shapes, shape["rank"], generator)
    g0 = work / "global.safetensors"
    write_artifact(g0, payload.header, payload.tensors)
    state = read_artifact(g0)
    algorithm = get_algorithm("fedsrd")
    local_path = work / "local.safetensors"
    inbox = work / "inbox"
    inbox.mkdir()
    uploads = []
    for i in range(clients):
        tensors = trained_locally(payload.tensors, generator)
        header = replace(state.header, parent_hash=state.header.content_hash, num_samples=1000)
        write_artifact(local_path, header, tensors, force=True)
        upload = algorithm.upload(state, read_local(local_path), f"site-{i:04d}", 1000, SparsifyConfig())
        uploads.append(inbox / f"upload-{i:04d}.safetensors")
        write_artifact(uploads[-1], upload.header, upload.tensors)
    local_path.unlink()
    return g0, uploads


def aggregate(work: Path, g0: Path, uploads: list[Path], truncation: str) -> tuple[float, float, str]:
    out = work / f"aggregate-{len(uploads)}-{truncation}.safetensors"
    seconds, peak, stdout = run_cli(
        [
            "aggregate",
            "--json",
            "--global",
            str(g0),
            "--out",
            str(out),
            "--truncation",
            truncation,
            *map(str, uploads),
        ]
    )
    route = json.loads(stdout).get("truncation", "?")
    out.unlink()
    return seconds, peak, route


def scale(title: str, shape: dict, counts: list[int], exact_up_to: int, work: Path, status: bool) -> None:
    start = time.perf_counter()
    g0, uploads = make_round(work, shape, max(counts))
    numel = read_artifact(g0).numel()
    size = sum(p.stat().st_size for p in uploads) / len(uploads) / 2**20
    print(
        f"\n{title}: {numel:,} LoRA parameters, r = {shape['rank']}, {len(uploads)} uploads of"
        f" {size:.2f} MB each made in {time.perf_counter() - start:.0f} s"
    )
    print(
        f"{'m':>6} {'route':>10} {'seconds':>9} {'peak MB':>8}"
        f" {'exact s':>9} {'exact MB':>9} {'exact/auto':>10}"
    )
    results = {}
    for m in counts:
        seconds, peak, route = aggregate(work, g0, uploads[:m], "auto")
        results[m] = (seconds, peak)
        row = f"{m:>6} {route:>10} {seconds:>9.2f} {peak:>8.0f}"
        if m <= exact_up_to and route != "exact":
            e_seconds, e_peak, _ = aggregate(work, g0, uploads[:m], "exact")
            row += f" {e_seconds:>9.2f} {e_peak:>9.0f} {e_seconds / seconds:>10.2f}"
        print(row, flush=True)
    top = max(counts)
    if 64 in results and top > 64:
        time_growth = results[top][0] / results[64][0]
        rss_growth = results[top][1] / results[64][1]
        print(
            f"m = 64 -> {top}: time x{time_growth:.2f} (linear: x{top / 64:.2f},"
            f" target <= x{1.2 * top / 64:.2f}),"
            f" peak RSS x{rss_growth:.2f} (target <= x1.5)"
        )
    if status:
        seconds, peak, stdout = run_cli(["status", "--json", "--global", str(g0), str(uploads[0].parent)])
        print(f"status on the inbox of {len(uploads)} uploads: {seconds:.2f} s, peak {peak:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description="FedSRD coordinator scaling in the number of clients")
    parser.add_argument("--clients", default="4,16,64,256,1000")
    parser.add_argument("--llama-clients", default="4,16,64")
    parser.add_argument("--exact-up-to", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = min(soft, 1024)  # the commands run with at most 1,024 open files, fewer than 1,000 uploads + 24
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    print(f"open-file limit of the commands: {limit}; {torch.get_num_threads()} threads here")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fedsrd-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        parts = (
            ("reduced", "reduced model (2 layers of hidden 1,024)", REDUCED, args.clients, True),
            ("llama", "one Llama-3.2-3B layer", LLAMA_3B_LAYER, args.llama_clients, False),
        )
        for folder, title, shape, clients, status in parts:
            counts = [int(c) for c in clients.split(",") if c]
            if counts:
                (work / folder).mkdir()
                scale(title, shape, counts, args.exact_up_to, work / folder, status)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
