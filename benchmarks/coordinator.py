"""Coordinator benchmark on Llama-3.2-3B shapes: thin-factor route vs the dense reference.

    python benchmarks/coordinator.py [--layers 28] [--clients 4] [--dense-layers 1] [--busy 1]
                                     [--workdir DIR] [--against SRC --repeats 2]

Shapes: 28 decoder layers, hidden 3072, intermediate 8192, 8 KV heads of 128 (k/v out 1024),
LoRA r = 64 on q, k, v, o, gate, up, down: 97,255,424 LoRA parameters. Tensors are synthetic:
a global state whose B factors are non-zero (a state some rounds in), and local states that
add Gaussian noise with 2% larger entries (heavy-tailed, like trained deltas).

It prints, all measured in this run:
1. dense reference vs ours on the first `--dense-layers` decoder layers (same inputs):
   dense = materialise W = sum_i w_i B_i A_i (d_out x d_in), full SVD, truncate to r,
   dB = (W_r - B A) A^T (A A^T + lam I)^-1 (the default damped solve); ours = the default route
   (Gram matrices of the thin factors, an SVD of the small core, the same solve from the
   factors). Speed ratio and max relative difference of dB.
2. a full coordinator round through the real CLI (`fedsrd aggregate`, `fedsrd broadcast`, as
   subprocesses, default settings): wall time and peak RSS, and the time as a multiple of the
   dense route's time per layer from 1. (it cancels a load that slows both alike; the dense
   route keeps torch's thread count where the CLI picks one per idle core, so on a busy
   machine the dense route slows more and the ratio reads low); then the same round again
   with `--busy` processes spinning on other cores meanwhile.
   With --against SRC (the src/ folder of another checkout, e.g. `git worktree add ../old REV`):
   the same round's commands alternately from this code and from SRC on the same inputs
   (this, that, that, this, ... for --repeats pairs), each mean as dense layers and the ratio
   this / that, so two versions compare in one run whatever the machine's load.
3. bytes per client: upload and download files on disk at the default settings, against the
   paper's 31 MB up and 43 MB down (MB = 2^20 bytes), and dense fp32 FedAvg; the upload's
   masks as stored and as the paper's 1 bit per element.
Targets (issue): ratio >= 100x with relative difference <= 1e-4; the 28-layer round <= 20 s
on idle cores with peak RSS <= 4 GB; at most 35 MB per client per round (up + down).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from fedsrd_cli.algorithms import get_algorithm
from fedsrd_cli.algorithms.base import Payload
from fedsrd_cli.algorithms.protocol import initial_state
from fedsrd_cli.config import BroadcastConfig, LoraSpec, SparsifyConfig
from fedsrd_cli.files import naming
from fedsrd_cli.files.adapters import read_local
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
from fedsrd_cli.files.describe import describe
from fedsrd_cli.math.lowrank import stack_factors, truncate_product, update_b

MB = 2**20
HIDDEN, INTERMEDIATE, KV = 3072, 8192, 1024
RANK = 64
PAPER_UP_MB, PAPER_DOWN_MB = 31, 43


def module_shapes(
    layers: int, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, kv: int = KV
) -> dict[str, tuple[int, int]]:
    """{PEFT module name: (d_out, d_in)} of a Llama-shaped decoder's 7 linear modules per layer."""
    per_layer = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    return {
        f"base_model.model.model.layers.{i}.{name}": dims
        for i in range(layers)
        for name, dims in per_layer.items()
    }


def state_some_rounds_in(
    shapes: dict[str, tuple[int, int]], rank: int, generator: torch.Generator
) -> Payload:
    """A round-0 state of these modules (alpha 2 r) whose B factors are no longer zero."""
    lora = LoraSpec(rank, 2.0 * rank, tuple(sorted({n.rsplit(".", 1)[-1] for n in shapes})))
    payload = initial_state(shapes, lora, seed=0, base_fingerprint="sha256:" + "0" * 64)
    for name, tensor in payload.tensors.items():
        if name.endswith("lora_B.weight"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.01)
    return payload


def trained_locally(tensors: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Synthetic local factors: Gaussian deltas of 1e-3, 2% of them 10x larger (heavy-tailed)."""
    out = {}
    for name, tensor in tensors.items():
        noise = torch.randn(tensor.shape, generator=generator) * 1e-3
        spikes = torch.rand(tensor.shape, generator=generator) < 0.02
        out[name] = tensor + noise * (1 + 9 * spikes)
    return out


def build_global(path: Path, layers: int) -> None:
    payload = state_some_rounds_in(module_shapes(layers), RANK, torch.Generator().manual_seed(1))
    write_artifact(path, payload.header, payload.tensors)


def build_local(global_path: Path, path: Path, seed: int) -> None:
    state = read_artifact(global_path, verify=False)
    tensors = trained_locally(dict(state.iter_tensors()), torch.Generator().manual_seed(seed))
    header = replace(state.header, parent_hash=state.header.content_hash, num_samples=1000)
    write_artifact(path, header, tensors)


def dense_vs_thin(global_path: Path, upload_paths: list[Path], layers: int) -> float:
    """Prints the comparison; returns the dense route's seconds per decoder layer (the yardstick
    that the coordinator round is measured against, so that a loaded machine cancels out)."""
    state = read_artifact(global_path, verify=False)
    uploads = [read_artifact(p, verify=False) for p in upload_paths]
    weights = [1.0 / len(uploads)] * len(uploads)
    modules = [m for m in state.modules() if int(m.split("layers.")[1].split(".")[0]) < layers]
    inputs = []
    for module in modules:
        a_prev, b_prev = state.factors(module)
        bs, as_ = [], []
        for up in uploads:
            da = up.upload_delta(naming.factor_key(module, "A"))
            db = up.upload_delta(naming.factor_key(module, "B"))
            as_.append(a_prev + (0 if da is None else da))
            bs.append(b_prev + (0 if db is None else db))
        inputs.append((a_prev, b_prev, bs, as_))

    thin_s, dense_s, worst = 0.0, 0.0, 0.0
    damping = BroadcastConfig().damping  # the default ridge-damped B solve, both routes
    for a_prev, b_prev, bs, as_ in inputs:
        start = time.perf_counter()
        left, right = stack_factors([b.double() for b in bs], [a.double() for a in as_], weights)
        t_left, t_right = truncate_product(left, right, RANK)
        ours = update_b(t_left, t_right, b_prev.double(), a_prev.double(), damping).float()
        thin_s += time.perf_counter() - start

        start = time.perf_counter()
        w = sum(wi * b @ a for wi, b, a in zip(weights, bs, as_, strict=True))  # (d_out, d_in)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        w_r = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
        gram = a_prev @ a_prev.T  # (r, r)
        ridge = damping * torch.linalg.eigvalsh(gram)[-1] * torch.eye(RANK)
        reference = torch.linalg.solve(gram + ridge, ((w_r - b_prev @ a_prev) @ a_prev.T).T).T
        dense_s += time.perf_counter() - start

        rel = (torch.linalg.matrix_norm(ours - reference) / torch.linalg.matrix_norm(reference)).item()
        worst = max(worst, rel)
    print(
        f"[1] dense reference vs thin factors, {len(inputs)} modules ({layers} decoder layer(s)), "
        f"{len(uploads)} clients, r={RANK}, {torch.get_num_threads()} threads"
    )
    print(f"    dense (W, full SVD, damped solve; fp32): {dense_s:8.2f} s")
    print(f"    ours  (Gram matrices + small-core SVD, damped solve; fp64): {thin_s:8.2f} s")
    print(f"    speed ratio: {dense_s / thin_s:.1f}x   (target >= 100x)")
    print(f"    max relative difference of dB: {worst:.2e}   (target <= 1e-4)")
    return dense_s / layers


# A small launcher process runs the command, so the peak RSS it reports is the command's own
# (a child forked from this large benchmark process would count our pages before its exec).
_LAUNCHER = (
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], check=True,"
    " stdout=subprocess.PIPE); sys.stdout.write(done.stdout.decode());"
    " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)
# The CLI's entry point, in this version (fedsrd_cli.entry) or an older one (fedsrd_cli.cli).
_ENTRY = (
    "try:\n    from fedsrd_cli.entry import main\n"
    "except ImportError:\n    from fedsrd_cli.cli import main\nmain()"
)
OURS = Path(__file__).resolve().parents[1] / "src"


def run_cli(args: list[str], src: Path = OURS) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of one `fedsrd` command, from the package in src."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, sys.executable, "-c", _ENTRY, *args],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    *output, peak = done.stdout.strip().splitlines()
    return time.perf_counter() - start, int(peak) / 1024, "\n".join(output)


def coordinator_round(
    g0: Path,
    uploads: list[Path],
    agg: Path,
    bc: Path,
    g1: Path,
    label: str,
    dense_layer_s: float,
    src: Path = OURS,
) -> tuple[float, float, float]:
    """`fedsrd aggregate` then `fedsrd broadcast` at the defaults: (seconds, seconds, peak GB).
    Also printed as a ratio to dense_layer_s, the dense route's time per layer in this run."""
    for path in (agg, bc, g1):
        path.unlink(missing_ok=True)
    t_agg, mb_agg, _ = run_cli(["aggregate", "--global", str(g0), "--out", str(agg), *map(str, uploads)], src)
    broadcast = ["broadcast", "--global", str(g0), "--aggregate", str(agg)]
    t_bc, mb_bc, _ = run_cli([*broadcast, "--out", str(bc), "--out-global", str(g1)], src)
    rss_agg, rss_bc = mb_agg / 1024, mb_bc / 1024
    print(
        f"    {label}: aggregate {t_agg:6.1f} s   broadcast {t_bc:6.1f} s   total {t_agg + t_bc:6.1f} s"
        f"   (target <= 20 s for 28 layers on idle cores)"
    )
    print(f"      peak RSS: aggregate {rss_agg:.2f} GB, broadcast {rss_bc:.2f} GB   (target <= 4 GB)")
    print(
        f"      against the dense route's {dense_layer_s:.2f} s per layer in this run: aggregate"
        f" {t_agg / dense_layer_s:.3f}, broadcast {t_bc / dense_layer_s:.3f}, round"
        f" {(t_agg + t_bc) / dense_layer_s:.3f} dense layers"
    )
    return t_agg, t_bc, max(rss_agg, rss_bc)


def versions_compared(
    g0: Path, uploads: list[Path], work: Path, against: Path, repeats: int, dense_layer_s: float
) -> None:
    """This code's round against the one in `against`, alternated (ABBA...) on the same inputs."""
    agg, bc, g1 = work / "agg-v.safetensors", work / "bc-v.safetensors", work / "g1-v.safetensors"
    times: dict[str, list[float]] = {"this": [], "that": []}
    order = ["this", "that", "that", "this"] * ((repeats + 1) // 2)
    print(f"[2b] this code against {against}, alternated, {repeats} round(s) each")
    for which in order[: 2 * repeats]:
        src = OURS if which == "this" else against
        t_agg, t_bc, _ = coordinator_round(g0, uploads, agg, bc, g1, which, dense_layer_s, src)
        times[which].append(t_agg + t_bc)
    this, that = (sum(times[k]) / len(times[k]) for k in ("this", "that"))
    print(
        f"    mean round: this {this:.1f} s ({this / dense_layer_s:.3f} dense layers), that"
        f" {that:.1f} s ({that / dense_layer_s:.3f}); this / that = {this / that:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="FedSRD coordinator benchmark")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--dense-layers", type=int, default=1)
    parser.add_argument(
        "--busy", type=int, default=1, help="spinning processes for the loaded round (0: skip)"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--against", type=Path, default=None, help="another checkout's src/ to compare the round with"
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds of each version with --against")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fedsrd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        g0 = work / "global.safetensors"
        start = time.perf_counter()
        build_global(g0, args.layers)
        state = read_artifact(g0, verify=False)
        lora_numel = state.numel()
        algorithm = get_algorithm("fedsrd")
        uploads = []
        for i in range(args.clients):
            local = work / f"local-{i}.safetensors"
            build_local(g0, local, seed=100 + i)
            payload = algorithm.upload(state, read_local(local), f"client-{i}", 1000, SparsifyConfig())
            uploads.append(work / f"upload-{i}.safetensors")
            write_artifact(uploads[-1], payload.header, payload.tensors)
            local.unlink()
        print(
            f"setup: {args.layers} layers, {lora_numel:,} LoRA parameters, {args.clients} uploads "
            f"made in {time.perf_counter() - start:.0f} s"
        )

        dense_layer_s = dense_vs_thin(g0, uploads, args.dense_layers)

        agg, bc, g1 = work / "aggregate.safetensors", work / "broadcast.safetensors", work / "g1.safetensors"
        print(f"[2] coordinator round through the CLI, {args.layers} layers, {args.clients} clients")
        t_agg, t_bc, peak_gb = coordinator_round(g0, uploads, agg, bc, g1, "idle cores", dense_layer_s)
        if args.against is not None:
            versions_compared(g0, uploads, work, args.against.resolve(), args.repeats, dense_layer_s)
        if args.busy:
            spinners = [
                subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)
            ]
            try:
                coordinator_round(
                    g0, uploads, agg, bc, g1, f"{args.busy} busy process(es) beside it", dense_layer_s
                )
            finally:
                for spinner in spinners:
                    spinner.kill()

        up_mb = sum(p.stat().st_size for p in uploads) / len(uploads) / MB
        down_mb = bc.stat().st_size / MB
        dense_mb = lora_numel * 4 / MB
        ratios = [
            r for p in uploads for r in read_artifact(p, verify=False).header.info["prune_ratio"].values()
        ]
        print("[3] bytes per client at the defaults (MB = 2^20 bytes), round 1 (B is sent)")
        print(
            f"    upload:   {up_mb:7.2f} MB   paper {PAPER_UP_MB} MB   "
            f"(mean prune ratio {sum(ratios) / len(ratios):.3f} from these synthetic deltas)"
        )
        reports = [describe(read_artifact(p, verify=False)) for p in uploads]
        stored_mb = sum(r["mask_bytes"] for r in reports) / len(reports) / MB
        bitmap_mb = sum(r["paper_mask_bytes"] for r in reports) / len(reports) / MB
        print(
            f"    of which masks: {stored_mb:5.2f} MB stored (coded positions where shorter),"
            f" {bitmap_mb:.2f} MB as the paper's 1 bit per element"
        )
        print(f"    download: {down_mb:7.2f} MB   paper {PAPER_DOWN_MB} MB")
        paper_up = sum(r["paper_bytes"] for r in reports) / len(reports) / MB
        paper_down = describe(read_artifact(bc, verify=False))["paper_bytes"] / MB
        print(
            f"    the paper's accounting of the same files (fp32 values, 1 bit per upload element):"
            f" upload {paper_up:.2f} MB, download {paper_down:.2f} MB"
        )
        print(
            f"    dense fp32 FedAvg: {dense_mb:7.2f} MB each way; FedSRD round total "
            f"{up_mb + down_mb:.2f} MB = {(up_mb + down_mb) / (2 * dense_mb):.1%} of FedAvg's "
            f"{2 * dense_mb:.2f} MB"
        )
        if args.layers == 28:
            verdicts = {
                "up + down <= 35 MB": up_mb + down_mb <= 35,
                "round <= 20 s": t_agg + t_bc <= 20,
                "peak RSS <= 4 GB": peak_gb <= 4,
            }
            print("    " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in verdicts.items()))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
