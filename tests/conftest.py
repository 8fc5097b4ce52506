"""Shared fixtures: tiny synthetic global states and locally 'trained' adapters.

Nothing here downloads anything or imports transformers: shapes are given
directly, as a 2-layer Llama-like model would have them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedsrd_cli.algorithms.protocol import initial_state
from fedsrd_cli.artifacts import read_artifact, write_artifact
from fedsrd_cli.config import LoraSpec

# A 2-layer toy decoder: q, v (d x d) and an MLP up/down pair, d = 32, intermediate 48.
TOY_SHAPES = {
    f"base_model.model.model.layers.{i}.{name}": shape
    for i in range(2)
    for name, shape in {
        "self_attn.q_proj": (32, 32),
        "self_attn.v_proj": (16, 32),
        "mlp.up_proj": (48, 32),
        "mlp.down_proj": (32, 48),
    }.items()
}
TOY_FINGERPRINT = "sha256:" + "ab" * 32


def make_global(path: Path, rank: int = 4, alpha: float = 8.0, seed: int = 0) -> Path:
    """Write a round-0 global state for TOY_SHAPES."""
    lora = LoraSpec(rank, alpha, ("down_proj", "q_proj", "up_proj", "v_proj"))
    payload = initial_state(TOY_SHAPES, lora, seed, TOY_FINGERPRINT)
    write_artifact(path, payload.header, payload.tensors)
    return path


def make_local(global_path: Path, path: Path, seed: int, scale: float = 0.01, num_samples: int = 10) -> Path:
    """Simulated local training: add N(0, scale^2) noise to every A and B of the global state.

    Each matrix also gets a few larger entries (heavy tails), as real LoRA deltas have.
    """
    state = read_artifact(global_path, kind="state")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in state.iter_tensors():
        noise = torch.randn(tensor.shape, generator=generator) * scale
        spikes = torch.rand(tensor.shape, generator=generator) < 0.02
        tensors[name] = tensor + noise + spikes * noise * 10
    header = replace(state.header, parent_hash=state.header.content_hash, num_samples=num_samples, info={})
    write_artifact(path, header, tensors)
    return path


@pytest.fixture
def global_path(tmp_path: Path) -> Path:
    return make_global(tmp_path / "global-r0.safetensors")


@pytest.fixture
def locals_for(tmp_path: Path):
    """Factory: locals_for(global_path, n) -> n simulated local states trained from it."""

    def build(global_file: Path, n: int = 3, scale: float = 0.01) -> list[Path]:
        return [
            make_local(
                global_file,
                tmp_path / f"local-{global_file.stem}-{i}.safetensors",
                seed=i + 1,
                scale=scale,
                num_samples=10 * (i + 1),
            )
            for i in range(n)
        ]

    return build


# --------------------------------------------------------------------------- tiny real models

TINY_RECORDS = [
    {"instruction": f"What is {a} + {b}?", "output": str(a + b)}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build_tiny_model(path: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer Llama (hidden 32) with a byte-level BPE tokenizer trained offline on a few lines."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedsrd_cli.demo import build_tokenizer

    corpus = ["The quick brown fox jumps over the lazy dog. " * 3] + [
        f"### Instruction:\n{r['instruction']}\n\n### Response:\n{r['output']}" for r in TINY_RECORDS
    ]
    tokenizer = build_tokenizer(corpus, vocab_size=300)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", TINY_RECORDS)


# --------------------------------------------------------------------------- a tiny GGUF base

# transformers name -> llama.cpp name, per layer and for the rest of a Llama
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _gguf_name(name: str) -> str:
    """llama.cpp's tensor name for a transformers Llama parameter name."""
    stem = name.removesuffix(".weight")
    if stem in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[stem] + ".weight"
    _model, _layers, index, rest = stem.split(".", 3)
    return f"blk.{index}.{_GGUF_LAYER_NAMES[rest]}.weight"


def _rotary_pairs_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows as llama.cpp stores them: within each head, the two rotary halves interleaved
    (row i of the first half, row i of the second, ...). transformers' GGUF loader undoes this."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_tiny_gguf(model_dir: Path, path: Path) -> Path:
    """The save_pretrained Llama in model_dir as one F32 GGUF file, as llama.cpp would write it.

    Metadata: what transformers' GGUF loader turns into a LlamaConfig (sizes, heads, rope, RMS
    epsilon) and a byte-level BPE tokenizer (`gpt2`: tokens, types, merges, special ids).
    """
    import json

    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(tokenizer["model"]["vocab"])
    special = {t["content"] for t in tokenizer["added_tokens"] if t["special"]}
    for added in tokenizer["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(config.vocab_size))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(True)
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        if name.endswith("self_attn.q_proj.weight"):
            tensor = _rotary_pairs_interleaved(tensor, config.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            tensor = _rotary_pairs_interleaved(tensor, config.num_key_value_heads)
        writer.add_tensor(_gguf_name(name), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model: Path, tmp_path_factory) -> Path:
    """tiny_model's weights and tokenizer as one F32 GGUF file."""
    return write_tiny_gguf(tiny_model, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
