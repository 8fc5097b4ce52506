"""A global state as a model: eval (loads the model, as train-local does), export (a PEFT adapter)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedsrd_cli.cli.app import command
from fedsrd_cli.cli.options import (
    BaseOpt,
    BaseQuantizationOpt,
    DataOpt,
    ForceOpt,
    GlobalOpt,
    JsonOpt,
    MetricsMaxNewTokensOpt,
    MetricsOpt,
    ThreadsOpt,
    TrustOpt,
    trust_from_flags,
)
from fedsrd_cli.errors import UsageError
from fedsrd_cli.output import Output, data_table, human_bytes, key_value_table


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
    base_quantization: BaseQuantizationOpt = "none",
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

    from fedsrd_cli.files.atomic import ensure_writable, write_bytes_atomic
    from fedsrd_cli.files.safetensors_io import short
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
    from fedsrd_cli.site.quantization import NONE, check_quantization
    from fedsrd_cli.trust.signing import read_verified

    out = Output(json_mode)
    if global_path is not None and adapter is not None:
        raise UsageError("give --global or --adapter, not both")
    check_quantization(base_quantization, base, device)
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
    model = load_base(base, device, dtype, base_quantization)
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
    if base_quantization != NONE:
        result["base_quantization"] = base_quantization
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
    ) + (f", base in {base_quantization}" if base_quantization != NONE else "")
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
