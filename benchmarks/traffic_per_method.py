"""Bytes per round per client of every registered method, on the test suite's toy shapes.

Runs two rounds of each method (3 simulated clients, tests/conftest.py's toy model:
2 layers, q/v/up/down, r = 4) through the library API, writes every file, and
reports for one client: upload and broadcast size on disk and in the paper's
accounting (fp32 values + 1 bit per element for sparse tensors, docs/algorithms.md),
against dense fp32 LoRA factors. Prints a table, or JSON with --json.

    python benchmarks/traffic_per_method.py [--json] [--llama-layer]

--llama-layer uses one decoder layer of Llama-3.2-3B instead (hidden 3072, MLP 8192,
8 KV heads of 128, all seven linear layers, r = 64: 3,473,408 LoRA parameters, 1/28 of
the model), where file metadata is negligible and ratios to dense compare with the paper's.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsrd_cli.algorithms import ALGORITHMS  # noqa: E402
from fedsrd_cli.algorithms.protocol import initial_state  # noqa: E402
from fedsrd_cli.config import AggregateConfig, BroadcastConfig, LoraSpec, SparsifyConfig  # noqa: E402
from fedsrd_cli.files.adapters import read_local  # noqa: E402
from fedsrd_cli.files.artifacts import read_artifact, write_artifact  # noqa: E402
from fedsrd_cli.files.describe import describe  # noqa: E402
from tests.algorithms.rounds import train_only  # noqa: E402
from tests.conftest import TOY_FINGERPRINT, make_global, make_local  # noqa: E402

LLAMA_LAYER = {
    f"base_model.model.model.layers.0.{name}": shape
    for name, shape in {
        "self_attn.q_proj": (3072, 3072),
        "self_attn.k_proj": (1024, 3072),
        "self_attn.v_proj": (1024, 3072),
        "self_attn.o_proj": (3072, 3072),
        "mlp.gate_proj": (8192, 3072),
        "mlp.up_proj": (8192, 3072),
        "mlp.down_proj": (3072, 8192),
    }.items()
}


def llama_layer_global(path: Path) -> Path:
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    payload = initial_state(LLAMA_LAYER, LoraSpec(64, 128.0, targets), 0, TOY_FINGERPRINT)
    write_artifact(path, payload.header, payload.tensors)
    return path


CLIENTS = 3
ROUNDS = 2


def measure(method: str, tmp: Path, llama_layer: bool) -> list[dict]:
    algorithm = ALGORITHMS[method]
    g0 = tmp / "g0.safetensors"
    state = llama_layer_global(g0) if llama_layer else make_global(g0)
    rows = []
    for round_index in range(1, ROUNDS + 1):
        global_state = read_artifact(state)
        uploads = []
        for i in range(CLIENTS):
            local = make_local(state, tmp / f"local-{round_index}-{i}.safetensors", seed=17 * round_index + i)
            only = algorithm.trained_factor(round_index)  # ffa-lora: B; fedsrd-alternate: B, then A
            if only is not None:
                local = train_only(state, local, only)
            sparsify = SparsifyConfig(base_sparsity=algorithm.default_base_sparsity)
            payload = algorithm.upload(global_state, read_local(local), f"c{i}", 10, sparsify)
            path = tmp / f"up-{round_index}-{i}.safetensors"
            write_artifact(path, payload.header, payload.tensors)
            uploads.append(read_artifact(path))
        agg_path = tmp / f"agg-{round_index}.safetensors"
        payload = algorithm.aggregate(global_state, uploads, AggregateConfig(method))
        write_artifact(agg_path, payload.header, payload.tensors)
        config = BroadcastConfig(algorithm.default_download_sparsity, seed=round_index)
        broadcast, next_state = algorithm.broadcast(global_state, read_artifact(agg_path), config)
        bc_path, state = tmp / f"bc-{round_index}.safetensors", tmp / f"g{round_index}.safetensors"
        write_artifact(bc_path, broadcast.header, broadcast.tensors)
        write_artifact(state, next_state.header, next_state.tensors)
        ups = [describe(u) for u in uploads]
        down = describe(read_artifact(bc_path))
        up_disk = sum(u["bytes_on_disk"] for u in ups) / CLIENTS
        up_paper = sum(u["paper_bytes"] for u in ups) / CLIENTS
        dense = down["dense_fp32_bytes"]
        rows.append(
            {
                "method": method,
                "round": round_index,
                "dense_fp32_each_way": dense,
                "upload_disk": up_disk,
                "upload_paper": up_paper,
                "download_disk": down["bytes_on_disk"],
                "download_paper": down["paper_bytes"],
                "total_paper": up_paper + down["paper_bytes"],
                "total_paper_vs_fedavg_dense": (up_paper + down["paper_bytes"]) / (2 * dense),
            }
        )
    return rows


def main() -> None:
    rows = []
    for method in ALGORITHMS:
        with tempfile.TemporaryDirectory() as tmp:
            rows += measure(method, Path(tmp), "--llama-layer" in sys.argv)
    if "--json" in sys.argv:
        print(json.dumps(rows, indent=1))
        return
    model = "one Llama-3.2-3B layer, r = 64" if "--llama-layer" in sys.argv else "toy model"
    print(f"{model}: {rows[0]['dense_fp32_each_way']} bytes of dense fp32 LoRA factors each way")
    print(
        f"{'method':26} {'rnd':>3} {'up disk':>9} {'up paper':>10} {'down disk':>10} {'down paper':>10}"
        f" {'total paper':>12} {'vs 2x dense':>11}"
    )
    for r in rows:
        print(
            f"{r['method']:26} {r['round']:>3} {r['upload_disk']:>9.0f} {r['upload_paper']:>10.0f}"
            f" {r['download_disk']:>10} {r['download_paper']:>10.0f} {r['total_paper']:>12.0f}"
            f" {r['total_paper_vs_fedavg_dense']:>11.1%}"
        )


if __name__ == "__main__":
    main()
