"""A client's training: train-local (loads the model: transformers/peft are imported in its body)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedsrd_cli.cli.app import command
from fedsrd_cli.cli.options import (
    BaseOpt,
    BaseQuantizationOpt,
    DataOpt,
    DpDeltaOpt,
    DpEpsilonOpt,
    DpMaxGradNormOpt,
    DpNoiseMultiplierOpt,
    DpRoundsOpt,
    ForceOpt,
    GlobalOpt,
    JsonOpt,
    QuietOpt,
    SignKeyOpt,
    ThreadsOpt,
    TrustOpt,
    check_client_id,
    sign_with,
    trust_from_flags,
)
from fedsrd_cli.cli.render import written
from fedsrd_cli.errors import UsageError
from fedsrd_cli.limits import DEFAULT_DP_MAX_GRAD_NORM
from fedsrd_cli.output import Output, human_duration


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
    base_quantization: BaseQuantizationOpt = "none",
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
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            help="Train only the first R rank components of the global state's LoRA (R <= its rank;"
            " the upload then carries R; default: all).",
            show_default=False,
        ),
    ] = None,
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
    signed by `coordinator` (or by this client's key). Under torchrun (--nproc-per-node N) it
    trains data parallel over N processes of this machine; process 0 alone prints and writes.
    """
    import hashlib
    import json
    import time

    import click

    from fedsrd_cli.algorithms.diagnostics import (
        local_one_factor_residual,
        local_update_warning,
        long_local_training_warning,
    )
    from fedsrd_cli.files.artifacts import write_artifact
    from fedsrd_cli.files.atomic import FileWrite, ensure_writable
    from fedsrd_cli.math.threads import use_threads
    from fedsrd_cli.site import distributed
    from fedsrd_cli.site.data import load_datasets
    from fedsrd_cli.site.model import check_fingerprint, load_base, resolve_device
    from fedsrd_cli.site.quantization import NONE, check_quantization
    from fedsrd_cli.site.training import (
        TrainConfig,
        check_private_run,
        check_site_rank,
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
        site_rank=rank,
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
    check_quantization(base_quantization, base, device)
    ranks = distributed.Ranks.from_environment()
    if ranks is not None:
        distributed.refuse_distributed(ranks, record_dp is not None, device)
        if not ranks.leader:
            out = Output(json_mode=False, quiet=True)  # process 0 prints for the site
    signer, trust = trust_from_flags(sign_key, trust_dir)
    log_path = Path(str(out_path) + ".log.jsonl")
    inputs = [("--base", base), ("--global", global_path), ("--data", data), ("--dp-ledger", dp_ledger)]
    ensure_writable(out_path, force, inputs)
    ensure_writable(log_path, force, inputs)
    accept = (COORDINATOR,) if signer is None else (COORDINATOR, signer.name)
    global_state = read_verified(global_path, "state", trust, accept=accept)
    check_site_rank(rank, global_state, record_dp is not None)
    fingerprint = check_fingerprint(base, global_state)
    if alternate:
        config = config.alternating(global_state.header.round + 1)
    datasets = load_datasets(data)
    if ranks is not None:
        distributed.start(ranks, resolve_device(device))
        click.get_current_context().call_on_close(distributed.stop)
        examples = repr([d.examples for d in datasets]).encode("utf-8")
        distributed.check_same(
            ranks,
            {
                "--out": str(out_path.resolve()),
                "--global": global_state.header.content_hash,
                "--base": fingerprint,
                "--data": hashlib.sha256(examples).hexdigest(),
                "--client": client or "",
                "training settings": repr(config),
                "--sign-key": "" if signer is None else signer.name,
            },
        )
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
    model = load_base(base, device, dtype, base_quantization, for_training=True)
    total = config.total_steps(sum(len(d.examples) for d in datasets))
    # The method that wrote the global state; None for a round-0 state, which no method wrote.
    methods = (global_state.header.method,) if global_state.header.method else None
    warned: list[str] = []  # every warning line, also in the --json result
    long_training = long_local_training_warning(total, lr, methods)
    if long_training:
        out.note(f"warning: {long_training}")
        warned.append(long_training)
    processes = 1 if ranks is None else ranks.world
    out.note(
        f"training {total:,} steps of {config.batch_size * config.grad_accum} examples on {model.device}"
        f" ({threads} thread{'s' if threads != 1 else ''}"
        + (f" in each of {processes} processes)" if processes > 1 else ")")
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

        tensors, stats = train_local(model, global_state, datasets, config, on_step, ranks)
    if ranks is not None and not ranks.leader:
        return  # process 0 took the same steps and writes the site's one local state
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
    header = local_header(
        global_state, stats.samples, client or "", info, ledger, base_quantization, config.site_rank
    )
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
            **({"base_quantization": base_quantization} if base_quantization != NONE else {}),
            **({"site_rank": rank} if rank is not None else {}),
            "threads": threads,
            "processes": processes,
            "one_factor_residual": round(residual, 6),
            "warnings": warned,
            **(
                {"dp_epsilon": ledger.epsilon, "dp_delta": ledger.delta, "dp_rounds": ledger.rounds}
                if ledger is not None
                else {}
            ),
        },
    )
