"""Issue 21, "what a new user still hit": a regression test per row of its table, and the walk
of every numeric option of every command (0, -1, a huge value, nan, inf: one line, exit 2,
nothing written, when the value is outside the option's range)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from fedsrd_cli import entry
from fedsrd_cli.cli import app
from fedsrd_cli.flower.settings import ServerSettings, SiteSettings
from fedsrd_cli.limits import LIMITS, limit_of

from ..conftest import TINY_RECORDS, write_jsonl
from .test_cli import run
from .test_cli_surprises import FEDSRD, make_world, refused, subprocess_env

runner = CliRunner()


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    return make_world(tmp_path)


ROOT = Path(__file__).resolve().parents[2]
PROBES = ("0", "-1", "1" + "0" * 30, "1e300", "nan", "inf", "-inf")


def numeric_options() -> list[tuple[str, click.Option]]:
    command = typer.main.get_command(app)
    found = []
    for name, sub in command.commands.items():
        for param in sub.params:
            if isinstance(param, click.Option) and isinstance(
                param.type, (click.types.IntParamType, click.types.FloatParamType)
            ):
                found.append((name, param))
    return found


def required_args(name: str, folder: Path) -> list[str]:
    """The command's required options and arguments, each naming a file that does not exist."""
    sub = typer.main.get_command(app).commands[name]
    args: list[str] = []
    for param in sub.params:
        if not param.required:
            continue
        value = "site-a" if param.name in ("client",) else str(folder / f"missing-{param.name}")
        if isinstance(param, click.Argument):
            args.append(value)
        else:
            args += [param.opts[0], value]
    return args


@pytest.mark.parametrize("name, option", numeric_options(), ids=lambda x: getattr(x, "opts", [x])[0])
def test_every_numeric_option_is_bounded_before_any_work(name, option, tmp_path):
    limit = limit_of(name, option.opts[0])
    assert limit is not None, f"{name} {option.opts[0]} has no range in limits.py"
    for probe in PROBES:
        value = float(probe)
        is_int = isinstance(option.type, click.types.IntParamType)
        if is_int and not re.fullmatch(r"-?\d+", probe):
            outside = True  # not an integer at all: click's own message, one line too
        else:
            outside = not limit.holds(int(probe) if is_int else value)
        if not outside:
            continue
        args = [name, *required_args(name, tmp_path), option.opts[0], probe]
        result = runner.invoke(app, args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2, (args, result.output)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.output)
        assert "Traceback" not in result.output
        assert list(tmp_path.iterdir()) == [], args  # nothing written


def test_every_flag_s_range_is_declared_once_for_the_flower_settings_too():
    declared = {f"--{key}" for key in (f.replace("_", "-") for f in ServerSettings.__dataclass_fields__)}
    numeric = [
        f"--{name.replace('_', '-')}"
        for name, field in ServerSettings.__dataclass_fields__.items()
        if field.type in ("int", "float")
    ]
    assert all(flag in LIMITS or flag in ("--seed",) for flag in numeric), set(numeric) - set(LIMITS)
    assert declared  # the keys are the flags' names
    good = {"out": "o", "base": "b"}
    for key, bad in (
        ("rank", 0),
        ("lr", float("nan")),
        ("local-steps", 10**9),
        ("dp-org-sampling-rate", 2.0),
    ):
        with pytest.raises(Exception, match=f"config '{key}' must be in"):
            ServerSettings.from_run_config({**good, key: bad})
    node = {"client-id": "a", "base": "m", "data": "x.jsonl", "state-dir": "s"}
    with pytest.raises(Exception, match="eval-batch-size"):
        SiteSettings.from_node_config({**node, "eval-batch-size": 10**9})


# ------------------------------------------------------------- rows 1-2: threads


def test_every_command_that_computes_takes_threads(tiny_model, tiny_data, tmp_path):
    for name in ("train-local", "eval", "demo-assets", "simulate", "aggregate", "broadcast"):
        options = {o for p in typer.main.get_command(app).commands[name].params for o in p.opts}
        assert "--threads" in options, name
    g0 = tmp_path / "g0.safetensors"
    run("init", "--base", tiny_model, "--rank", 4, "--targets", "q_proj", "--out", g0)
    out = tmp_path / "local.safetensors"
    result = run(
        "train-local", "--base", tiny_model, "--global", g0, "--data", tiny_data, "--steps", 2,
        "--threads", 1, "--out", out, "--json",
    )  # fmt: skip
    assert json.loads(result.stdout)["threads"] == 1


def test_threads_beyond_the_cores_is_one_line(world):
    out = world["tmp"] / "agg.safetensors"
    for value in ("100000", "16384", "1000000000000"):
        line = refused(
            ["aggregate", "--global", world["g0"], "--out", out, *world["uploads"], "--threads", value],
            2,
            "--threads must be in [1,",
            watch=(out,),
        )
        assert "the cores this process may use" in line


# ------------------------------------------------------------- rows 3, 6, 7: init


def test_init_bounds_rank_alpha_and_seed(world):
    out = world["tmp"] / "g.safetensors"
    base = world["base"]
    refused(
        ["init", "--base", base, "--out", out, "--rank", "1" + "0" * 30], 2, "--rank must be in", watch=(out,)
    )
    refused(["init", "--base", base, "--out", out, "--alpha", "1e308"], 2, "--alpha must be in", watch=(out,))
    refused(["init", "--base", base, "--out", out, "--seed", "-1"], 2, "--seed must be in", watch=(out,))
    refused(
        ["init", "--base", base, "--out", out, "--seed", str(2**64)], 2, "--seed must be in", watch=(out,)
    )


def test_a_divergence_caused_by_the_lora_scale_says_so(tiny_model, tiny_data, tmp_path):
    """alpha 1e30 is a finite float32 scale, but once B is not zero the adapted layers overflow."""
    import torch

    from fedsrd_cli.files.artifacts import read_artifact, write_artifact

    g0 = tmp_path / "g0.safetensors"
    run("init", "--base", tiny_model, "--rank", 4, "--alpha", "1e30", "--out", g0)
    state = read_artifact(g0)
    tensors = {n: (t + 0.01 if ".lora_B." in n else t) for n, t in state.iter_tensors()}
    write_artifact(g0, state.header, tensors, force=True)
    out = tmp_path / "local.safetensors"
    args = ["train-local", "--base", tiny_model, "--global", g0, "--data", tiny_data, "--steps", 3]
    line = refused([*args, "--lr", "1e-4", "--out", out], 6, "LoRA scale alpha / r", watch=(out,))
    assert "smaller `init --alpha`" in line and "lower --lr (try" not in line
    assert torch.isfinite(torch.tensor(1e30 / 4, dtype=torch.float32))


# ------------------------------------------------------------- rows 4, 8: bounded before loading


def test_eval_and_train_local_refuse_bad_numbers_before_loading_anything(world):
    missing = world["tmp"] / "no-model"  # a model that does not exist: only a range check can answer 2
    refused(
        ["eval", "--base", missing, "--data", world["data"], "--max-length", "0"],
        2,
        "--max-length must be in",
    )
    refused(
        ["eval", "--base", missing, "--data", world["data"], "--max-length", "-5"],
        2,
        "--max-length must be in",
    )
    out = world["tmp"] / "local.safetensors"
    train = ["train-local", "--base", missing, "--global", world["g0"], "--data", world["data"], "--out", out]
    refused([*train, "--steps", "100000000000000000000"], 2, "--steps must be in", watch=(out,))
    refused([*train, "--epochs", "1e12"], 2, "--epochs must be in", watch=(out,))
    refused(
        [*train, "--grad-accum", "1000000000000", "--steps", "1"], 2, "--grad-accum must be in", watch=(out,)
    )


def test_train_local_says_how_many_steps_and_about_how_long_when_piped(tiny_model, tiny_data, tmp_path):
    g0 = tmp_path / "g0.safetensors"
    run("init", "--base", tiny_model, "--rank", 4, "--targets", "q_proj", "--out", g0)
    args = ["train-local", "--base", tiny_model, "--global", g0, "--data", tiny_data, "--steps", 3]
    done = subprocess.run(
        [str(FEDSRD), *map(str, args), "--out", str(tmp_path / "local.safetensors")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        check=True,
    )
    assert "training 3 steps of 8 examples" in done.stderr
    assert re.search(r"step 1 took [\d.]+ s: about .* for 3 steps", done.stderr)


# ------------------------------------------------------------- row 5: simulate writes nothing it then refuses


def test_simulate_checks_every_input_before_writing(tiny_model, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good = write_jsonl(tmp_path / "good.jsonl", TINY_RECORDS)
    out = tmp_path / "run"
    args = ["simulate", "--base", tiny_model, "--eval-data", good, "--algorithms", "fedsrd", "--rounds", 1,
            "--local-steps", 1, "--batch-size", 2, "--rank", 4, "--alpha", 8, "--out", out]  # fmt: skip
    refused([*args, "--clients-data", empty], 6, "no records", watch=(out,))
    assert not out.exists() or list(out.iterdir()) == []
    shutil.copy(good, empty)  # the file fixed: the same command now runs
    run(*args, "--clients-data", empty)
    assert (out / "results.json").is_file()
    demo = tmp_path / "demo"
    refused(["simulate", "--out", demo, "--rounds", "0"], 2, "--rounds must be in", watch=(demo,))
    refused(["simulate", "--out", demo, "--algorithms", "nope"], 2, "unknown method", watch=(demo,))
    assert not (demo / "assets").exists()


# ------------------------------------------------------------- row 9: sample counts


def test_sample_counts_are_bounded_and_the_coordinator_may_cap_them(world):
    out = world["tmp"] / "up.safetensors"
    args = ["sparsify", "--global", world["g0"], "--local", world["local"], "--client", "c0", "--out", out]
    refused([*args, "--samples", "1e30"], 2, "not a valid integer", watch=(out,))
    refused([*args, "--samples", str(10**13)], 2, "--samples must be in", watch=(out,))
    run(*args, "--samples", 5000)
    agg = world["tmp"] / "agg-capped.safetensors"
    line = refused(
        [
            "aggregate",
            "--global",
            world["g0"],
            "--weighting",
            "samples",
            "--max-samples",
            1000,
            "--out",
            agg,
            out,
        ],
        4,
        "over --max-samples 1,000",
        watch=(agg,),
    )
    assert "5,000" in line


# ------------------------------------------------------------- row 10: data files


def test_data_with_a_byte_order_mark_is_read_and_bad_bytes_name_their_line(world, tiny_model):
    bom = world["tmp"] / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in TINY_RECORDS).encode())
    result = run("eval", "--base", tiny_model, "--data", bom, "--json")
    assert json.loads(result.stdout)["files"]["bom"]["examples"] == len(TINY_RECORDS)
    latin = world["tmp"] / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    refused(["eval", "--base", tiny_model, "--data", latin], 6, f"{latin}:2: not UTF-8")


# ------------------------------------------------------------- rows 11, 12: keygen, Ctrl-C


def test_keygen_into_an_existing_folder_is_refused(world, monkeypatch):
    monkeypatch.chdir(world["tmp"])
    keys = world["tmp"] / "keys"
    refused(
        ["keygen", "--out", "keys"],
        2,
        "is a directory; give --out keys/NAME",
        watch=(Path("keys.key"), Path("keys.pub")),
    )
    assert not (world["tmp"] / "keys.key").exists() and keys.is_dir()


def test_ctrl_c_before_the_command_line_is_imported_is_one_line(monkeypatch, capsys):
    import fedsrd_cli.cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fedsrd_cli.cli, "main", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        entry.main()
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: interrupted")


def test_the_console_script_is_the_interruptible_entry_point():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'fedsrd = "fedsrd_cli.entry:main"' in text


# ------------------------------------------------------------- row 13: export of a GGUF base


def test_export_with_a_gguf_base_names_no_base_and_refuses_missing_folders(world, tiny_gguf):
    from fedsrd_cli.files.model_spec import fingerprint_base

    g = world["tmp"] / "g-gguf.safetensors"
    run("init", "--base", tiny_gguf, "--rank", 4, "--targets", "q_proj", "--out", g)
    assert fingerprint_base(tiny_gguf)
    out = world["tmp"] / "adapter"
    run("export", "--global", g, "--base", tiny_gguf, "--out", out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None
    deep = world["tmp"] / "no" / "such" / "adapter"
    refused(["export", "--global", g, "--out", deep], 5, "does not exist", watch=(world["tmp"] / "no",))


# ------------------------------------------------------------- row 14: help


def test_help_lists_whole_summaries_and_every_option_says_what_it_does():
    top = run("--help").output
    assert "..." not in top.split("Commands:")[1]
    for name, sub in typer.main.get_command(app).commands.items():
        for param in sub.params:
            if isinstance(param, click.Option) and not param.hidden and param.name != "help":
                assert param.help, f"{name} {param.opts[0]} has no help"
        shown = run(name, "--help").output
        assert "\\[" not in shown and "<list" not in shown, name


# ------------------------------------------------------------- row 15 and the low rows


def test_messages_use_the_right_article(world):
    out = world["tmp"] / "x.safetensors"
    line = refused(
        ["aggregate", "--global", world["g0"], "--out", out, world["broadcast"]], 4, "expected an upload"
    )
    assert "is a broadcast artifact" in line


def test_status_on_a_narrow_terminal_lists_one_file_per_line(world):
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    inbox = world["tmp"] / "inbox"
    inbox.mkdir()
    name = "upload-from-a-site-with-a-long-name-r1.safetensors"
    shutil.copy(world["upload"], inbox / name)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    proc = subprocess.Popen(
        [str(FEDSRD), "status", inbox, "--global", world["g0"]],
        stdout=follower, stderr=follower, env=subprocess_env(COLUMNS="60", TERM="xterm"),
    )  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=120)
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode()).replace("\r", "")
    joined = "".join(line.strip() for line in text.splitlines())
    assert name in joined  # never cut into slivers of a six-column table
    assert "clientc0,round1" in "".join(joined.split())


def test_eval_answers_are_one_line_per_row_when_piped(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "multi.jsonl", [{"instruction": "Say\ntwo lines", "output": "a\nb"}])
    result = run("eval", "--base", tiny_model, "--data", data, "--answers", 1, "--max-new-tokens", 2)
    rows = [line for line in result.output.splitlines() if "Say" in line]
    assert len(rows) == 1 and "Say\\ntwo lines" in rows[0] and "a\\nb" in rows[0], result.output


def test_a_missing_key_file_is_a_usage_error(world):
    out = world["tmp"] / "g.safetensors"
    refused(
        ["init", "--base", world["base"], "--out", out, "--sign-key", world["tmp"] / "nobody.key"],
        2,
        "no such key file",
    )


def test_written_values_are_shown_for_people_and_kept_whole_in_json(world):
    agg = world["tmp"] / "agg.safetensors"
    nxt, bc = world["tmp"] / "g-next.safetensors", world["tmp"] / "bc.safetensors"
    run("aggregate", "--global", world["g0"], "--out", agg, *world["uploads"])
    shown = run(
        "broadcast", "--global", world["g0"], "--aggregate", agg, "--out", bc, "--out-global", nxt
    ).output
    line = next(line for line in shown.splitlines() if line.startswith("next_global_hash"))
    assert re.fullmatch(r"next_global_hash\s+[0-9a-f]{12}", line.strip())
    error_line = next(line for line in shown.splitlines() if line.startswith("update_error"))
    assert len(error_line.split()[-1]) <= 6  # 4 significant digits


def test_the_flower_run_folder_is_ignored_by_git():
    assert "/flower-run/" in (ROOT / ".gitignore").read_text().split()
