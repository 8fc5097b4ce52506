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
from fedsrd_cli.config import LoraSpec
from fedsrd_cli.files.artifacts import read_artifact, write_artifact

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

    from fedsrd_cli.suites.demo import build_tokenizer

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


# --------------------------------------------------------------------------- a tiny Gemma-3 GGUF base

# Gemma-3-270M's Q4_K_M file stores its tensors in these llama.cpp types (the rest in F32); the tiny
# one does too, so transformers' dequantization of each is compared with gguf-py's.
_GEMMA3_TYPES = {
    "token_embd": "Q8_0",
    "attn_q": "Q5_0",
    "attn_k": "Q5_0",
    "attn_v": "Q8_0",
    "attn_output": "Q4_K",
    "ffn_gate": "Q5_0",
    "ffn_up": "Q5_0",
    "ffn_down": "Q6_K",
}
# Whole words in the tiny SentencePiece vocabulary (with every prefix, so that merges exist).
_GEMMA3_WORDS = ["###", "\u2581Instruction", "\u2581Response", "What", "\u2581What", "\u2581is"]


def _gemma3_vocab() -> tuple[list[str], list[int]]:
    """A SentencePiece-style vocabulary as Gemma's GGUF files spell it: <pad> <eos> <bos> <unk>,
    256 byte tokens, single characters ("\u2581" for a space), then words and their prefixes."""
    import string

    import gguf

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.UNKNOWN]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    chars = ["\n", "\u2581"] + [c for c in string.printable if c not in string.whitespace]
    words = [w[:n] for w in _GEMMA3_WORDS for n in range(2, len(w) + 1)]
    for token in chars + list(dict.fromkeys(words)):
        if token not in tokens:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _gemma3_stored(rows: int, cols: int, kind: str, weight: torch.Tensor, generator: torch.Generator):
    """(the bytes or floats llama.cpp would store, the GGML type) for one tensor of `kind`.

    Q8_0 / Q5_0 quantize `weight` with gguf-py. gguf-py cannot quantize the K types, so a
    Q4_K / Q6_K tensor is random well-formed blocks (small scales, random codes)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[kind]
    if kind in ("Q8_0", "Q5_0"):
        return quants.quantize(weight.float().numpy(), qtype), qtype
    blocks = rows * cols // 256
    raw = torch.randint(0, 256, (blocks, 144 if kind == "Q4_K" else 210), generator=generator).numpy()
    raw = raw.astype(np.uint8)
    half = np.dtype("<f2")
    if kind == "Q4_K":  # d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit codes
        raw[:, 0:2] = np.full(blocks, 1e-4, half).view(np.uint8).reshape(blocks, 2)
        raw[:, 2:4] = np.full(blocks, 5e-5, half).view(np.uint8).reshape(blocks, 2)
    else:  # Q6_K: 128 + 64 bytes of 6-bit codes, 16 int8 scales, d (fp16) last
        raw[:, 208:210] = np.full(blocks, 2e-5, half).view(np.uint8).reshape(blocks, 2)
    return raw.reshape(rows, -1), qtype


def build_tiny_gemma3_gguf(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A 6-layer Gemma-3 (hidden 256: the K types need rows of 256) written as one Q4_K_M-like
    GGUF file the way llama.cpp writes Gemma-3-270M, and the same weights as gguf-py
    dequantizes them saved by save_pretrained: (gguf file, reference directory).

    What llama.cpp does for Gemma that the tiny Llama does not show: norm weights stored as
    1 + w, no output.weight (lm_head is tied to the embedding), q/k rows not permuted,
    a SentencePiece ("llama") vocabulary without merges, the sliding window in the metadata.
    Six layers, so that transformers' default pattern gives five sliding layers and one full.
    """
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType, quants
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tokens, types = _gemma3_vocab()
    config = Gemma3TextConfig(
        vocab_size=len(tokens),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=256,
        sliding_window=8,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    path = folder / "tiny-gemma3.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny-gemma3")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(config.sliding_window)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([float(-i) for i in range(len(tokens))])
    writer.add_token_types(types)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    expected = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight for Gemma
        gguf_name = names.get_name(name, try_suffixes=(".weight",))  # e.g. "blk.0.attn_q.weight"
        assert gguf_name is not None, name
        stem = gguf_name.removesuffix(".weight")
        kind = _GEMMA3_TYPES.get(stem.rsplit(".", 1)[-1])
        if kind is None:
            # norms: Gemma computes x * (1 + w); random w (not the zeros it starts with), stored as 1 + w
            stored = torch.randn(tensor.shape, generator=generator) * 0.1 + 1
            writer.add_tensor(gguf_name, stored.numpy())
            expected[name] = stored - 1  # what the file holds, fp32 rounding included
            continue
        stored, qtype = _gemma3_stored(*tensor.shape, kind, tensor, generator)
        writer.add_tensor(gguf_name, stored, raw_dtype=qtype)
        floats = quants.dequantize(stored, GGMLQuantizationType(qtype))
        expected[name] = torch.from_numpy(np.ascontiguousarray(floats, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert all(bool(t.isfinite().all()) and float(t.abs().max()) < 1 for t in expected.values())
    model.load_state_dict(expected, strict=False)  # lm_head follows the tied embedding
    reference = folder / "tiny-gemma3"
    model.save_pretrained(str(reference))
    tokenizer = AutoTokenizer.from_pretrained(
        str(folder), gguf_file=str(path.resolve()), local_files_only=True
    )
    tokenizer.save_pretrained(str(reference))
    return path, reference


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny Gemma-3 GGUF file, the same weights dequantized and saved by save_pretrained)."""
    return build_tiny_gemma3_gguf(tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="session")
def tiny_gemma3_gguf(tiny_gemma3: tuple[Path, Path]) -> Path:
    return tiny_gemma3[0]
