"""`fedsrd simulate`: every client and the coordinator in one process, for comparing methods.

Each round runs the same functions the commands run, on real files: `training.train_local`
per participating client, `Algorithm.upload` (the client's upload, written with
`artifacts.write_artifact` and read back, so its size is the real bytes), `Algorithm.aggregate`
and `Algorithm.broadcast` (the coordinator), `protocol.apply_broadcast` (what every client
does with the broadcast; it checks the result hash), and `evaluation.evaluate` on the eval files.
No math is repeated here.

`simulate` is the entry: for every algorithm, seed and round it picks the clients that train
(`_choose`), trains them, uploads, aggregates, broadcasts, scores the next global state and
appends the round's record to results.json; at the end it writes the report. Its settings are
config.py's SimulateConfig, what it keeps on disk and how a rerun resumes is records.py, and
results.md and the plot are report.py.

Layout of RESULTS_DIR:
    config.json          the run's settings; a rerun must give the same ones (only --rounds may grow)
    results.json         per algorithm, per seed, per round: eval losses, bytes, server seconds
                         (and with --metrics each eval file's task score and their mean)
    results.md           a table of the final round (mean +- std over seeds); with --metrics the
                         task scores of the final round and the mean task score of every round
    traffic_vs_loss.png  mean eval loss against cumulative traffic per client (with --metrics a
                         second panel: the mean task score)
    work/ALG/seed-S/     global-rT.safetensors, and round-T/ with uploads, aggregate, broadcast
    assets/              the demo's base model (--model) and data (only when no --base was given)

results.json is rewritten (atomically) after every completed round, so a killed run resumes
from its last completed global state.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from fedsrd_cli.errors import MismatchError, UsageError
from fedsrd_cli.simulation.config import SimulateConfig
from fedsrd_cli.simulation.records import (
    RoundRecord,
    load_results,
    privacy_summary,
    start_run,
    with_recorded_defaults,
    write_json,
)
from fedsrd_cli.simulation.report import plot_traffic_vs_loss, render_markdown, summary_table, task_label


def _choose(config: SimulateConfig, seed: int, round_index: int) -> list[int]:
    """Indices of the clients that train in this round: all, a seeded choice of --sample-clients
    (the same for every algorithm), or under organisation-level DP a secret Poisson sample."""
    n = len(config.client_data)
    if config.organisation_dp is not None:
        from fedsrd_cli.privacy.randomness import SecretRandom

        return SecretRandom().poisson_sample(n, config.organisation_dp[2])
    if config.participants == n:
        return list(range(n))
    rng = random.Random(f"fedsrd-simulate:{seed}:{round_index}")
    return sorted(rng.sample(range(n), config.participants))


def client_train_seed(seed: int, round_index: int, client_index: int) -> int:
    """The `train-local --seed` a client uses in a round: differs per seed, round and client."""
    return (seed * 1_000_003 + round_index * 1009 + client_index) % 2**32


def simulate(
    config: SimulateConfig,
    out_dir: str | Path,
    on_progress: Callable[[int, int, str], None] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the simulation; write results.json, results.md and traffic_vs_loss.png.

    on_progress(done, total, label) is called after each completed round, counting the
    rounds of every algorithm and seed. threads: torch's thread count; None picks one per idle
    core before every client's training (math.threads.use_threads), as the load may change
    during a long run. Returns a summary: the output paths, the rounds run now and those
    found done.
    """
    from fedsrd_cli.algorithms import get_algorithm
    from fedsrd_cli.algorithms.diagnostics import mean_update_fidelity, update_error_warning
    from fedsrd_cli.algorithms.protocol import apply_broadcast, default_download_seed, initial_state
    from fedsrd_cli.algorithms.secure import masked_upload, next_residual, secure_aggregate
    from fedsrd_cli.config import ALIGNABLE_METHODS, AggregateConfig
    from fedsrd_cli.files.adapters import read_local
    from fedsrd_cli.files.artifacts import read_artifact, write_artifact
    from fedsrd_cli.files.atomic import write_files_atomic
    from fedsrd_cli.files.model_spec import lora_module_shapes
    from fedsrd_cli.files.residual import residual_write
    from fedsrd_cli.limits import MAX_SERVER_LR
    from fedsrd_cli.math.extrapolation import fedexp_step
    from fedsrd_cli.math.threads import use_threads
    from fedsrd_cli.site.data import load_datasets
    from fedsrd_cli.site.evaluation import evaluate
    from fedsrd_cli.site.model import load_base, set_global
    from fedsrd_cli.site.training import (
        TrainConfig,
        check_private_run,
        local_header,
        private_training,
        train_local,
    )
    from fedsrd_cli.trust.agreement import AgreementKey
    from fedsrd_cli.trust.roster import make_roster

    out_dir = Path(out_dir)
    config = with_recorded_defaults(out_dir, config)
    results = load_results(out_dir, config)
    runs: dict[str, Any] = results.setdefault("runs", {})
    seeds = config.seed_values()
    total = len(config.algorithms) * len(seeds) * config.rounds
    done_before = sum(
        min(len(runs.get(a, {}).get(str(s), [])) - 1, config.rounds)
        for a in config.algorithms
        for s in seeds
        if runs.get(a, {}).get(str(s))
    )
    if done_before >= total:
        return _finish(out_dir, config, results, ran=[], done_before=done_before)

    agreement: dict[str, Any] = {}
    published: dict[str, bytes] = {}
    if config.secure:  # the clients' X25519 keys, made for this run (trust/agreement.py)
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        for client in config.client_ids:
            agreement[client] = AgreementKey(client, X25519PrivateKey.generate())
            published[client] = agreement[client].public
    use_threads(threads)
    # Every input is read and checked before anything is written.
    client_sets = [load_datasets([path]) for path in config.client_data]
    eval_sets = load_datasets(list(config.eval_data))
    if config.task_metrics:
        from fedsrd_cli.site.task_eval import file_kind

        kinds = {name: file_kind(ds) for name, ds in zip(config.eval_names, eval_sets, strict=True)}
        if all(kind is None for kind in kinds.values()):
            raise UsageError(
                "--metrics: no --eval-data file has task records (the real-task suite's files do:"
                " `fedsrd demo-assets --suite real`)"
            )
    lora, module_shapes = lora_module_shapes(config.base, config.targets, config.rank, config.alpha)
    base = load_base(config.base, config.device, "auto", config.base_quantization, for_training=True)
    start_run(out_dir, config)
    ran: list[dict[str, Any]] = []
    done = done_before
    # Every start has B = 0, so its model is exactly the base model whatever the seed's A: round 0
    # is scored once per run, not once per seed (on a CPU the real-task scores take minutes).
    initial_eval: dict[str, Any] = {}

    def scores(state_path: Path) -> tuple[dict[str, float], float, dict[str, Any]]:
        """(eval loss per file, their mean, the round's task scores for its record's extra)."""
        state = read_artifact(state_path, kind="state")
        set_global(base, state)
        metrics = evaluate(
            base,
            eval_sets,
            config.eval_batch_size,
            config.max_length,
            tasks=config.task_metrics,
            task_max_new_tokens=config.metrics_max_new_tokens,
        )
        named = dict(zip(config.eval_names, metrics["files"].values(), strict=True))
        losses = {name: float(m["loss"]) for name, m in named.items()}
        tasks: dict[str, Any] = {}
        if config.task_metrics:
            tasks["task_scores"] = {
                name: float(m["task"]["score"]) for name, m in named.items() if "task" in m
            }
            tasks["mean_task_score"] = float(metrics["mean"]["task_score"])
            results["tasks"] = {
                name: {
                    "kind": m["task"]["kind"],
                    "metric": m["task"]["metric"],
                    "examples": m["task"]["examples"],
                }
                for name, m in named.items()
                if "task" in m
            }
        return losses, float(metrics["mean"]["loss"]), tasks

    for name in config.algorithms:
        algorithm = get_algorithm(name)
        sparsify_config = config.sparsify_config(algorithm.default_base_sparsity, algorithm.dense_upload)
        for seed in seeds:
            records = runs.setdefault(name, {}).setdefault(str(seed), [])
            run_dir = out_dir / "work" / name / f"seed-{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            if not records:
                start_path = run_dir / "global-r0.safetensors"
                payload = initial_state(module_shapes, lora, seed, base.fingerprint)
                head = write_artifact(start_path, payload.header, payload.tensors, force=True)
                if not initial_eval:
                    initial_eval.update(zip(("eval_loss", "mean", "tasks"), scores(start_path), strict=True))
                records.append(
                    asdict(
                        RoundRecord.initial(
                            0,
                            initial_eval["eval_loss"],
                            initial_eval["mean"],
                            str(start_path.relative_to(out_dir)),
                            head.content_hash,
                            initial_eval["tasks"],
                        )
                    )
                )
                write_json(out_dir / "results.json", results)
            while len(records) - 1 < config.rounds:
                last = records[-1]
                round_index = last["round"] + 1
                state_path = out_dir / last["global_state"]
                global_state = read_artifact(state_path, kind="state")
                if global_state.header.content_hash != last["global_hash"]:
                    raise MismatchError(
                        f"{state_path}: is not the global state results.json recorded for {name},"
                        f" seed {seed}, round {last['round']}; the run directory was changed"
                    )
                round_dir = run_dir / f"round-{round_index}"
                round_dir.mkdir(exist_ok=True)
                chosen = _choose(config, seed, round_index)
                only = algorithm.trained_factor(round_index)  # None: clients train both factors
                roster = None
                if config.secure:  # every chosen client masks for every other one
                    head = global_state.header
                    names = [config.client_ids[i] for i in chosen]
                    roster = make_roster(
                        head.content_hash, round_index, names, 1, config.secure_clip,
                        config.secure_density, config.word_bits, config.step_rule == "fedexp",
                    )  # fmt: skip
                uploads, upload_sizes, train_losses = [], [], []
                trained: list[dict[str, Any]] = []  # every chosen client's factors: the exact mean update
                for index in chosen:
                    client = config.client_ids[index]
                    train_config = TrainConfig(
                        steps=config.local_steps,
                        lr=config.lr,
                        batch_size=config.batch_size,
                        max_length=config.max_length,
                        seed=client_train_seed(seed, round_index, index),
                        device=config.device,
                        prox_mu=config.prox_mu if name == "fedprox" else 0.0,
                        site_rank=None if config.site_ranks is None else config.site_ranks[index],
                    ).training_only(only)
                    ledger = None
                    if config.record_dp is not None:
                        train_config, ledger = private_training(
                            config.record_dp,
                            global_state,
                            client,
                            client_sets[index],
                            train_config,
                        )
                    use_threads(threads)
                    tensors, stats = train_local(base, global_state, client_sets[index], train_config)
                    if ledger is not None:
                        check_private_run(stats, ledger)
                    train_losses.append(stats.final_loss)
                    trained.append(tensors)
                    info = {"train": {**asdict(train_config), "final_loss": stats.final_loss}}
                    local_path = round_dir / f"local-{client}.safetensors"
                    write_artifact(
                        local_path,
                        local_header(
                            global_state,
                            stats.samples,
                            client,
                            info,
                            ledger,
                            config.base_quantization,
                            train_config.site_rank,
                        ),
                        tensors,
                        force=True,
                    )
                    if roster is None:
                        upload = algorithm.upload(
                            global_state, read_local(local_path), client, stats.samples, sparsify_config
                        )
                    else:  # --secure: the client's masked projection for this round's roster
                        carried = _carried(run_dir, client, global_state)
                        upload, left = masked_upload(
                            global_state, read_local(local_path), client, stats.samples, roster,
                            agreement[client], published, carried,
                        )  # fmt: skip
                        if roster.density < 1.0:  # what the public positions left, for later rounds
                            kept = next_residual(global_state, client, left)
                            write_files_atomic(
                                [residual_write(round_dir / f"residual-{client}.safetensors", kept)], True
                            )
                    upload_path = round_dir / f"upload-{client}.safetensors"
                    write_artifact(upload_path, upload.header, upload.tensors, force=True)
                    local_path.unlink()
                    uploads.append(read_artifact(upload_path, kind=upload.header.kind))
                    upload_sizes.append(upload_path.stat().st_size)

                aggregate_config = AggregateConfig(
                    method=name,
                    align=config.align and name in ALIGNABLE_METHODS,
                    rank_padding=config.rank_padding,
                    update_spread=config.step_rule == "fedexp",
                )
                if config.organisation_dp is not None:
                    aggregate_config = replace(
                        aggregate_config, organisation_dp=config.organisation_settings(len(chosen))
                    )
                start = time.perf_counter()
                if roster is None:
                    aggregate = algorithm.aggregate(global_state, uploads, aggregate_config)
                else:
                    aggregate = secure_aggregate(global_state, uploads, roster, aggregate_config)
                server = time.perf_counter() - start
                aggregate_path = round_dir / "aggregate.safetensors"
                write_artifact(aggregate_path, aggregate.header, aggregate.tensors, force=True)
                aggregate_file = read_artifact(aggregate_path, kind="aggregate")
                broadcast_config = config.broadcast_config(
                    algorithm.default_download_sparsity,
                    default_download_seed(global_state, aggregate_file),
                    round_index,
                )
                start = time.perf_counter()
                broadcast, next_state = algorithm.broadcast(global_state, aggregate_file, broadcast_config)
                server += time.perf_counter() - start
                broadcast_path = round_dir / "broadcast.safetensors"
                write_artifact(broadcast_path, broadcast.header, broadcast.tensors, force=True)
                # What every client does with the broadcast; it checks the coordinator's result hash.
                followed = apply_broadcast(global_state, read_artifact(broadcast_path, kind="broadcast"))
                next_path = run_dir / f"global-r{round_index}.safetensors"
                next_head = write_artifact(next_path, next_state.header, next_state.tensors, force=True)
                if next_head.content_hash != broadcast.header.result_hash:
                    raise MismatchError(f"{next_path}: differs from the state its broadcast announces")
                del followed

                weights = [c["weight"] for c in aggregate_file.header.info["clients"]]
                fidelity = (
                    {}
                    if roster is not None or config.organisation_dp is not None  # W is not the mean of D_i
                    else {
                        "mean_update_fidelity": mean_update_fidelity(
                            global_state, trained, weights, aggregate_file, next_state.tensors
                        )
                    }
                )
                upload_figures = aggregate_file.header.info.get("upload_fidelity")
                if upload_figures:
                    fidelity["upload_fidelity"] = {k: upload_figures[k] for k in ("norm_ratio", "cosine")}
                spread = aggregate_file.header.info.get("update_spread")
                if spread:  # the coordinator's eta; a secure sum records only this one
                    fidelity["extrapolation"] = {"coordinator": spread["extrapolation"]}
                if spread and "mean_update_fidelity" in fidelity and upload_figures:
                    # FedExP's eta from the uploads (the coordinator's) and from the exact updates
                    exact_mean = fidelity["mean_update_fidelity"]["target"]["exact_norm"]
                    own = upload_figures["clients"]  # each site's exact norm, by client id
                    exact_sq = sum(
                        c["weight"] * own[c["client_id"]]["exact_norm"] ** 2
                        for c in aggregate_file.header.info["clients"]
                    )
                    fidelity["extrapolation"] = {
                        "coordinator": spread["extrapolation"],
                        "exact": round(fedexp_step(exact_sq, exact_mean**2, MAX_SERVER_LR), 6),
                    }
                step_taken = broadcast.header.info.get("server_lr", 1.0)
                del trained
                losses, mean_loss, task_scores = scores(next_path)
                warning = update_error_warning(broadcast.header)  # what `broadcast` would print
                download = broadcast_path.stat().st_size
                n = len(config.client_data)
                traffic = sum(upload_sizes) / n + download
                records.append(
                    asdict(
                        RoundRecord(
                            round=round_index,
                            eval_loss=losses,
                            mean_eval_loss=mean_loss,
                            participants=[config.client_ids[i] for i in chosen],
                            upload_bytes=sum(upload_sizes) / max(len(upload_sizes), 1),
                            download_bytes=download,
                            traffic_per_client=traffic,
                            cumulative_traffic_per_client=last["cumulative_traffic_per_client"] + traffic,
                            server_seconds=server,
                            train_loss=sum(train_losses) / len(train_losses) if train_losses else None,
                            global_state=str(next_path.relative_to(out_dir)),
                            global_hash=next_head.content_hash,
                            extra={
                                "download_sparsity": broadcast_config.download_sparsity,
                                "update_error": broadcast.header.info.get("update_error", {}).get("overall"),
                                "update_step": broadcast.header.info["update_step"]["max"],
                            }
                            | ({"server_lr": step_taken} if step_taken != 1.0 else {})
                            | (
                                {"one_factor_residual": broadcast.header.info["one_factor_residual"]}
                                if "one_factor_residual" in broadcast.header.info
                                else {}
                            )
                            | fidelity
                            | ({"warning": warning} if warning else {})
                            | privacy_summary(next_state.header.privacy)
                            | ({"prox_mu": config.prox_mu} if name == "fedprox" else {})
                            | ({"trained_factor": only} if only else {})
                            | task_scores,
                        )
                    )
                )
                write_json(out_dir / "results.json", results)
                ran.append({"algorithm": name, "seed": seed, "round": round_index})
                done += 1
                if on_progress is not None:
                    label = f"{name} seed {seed} round {round_index}: loss {mean_loss:.4f}"
                    label += task_label(task_scores, results.get("tasks", {}))
                    on_progress(done, total, label + (f"; warning: {warning}" if warning else ""))
    return _finish(out_dir, config, results, ran, done_before)


def _finish(
    out_dir: Path,
    config: SimulateConfig,
    results: dict[str, Any],
    ran: list[dict[str, Any]],
    done_before: int,
) -> dict[str, Any]:
    table = summary_table(config, results)
    from fedsrd_cli.files.atomic import write_bytes_atomic

    write_bytes_atomic(out_dir / "results.md", render_markdown(config, table).encode("utf-8"), force=True)
    plot_traffic_vs_loss(config, results, out_dir / "traffic_vs_loss.png")
    return {
        "out": str(out_dir),
        "results": str(out_dir / "results.json"),
        "table": str(out_dir / "results.md"),
        "plot": str(out_dir / "traffic_vs_loss.png"),
        "rounds_run_now": ran,
        "rounds_already_done": done_before,
        "summary": table,
    }


def _carried(run_dir: Path, client: str, global_state: Any) -> dict | None:
    """The client's residual from its latest earlier secure round of this run (each round folder
    keeps the residual its upload left), checked against this round; None before its first."""
    from fedsrd_cli.algorithms.secure import carried_residual
    from fedsrd_cli.files.residual import read_residual

    now = global_state.header.round + 1
    for earlier in range(now - 1, 0, -1):
        path = run_dir / f"round-{earlier}" / f"residual-{client}.safetensors"
        if path.exists():
            return carried_residual(read_residual(path), global_state, client, str(path))
    return None
