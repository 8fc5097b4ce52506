"""A client's commands: train-local, sparsify, apply, eval, export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedsrd_cli.cli.app import command
from fedsrd_cli.cli.options import (
    METHODS_HELP,
    BaseOpt,
    DataOpt,
    DpDeltaOpt,
    DpEpsilonOpt,
    DpMaxGradNormOpt,
    DpNoiseMultiplierOpt,
    DpRoundsOpt,
    EncryptToOpt,
    ForceOpt,
    GlobalOpt,
    JsonOpt,
    MetricsMaxNewTokensOpt,
    MetricsOpt,
    OutOpt,
    QuietOpt,
    SignKeyOpt,
    ThreadsOpt,
    TrustOpt,
    check_client_id,
    seal_for,
    sign_with,
    trust_from_flags,
)
from fedsrd_cli.cli.render import written
from fedsrd_cli.errors import UsageError
from fedsrd_cli.limits import DEFAULT_DP_MAX_GRAD_NORM
from fedsrd_cli.output import Output, data_table, human_bytes, human_duration, key_value_table


@command("train-local")
def train_local_cmd(
    base: BaseOpt,
    global_path: GlobalOpt,
    data: DataOpt,
    out_path: Annotated[Path, typer.Option("--out", help="Local state file to write.")],
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Epochs (default 1).")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate (AdamW).")] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per step.")] = 1,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per example.")] = 512,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the data order (same seed on CPU: same file).")
    ] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, fp32, bf16 or fp16 (base weights).")] = "auto",
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Recompute activations: less memory, more time.")
    ] = False,
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
    dp_epsilon: DpEpsilonOpt = None,
    dp_delta: DpDeltaOpt = None,
    dp_max_grad_norm: DpMaxGradNormOpt = None,
    dp_noise_multiplier: DpNoiseMultiplierOpt = None,
    dp_rounds: DpRoundsOpt = None,
    dp_max_epsilon: Annotated[
        float | None,
        typer.Option(
            "--dp-max-epsilon",
            help="Refuse, before training, a round that takes this site past this epsilon [--dp-epsilon].",
            show_default=False,
        ),
    ] = None,
    dp_ledger: Annotated[
        Path | None,
        typer.Option(
            "--dp-ledger",
            help="This site's previous local state or upload: its ledger counts too, if longer than the"
            " one the global state recorded for it.",
            show_default=False,
        ),
    ] = None,
    threads: ThreadsOpt = None,
    sign_key: SignKeyOpt = None,
    trust_dir: TrustOpt = None,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Client: train the global state's LoRA on local data; writes a local state for sparsify.

    With --dp-epsilon or --dp-noise-multiplier it trains with DP-SGD and records this site's
    privacy ledger in the local state (docs/privacy.md). With --trust, the global state must be
    signed by `coordinator` (or by this client's key).
    """
    import json
    import time

    from fedsrd_cli.algorithms.diagnostics import (
        local_one_factor_residual,
        local_update_warning,
        long_local_training_warning,
    )
    from fedsrd_cli.files.artifacts import write_artifact
    from fedsrd_cli.files.atomic import FileWrite, ensure_writable
    from fedsrd_cli.math.threads import use_threads
    from fedsrd_cli.site.data import load_datasets
    from fedsrd_cli.site.model import check_fingerprint, load_base
    from fedsrd_cli.site.training import (
        TrainConfig,
        check_private_run,
        local_header,
        private_training,
        train_local,
    )
    from fedsrd_cli.trust.signing import COORDINATOR, read_verified

    out = Output(json_mode, quiet)
    if client is not None:
        check_client_id(client)
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
    dp_flags = (
        dp_epsilon,
        dp_delta,
        dp_max_grad_norm,
        dp_noise_multiplier,
        dp_rounds,
        dp_max_epsilon,
        dp_ledger,
    )
    record_dp = None
    if any(flag is not None for flag in dp_flags):
        from fedsrd_cli.privacy.budget import RecordDp

        record_dp = RecordDp(
            epsilon=dp_epsilon,
            delta=dp_delta,
            max_grad_norm=DEFAULT_DP_MAX_GRAD_NORM if dp_max_grad_norm is None else dp_max_grad_norm,
            noise_multiplier=dp_noise_multiplier,
            planned_rounds=dp_rounds,
            max_epsilon=dp_max_epsilon,
        )
        if client is None:
            raise UsageError("DP-SGD keeps this site's privacy ledger under its client id: give --client")
        if gradient_checkpointing:
            raise UsageError("--gradient-checkpointing cannot be combined with DP-SGD (--dp-*)")
    signer, trust = trust_from_flags(sign_key, trust_dir)
    log_path = Path(str(out_path) + ".log.jsonl")
    inputs = [("--base", base), ("--global", global_path), ("--data", data), ("--dp-ledger", dp_ledger)]
    ensure_writable(out_path, force, inputs)
    ensure_writable(log_path, force, inputs)
    accept = (COORDINATOR,) if signer is None else (COORDINATOR, signer.name)
    global_state = read_verified(global_path, "state", trust, accept=accept)
    check_fingerprint(base, global_state)
    if alternate:
        config = config.alternating(global_state.header.round + 1)
    datasets = load_datasets(data)
    ledger = None
    if record_dp is not None:
        from fedsrd_cli.privacy.ledger import read_privacy

        own = None
        if dp_ledger is not None:
            own = read_privacy(read_verified(dp_ledger, None, trust, accept=(client,)).header).record_level
            if own is None:
                raise UsageError(f"--dp-ledger {dp_ledger}: carries no record-level privacy ledger")
        config, ledger = private_training(record_dp, global_state, client, datasets, config, own)
        release = ledger.releases[-1]
        out.note(
            f"DP-SGD: noise multiplier {release.noise_multiplier:.4g}, clip {release.clip:g}, sample rate"
            f" {release.sample_rate:.4g} of {release.population} records, {release.steps} steps; epsilon"
            f" {ledger.epsilon:.4g} at delta {ledger.delta:.3g} after this round"
        )
    threads = use_threads(threads)
    model = load_base(base, device, dtype)
    total = config.total_steps(sum(len(d.examples) for d in datasets))
    # The method that wrote the global state; None for a round-0 state, which no method wrote.
    methods = (global_state.header.method,) if global_state.header.method else None
    warned: list[str] = []  # every warning line, also in the --json result
    long_training = long_local_training_warning(total, lr, methods)
    if long_training:
        out.note(f"warning: {long_training}")
        warned.append(long_training)
    out.note(
        f"training {total:,} steps of {config.batch_size * config.grad_accum} examples on {model.device}"
        f" ({threads} thread{'s' if threads != 1 else ''})"
    )
    with out.steps(total, "training") as progress:
        started = time.monotonic()

        def on_step(step: int, _total: int, loss: float | None, tokens_per_s: float) -> None:
            shown = "no record sampled" if loss is None else f"loss {loss:.4f}"
            progress.update(step, f"{shown}  {tokens_per_s:,.0f} tok/s")
            if step == 1 and total > 1:
                first = time.monotonic() - started
                out.note(
                    f"step 1 took {first:.1f} s: about {human_duration(first * total)} for {total:,} steps"
                )

        tensors, stats = train_local(model, global_state, datasets, config, on_step)
    if ledger is not None:
        check_private_run(stats, ledger)
    residual = local_one_factor_residual(global_state, tensors)
    warning = local_update_warning(residual)
    if warning:
        out.note(f"warning: {warning}")
        warned.append(warning)
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
            **({"dp": stats.dp} if stats.dp is not None else {}),
        }
    }
    header = local_header(global_state, stats.samples, client or "", info, ledger)
    log = "".join(json.dumps(r, sort_keys=True) + "\n" for r in stats.log).encode("utf-8")
    header = write_artifact(
        out_path, header, tensors, force, sign=sign_with(signer), also=[FileWrite(log_path, log)]
    )
    written(
        out,
        out_path,
        header,
        {
            **stats.summary(),
            "log": str(log_path),
            "client_id": client or None,
            "device": str(model.device),
            "threads": threads,
            "one_factor_residual": round(residual, 6),
            "warnings": warned,
            **(
                {"dp_epsilon": ledger.epsilon, "dp_delta": ledger.delta, "dp_rounds": ledger.rounds}
                if ledger is not None
                else {}
            ),
        },
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
    kurtosis_coeff: Annotated[
        float,
        typer.Option("--kurtosis-coeff", help="c of the adaptive ratio alpha + min(cap, c ln kurtosis)."),
    ] = 0.1,
    kurtosis_cap: Annotated[
        float,
        typer.Option("--kurtosis-cap", help="cap of the adaptive ratio: at most this much above alpha."),
    ] = 0.11,
    no_rescale: Annotated[
        bool, typer.Option("--no-rescale", help="Do not restore the L1 norm of kept values.")
    ] = False,
    value_dtype: Annotated[
        str, typer.Option("--value-dtype", help="fp32 (the paper's accounting), bf16 or fp16.")
    ] = "bf16",
    method: Annotated[str, typer.Option("--method", help=f"Method: {METHODS_HELP}.")] = "fedsrd",
    upload_drop: Annotated[
        float, typer.Option("--upload-drop", help="fed-dare: drop probability p of each upload element.")
    ] = 0.9,
    secure: Annotated[
        bool,
        typer.Option(
            "--secure",
            help="Write a masked upload for a secure round (needs --roster, --agreement-key and --trust):"
            " the coordinator learns only the sum of the roster's uploads.",
        ),
    ] = False,
    roster_path: Annotated[
        Path | None, typer.Option("--roster", help="The secure round's roster, signed by the coordinator.")
    ] = None,
    agreement_key: Annotated[
        Path | None,
        typer.Option("--agreement-key", help="This site's NAME.agreement.key (`fedsrd agreement-key`)."),
    ] = None,
    min_sites: Annotated[
        int,
        typer.Option("--min-sites", help="Refuse a secure roster of fewer sites (at least 2)."),
    ] = 2,
    encrypt_to: EncryptToOpt = None,
    sign_key: SignKeyOpt = None,
    trust_dir: TrustOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Client: turn a locally trained adapter into this round's upload (sparse for FedSRD; masked
    with --secure)."""
    from fedsrd_cli.algorithms import get_algorithm
    from fedsrd_cli.config import SparsifyConfig
    from fedsrd_cli.files.artifacts import write_artifact
    from fedsrd_cli.files.atomic import ensure_writable
    from fedsrd_cli.site.uploads import make_upload
    from fedsrd_cli.trust.signing import COORDINATOR, read_verified

    out = Output(json_mode)
    check_client_id(client)
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
    if secure and (roster_path is None or agreement_key is None or trust is None):
        raise UsageError("--secure needs --roster, --agreement-key and --trust (the other sites' keys)")
    if not secure and (roster_path is not None or agreement_key is not None):
        raise UsageError("--roster and --agreement-key belong to a secure round: add --secure")
    if secure and method not in ("fedsrd", "fedsrd-e"):
        raise UsageError(f"a secure round runs FedSRD-e's route; --method {method} has no secure upload")
    seal = seal_for(encrypt_to, trust_dir)
    ensure_writable(
        out_path, force, [("--global", global_path), ("--local", local), ("--roster", roster_path)]
    )
    global_state = read_verified(global_path, "state", trust, accept=(COORDINATOR, client))
    if secure:
        from fedsrd_cli.site.uploads import make_masked_upload, roster_keys
        from fedsrd_cli.trust.agreement import AgreementKey
        from fedsrd_cli.trust.roster import read_roster

        assert trust is not None and roster_path is not None and agreement_key is not None
        key = AgreementKey.load(agreement_key)
        if key.party != client:
            raise UsageError(f"--agreement-key {agreement_key} is {key.party!r}'s, not {client!r}'s")
        roster = read_roster(roster_path, trust)
        published = roster_keys(trust, roster, client, key, f"--agreement-key {agreement_key}")
        payload, samples = make_masked_upload(
            global_state, local, client, samples, roster, key, published, max(min_sites, 2)
        )
    else:
        payload, samples = make_upload(global_state, local, client, samples, method, config, out.track)
    header = write_artifact(
        out_path, payload.header, payload.tensors, force, sign=sign_with(signer), seal=seal
    )
    if samples == 0:
        out.note("note: no sample count recorded; --weighting samples will refuse this upload")
    written(
        out,
        out_path,
        header,
        {
            "client_id": client,
            "num_samples": samples,
            "tensors": len(header.layout or payload.tensors),
            **({"roster": header.info["secure"]["roster"]} if secure else {}),
        },
        sealed_for=seal,
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
    from fedsrd_cli.files.artifacts import write_artifact
    from fedsrd_cli.files.atomic import ensure_writable
    from fedsrd_cli.trust.signing import COORDINATOR, read_verified

    out = Output(json_mode)
    signer, trust = trust_from_flags(sign_key, trust_dir)
    ensure_writable(out_path, force, [("--global", global_path), ("--broadcast", broadcasts)])
    accept = (COORDINATOR,) if signer is None else (COORDINATOR, signer.name)
    global_state = read_verified(global_path, "state", trust, accept=accept)
    chain = [read_verified(path, "broadcast", trust) for path in broadcasts]
    payload = apply_chain(global_state, chain)
    header = write_artifact(out_path, payload.header, payload.tensors, force, sign=sign_with(signer))
    written(
        out,
        out_path,
        header,
        {"verified": True, "broadcasts_applied": len(chain), "from_round": global_state.header.round},
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
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Tokens generated per answer (--generate, --answers).")
    ] = 32,
    answers: Annotated[
        int, typer.Option("--answers", help="Show the greedy answers to the first N examples of each file.")
    ] = 0,
    task_metrics: MetricsOpt = False,
    metrics_max_new_tokens: MetricsMaxNewTokensOpt = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per forward pass.")] = 8,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per example.")] = 512,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, fp32, bf16 or fp16.")] = "auto",
    threads: ThreadsOpt = None,
    trust_dir: TrustOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Loss and perplexity on response tokens (per file and mean); the base alone without an adapter.

    --metrics adds the task metric of files whose records carry a task (the real-task suite:
    accuracy, GSM8K exact match, MBPP pass@1), the base model's beside a state's or adapter's.
    With --trust, --global must be signed by `coordinator`.
    """
    import json

    from fedsrd_cli.files.artifacts import short
    from fedsrd_cli.files.atomic import ensure_writable, write_bytes_atomic
    from fedsrd_cli.math.threads import use_threads
    from fedsrd_cli.site.data import load_datasets
    from fedsrd_cli.site.evaluation import evaluate
    from fedsrd_cli.site.model import (
        check_adapter_base,
        check_fingerprint,
        load_adapter,
        load_base,
        set_global,
    )
    from fedsrd_cli.trust.signing import read_verified

    out = Output(json_mode)
    if global_path is not None and adapter is not None:
        raise UsageError("give --global or --adapter, not both")
    if out_path is not None:
        ensure_writable(out_path, force, [("--global", global_path), ("--data", data)])
    _, trust = trust_from_flags(None, trust_dir)
    datasets = load_datasets(data)
    global_state = None
    if global_path is not None:
        global_state = read_verified(global_path, "state", trust)
        check_fingerprint(base, global_state)
    if adapter is not None:
        check_adapter_base(adapter, base)
    if task_metrics:  # refused, or the sandbox's layers said, before the model loads
        from fedsrd_cli.site.task_eval import file_kind, sandbox_note

        if all(file_kind(ds) is None for ds in datasets):
            raise UsageError(
                "--metrics: no --data file has task records (the real-task suite's files do:"
                " `fedsrd demo-assets --suite real`)"
            )
        note = sandbox_note(datasets)
        if note is not None:
            out.note(note)
    use_threads(threads)
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
    metrics = evaluate(
        model,
        datasets,
        batch_size,
        max_length,
        generate,
        max_new_tokens,
        answers=answers,
        tasks=task_metrics,
        task_max_new_tokens=metrics_max_new_tokens,
    )
    result = {**source, "base": str(base), **metrics}
    beside = None
    if task_metrics and (global_state is not None or adapter is not None):
        from fedsrd_cli.site.evaluation import file_labels
        from fedsrd_cli.site.task_eval import base_task_scores

        names = file_labels([ds.path for ds in datasets])
        beside = base_task_scores(model, datasets, names, batch_size, max_length, metrics_max_new_tokens)
        result["base_model_tasks"] = beside
    if out_path is not None:
        text = json.dumps(result, indent=2, sort_keys=True) + "\n"
        write_bytes_atomic(out_path, text.encode("utf-8"), force)
    label = (
        f"round {global_state.header.round} ({short(global_state.header.content_hash)})"
        if global_state is not None
        else (str(adapter) if adapter is not None else "base model only")
    )
    show_em = "exact_match" in metrics["mean"]
    show_task = "task_score" in metrics["mean"]
    headers = ["data", "examples", "tokens", "loss", "perplexity"] + (["exact match"] if show_em else [])
    headers += (["task metric", "score"] + (["base model"] if beside else [])) if show_task else []
    table = data_table(*headers, title=f"eval: {label}")
    for name, m in metrics["files"].items():
        row = [name, str(m["examples"]), str(m["tokens"]), f"{m['loss']:.4f}", f"{m['perplexity']:.2f}"]
        if show_em:
            row.append(f"{m['exact_match']:.2%}")
        if show_task:
            task = m.get("task")
            row += [task["metric"], f"{task['score']:.2%}"] if task else ["", ""]
            if beside:
                row.append(f"{beside['files'][name]:.2%}" if name in beside["files"] else "")
        table.add_row(*row)
    if len(metrics["files"]) > 1:
        mean = metrics["mean"]
        row = ["mean", "", "", f"{mean['loss']:.4f}", f"{mean['perplexity']:.2f}"]
        if show_em:
            row.append(f"{mean['exact_match']:.2%}")
        if show_task:
            row += ["", f"{mean['task_score']:.2%}"] + ([f"{beside['mean']:.2%}"] if beside else [])
        table.add_row(*row)
    shown = [(name, a) for name, m in metrics["files"].items() for a in m.get("answers", [])]
    if not shown:
        out.result(result, table)
        return
    answers_table = data_table("data", "prompt", "reference", "answer", title="answers")
    for name, a in shown:  # one line per row: a newline inside a text shows as backslash-n
        cells = (a["prompt"].strip(), a["reference"], a["answer"].strip())
        answers_table.add_row(name, *(cell.replace("\n", "\\n") for cell in cells))
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
    from fedsrd_cli.files.export import export_adapter
    from fedsrd_cli.site.model import check_fingerprint
    from fedsrd_cli.trust.signing import read_verified

    out = Output(json_mode)
    _, trust = trust_from_flags(None, trust_dir)
    global_state = read_verified(global_path, "state", trust)
    if base is not None:
        check_fingerprint(base, global_state)
    # A GGUF file cannot be a PEFT base_model_name_or_path (docs/deployment.md shows how to load it).
    named = str(base) if base is not None and base.suffix.lower() != ".gguf" else None
    report = export_adapter(global_state, out_dir, named, force)
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
