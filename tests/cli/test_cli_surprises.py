"""Issue 12, "a CLI that never surprises": one regression test (or more) per row of its table.

Every refusal is checked the same way (`refused`): the exit code, exactly one line on the
output that starts with "error:" and holds the expected words (no traceback), and no output
file left behind or changed, temporary files included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import fedsrd_cli
from fedsrd_cli.cli import app
from fedsrd_cli.errors import OutputError
from fedsrd_cli.files import atomic
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
from fedsrd_cli.trust.signing import generate_keypair

from ..conftest import TINY_RECORDS, build_tiny_model, make_global, write_jsonl
from .test_cli import run, run_round

runner = CliRunner()
IS_ROOT = os.geteuid() == 0
TINY_LLAMA_CONFIG = (
    '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,'
    ' "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,'
    ' "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}'
)
FEDSRD = Path(sys.executable).with_name("fedsrd")
TRAINING_NOTE = re.compile(
    r"^(training [\d,]+ steps of \d+ examples on \S+ \(\d+ threads?\)|step 1 took .*"
    r"|warning: [\d,]+ local steps at lr \S+ \(steps x lr = .* is long local training, .*)$"
)


def refused(args: list, code: int, words: str, watch: tuple[Path, ...] = (), root: Path | None = None) -> str:
    """Run a command that must fail: exit `code`, one "error:" line holding `words`, and every
    path in `watch` exactly as before (absent stays absent); no temporary file under `root`."""
    before = {p: (p.read_bytes() if p.is_file() else None, p.exists()) for p in watch}
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    # One error line. train-local announces its steps first ("training N steps ...") and warns
    # about long local training from its flags alone, which may precede it; nothing else may.
    lines = [line for line in lines if not TRAINING_NOTE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    assert words in lines[0], lines[0]
    for path, (data, existed) in before.items():
        assert path.exists() == existed, path
        if data is not None:
            assert path.read_bytes() == data, path
    if root is not None:
        assert not [p for p in root.rglob("*.tmp")], list(root.rglob("*.tmp"))
    return lines[0]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a `fedsrd` subprocess, importing this checkout whatever its cwd."""
    src = str(Path(fedsrd_cli.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    return make_world(tmp_path)


def make_world(tmp_path: Path) -> dict[str, Path]:
    """A finished round 1 from g0, a base model config, a data file and a coordinator key."""
    g0 = make_global(tmp_path / "g0.safetensors")
    files = run_round(tmp_path, g0)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(TINY_LLAMA_CONFIG)
    keys = tmp_path / "keys"
    keys.mkdir()
    generate_keypair(keys / "coordinator")
    return {
        "tmp": tmp_path,
        "g0": g0,
        "g1": files["next"],
        "local": tmp_path / "local-r1-0.safetensors",
        "upload": files["uploads"][0],
        "uploads": files["uploads"],
        "aggregate": files["aggregate"],
        "broadcast": files["broadcast"],
        "base": base,
        "data": write_jsonl(tmp_path / "train.jsonl", TINY_RECORDS),
        "key": keys / "coordinator.key",
    }


# ------------------------------------------------------------- row 1: unwritable folders

# A command writing OUT, as (argv, the paths it would create): each must refuse with exit 5.
WRITERS: dict[str, Callable[[dict[str, Path], Path], tuple[list, list[Path]]]] = {
    "init": lambda w, out: (["init", "--base", w["base"], "--rank", 4, "--out", out], [out]),
    "sparsify": lambda w, out: (
        ["sparsify", "--global", w["g0"], "--local", w["local"], "--client", "c0", "--out", out],
        [out],
    ),
    "aggregate": lambda w, out: (["aggregate", "--global", w["g0"], "--out", out, *w["uploads"]], [out]),
    "broadcast --out": lambda w, out: (
        ["broadcast", "--global", w["g0"], "--aggregate", w["aggregate"], "--out", out]
        + ["--out-global", w["tmp"] / "g1-new.safetensors"],
        [out, w["tmp"] / "g1-new.safetensors"],
    ),
    "broadcast --out-global": lambda w, out: (
        ["broadcast", "--global", w["g0"], "--aggregate", w["aggregate"], "--out-global", out]
        + ["--out", w["tmp"] / "bc-new.safetensors"],
        [out, w["tmp"] / "bc-new.safetensors"],
    ),
    "apply": lambda w, out: (
        ["apply", "--global", w["g0"], "--broadcast", w["broadcast"], "--out", out],
        [out],
    ),
    "unpack": lambda w, out: (["unpack", w["broadcast"], "--out", out], [out]),
    "sign --out": lambda w, out: (["sign", w["g0"], "--sign-key", w["key"], "--out", out], [out]),
    "keygen": lambda w, out: (["keygen", "--out", out.with_suffix("")], [out.with_suffix(".key")]),
    "export": lambda w, out: (
        ["export", "--global", w["g1"], "--out", out.with_suffix("")],
        [out.with_suffix("")],
    ),
    "demo-assets": lambda w, out: (
        ["demo-assets", "--model", "toy", "--out", out.with_suffix("")],
        [out.with_suffix("")],
    ),
    "simulate": lambda w, out: (
        ["simulate", "--model", "toy", "--out", out.with_suffix("")],
        [out.with_suffix("")],
    ),
    # These two check their outputs before any work but need a real model to get further, so
    # they are run only where the check happens up front (not for the late /proc case).
    "eval --out": lambda w, out: (["eval", "--base", w["base"], "--data", w["data"], "--out", out], [out]),
    "train-local": lambda w, out: (
        ["train-local", "--base", w["base"], "--global", w["g0"], "--data", w["data"], "--out", out],
        [out, Path(str(out) + ".log.jsonl")],
    ),
}
EARLY_ONLY = ("eval --out", "train-local")


def _unwritable_folder(case: str, tmp: Path) -> Path:
    """A folder in which no file can be created, for the process running the tests."""
    if case == "read-only folder":
        if IS_ROOT:
            pytest.skip("root ignores folder permissions; the other two cases fail for root too")
        folder = tmp / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    if case == "a file in the way":
        folder = tmp / "not-a-folder"
        folder.write_text("a regular file where a folder should be\n")
        return folder
    return Path("/proc")  # exists; nothing can be created in it, for root neither


@pytest.mark.parametrize("case", ["read-only folder", "a file in the way", "/proc"])
@pytest.mark.parametrize("command", list(WRITERS))
def test_an_unwritable_output_folder_is_one_line_and_exit_5(world, command, case):
    if case == "/proc" and command in EARLY_ONLY:
        pytest.skip(f"{command} needs a real model to reach its write")
    folder = _unwritable_folder(case, world["tmp"])
    out = folder / f"issue12-{command.split()[0]}.safetensors"
    args, outputs = WRITERS[command](world, out)
    try:
        line = refused(args, 5, "", watch=tuple(outputs), root=world["tmp"])
    finally:
        if case == "read-only folder":
            folder.chmod(0o700)
    assert str(folder) in line or str(out) in line


def test_a_folder_the_system_says_is_not_writable_is_refused_before_any_work(world, monkeypatch):
    """What a read-only folder does for a user who is not root (os.access answers for the
    permissions and for a read-only file system), also when the tests run as root."""
    folder = world["tmp"] / "read-only"
    folder.mkdir()
    access = os.access

    def denied(path: str | os.PathLike, mode: int) -> bool:
        return False if Path(path) == folder else access(path, mode)

    monkeypatch.setattr(os, "access", denied)
    args, outputs = WRITERS["sparsify"](world, folder / "up.safetensors")
    refused(args, 5, "output directory is not writable", watch=tuple(outputs), root=world["tmp"])


# ------------------------------------------------------------- row 2: broadcast, both or neither


@pytest.mark.parametrize("case", ["read-only folder", "/proc"])
def test_broadcast_leaves_no_next_state_when_the_broadcast_cannot_be_written(world, case):
    folder = _unwritable_folder(case, world["tmp"])
    next_global = world["tmp"] / "g1-again.safetensors"
    args = ["broadcast", "--global", world["g0"], "--aggregate", world["aggregate"]]
    try:
        refused(
            [*args, "--out", folder / "b.safetensors", "--out-global", next_global],
            5,
            "",
            watch=(next_global, folder / "b.safetensors"),
            root=world["tmp"],
        )
    finally:
        if case == "read-only folder":
            folder.chmod(0o700)


def _fail_placing(monkeypatch, name: str) -> None:
    """Make the final rename of the file called `name` fail, as a full or vanished disk would."""
    place = atomic._place

    def failing(path: Path, tmp_name: str, force: bool) -> None:
        if path.name == name:
            raise OutputError(f"{path}: cannot be written (Input/output error)")
        place(path, tmp_name, force)

    monkeypatch.setattr(atomic, "_place", failing)


def test_broadcast_removes_the_next_state_it_placed_when_placing_the_broadcast_fails(world, monkeypatch):
    _fail_placing(monkeypatch, "b.safetensors")
    tmp = world["tmp"]
    refused(
        ["broadcast", "--global", world["g0"], "--aggregate", world["aggregate"]]
        + ["--out", tmp / "b.safetensors", "--out-global", tmp / "g1-again.safetensors"],
        5,
        "b.safetensors: cannot be written",
        watch=(tmp / "b.safetensors", tmp / "g1-again.safetensors"),
        root=tmp,
    )


def test_broadcast_keeps_an_identical_next_state_that_was_there_before(world, monkeypatch):
    """A rerun after a crash between the two writes finds the next state already in place:
    it is not this command's to remove when the broadcast fails again."""
    tmp = world["tmp"]
    args = ["broadcast", "--global", world["g0"], "--aggregate", world["aggregate"]]
    run(*args, "--out", tmp / "b.safetensors", "--out-global", tmp / "g1-again.safetensors")
    (tmp / "b.safetensors").unlink()
    _fail_placing(monkeypatch, "b.safetensors")
    refused(
        [*args, "--out", tmp / "b.safetensors", "--out-global", tmp / "g1-again.safetensors"],
        5,
        "cannot be written",
        watch=(tmp / "b.safetensors", tmp / "g1-again.safetensors"),
        root=tmp,
    )


def test_other_commands_with_several_outputs_write_all_or_none(world, tiny_model, tiny_data, monkeypatch):
    """keygen (key, pub), export (weights, config, lineage) and train-local (state, log): a
    failure on the last file leaves none of them, nor a folder the command created."""
    tmp = world["tmp"]
    _fail_placing(monkeypatch, "alice.pub")
    refused(
        ["keygen", "--out", tmp / "new-keys" / "alice"],
        5,
        "alice.pub: cannot be written",
        watch=(tmp / "new-keys",),
    )
    _fail_placing(monkeypatch, "fedsrd_lineage.json")
    refused(
        ["export", "--global", world["g1"], "--out", tmp / "adapter"],
        5,
        "cannot be written",
        watch=(tmp / "adapter",),
    )
    g0 = tmp / "tiny-g0.safetensors"
    run("init", "--base", tiny_model, "--rank", 4, "--targets", "q_proj,v_proj", "--out", g0)
    _fail_placing(monkeypatch, "local.safetensors.log.jsonl")
    out = tmp / "local.safetensors"
    refused(
        [
            "train-local",
            "--base",
            tiny_model,
            "--global",
            g0,
            "--data",
            tiny_data,
            "--steps",
            1,
            "--out",
            out,
        ],
        5,
        "log.jsonl: cannot be written",
        watch=(out, Path(str(out) + ".log.jsonl")),
        root=tmp,
    )


# ------------------------------------------------------------- row 3: status and older rounds


def test_status_lists_uploads_of_earlier_rounds_as_old_and_is_ready_without_them(world):
    tmp = world["tmp"]
    inbox = tmp / "inbox"
    inbox.mkdir()
    for upload in world["uploads"]:  # round 1, kept in the inbox as the quickstart does
        shutil.copy(upload, inbox / upload.name)
    status = ["status", inbox, "--global", world["g1"], "--clients", "c0,c1,c2", "--json"]
    waiting = runner.invoke(app, [str(a) for a in status])
    assert waiting.exit_code == 10, waiting.output
    report = json.loads(waiting.output)
    assert report["invalid_files"] == 0 and report["old_files"] == 3
    assert {f["status"] for f in report["files"]} == {"old"}
    round2 = run_round(tmp, world["g1"], tag="r2")
    for upload in round2["uploads"]:
        shutil.copy(upload, inbox / upload.name)
    ready = runner.invoke(app, [str(a) for a in status])
    assert ready.exit_code == 0, ready.output
    report = json.loads(ready.output)
    assert report["ready"] and report["present_clients"] == ["c0", "c1", "c2"]
    assert sorted(f["status"] for f in report["files"]) == ["old"] * 3 + ["valid"] * 3
    human = runner.invoke(app, [str(a) for a in status[:-1]])
    assert human.exit_code == 0 and "old files" in human.output and "\told\t" in human.output


# ------------------------------------------------------------- row 4: output to a pipe


def test_output_to_a_pipe_is_never_wrapped_padded_or_cut(world):
    tmp = world["tmp"]
    deep = tmp / ("a-folder-with-a-long-name-" * 3) / "and-another-one-below-it"
    deep.mkdir(parents=True)
    long_state = deep / "global-state-of-round-one-with-a-long-file-name.safetensors"
    shutil.copy(world["g1"], long_state)
    inbox = tmp / "inbox"
    inbox.mkdir()
    long_upload = inbox / "upload-of-round-one-from-client-zero-with-a-very-long-name.safetensors"
    shutil.copy(world["upload"], long_upload)
    env = subprocess_env(COLUMNS="60")
    for argv in (
        ["inspect", long_state, "--tensors"],
        ["status", inbox, "--global", world["g0"]],
    ):
        done = subprocess.run(
            [str(FEDSRD), *map(str, argv)], capture_output=True, text=True, env=env, cwd=tmp
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines and all(line == line.rstrip() for line in lines), done.stdout
        # Issue 32, row 14: no box and no padding: cells joined by one tab, a header line first.
        assert not any(ch in done.stdout for ch in "┃│━─┏└"), done.stdout
        assert "  " not in done.stdout, done.stdout
        if argv[0] == "status":
            assert "file\tstatus\tclient\tround\tsigner\tproblem" in lines, done.stdout
            row = next(line for line in lines if line.startswith(long_upload.name))
            assert row.split("\t")[:4] == [long_upload.name, "valid", "c0", "1"], row
        assert "…" not in done.stdout and "..." not in done.stdout
        name = long_state if argv[0] == "inspect" else long_upload.name
        assert any(str(name) in line for line in lines), done.stdout
    assert any(len(line) > 60 for line in lines)  # COLUMNS does not apply to a pipe


def test_a_terminal_still_gets_tables_that_fit_it(world):
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    name = "long-" * 12 + "state.safetensors"
    shutil.copy(world["g1"], world["tmp"] / name)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    proc = subprocess.Popen(
        [str(FEDSRD), "inspect", name],
        stdout=follower,
        stderr=follower,
        env=subprocess_env(COLUMNS="60", TERM="xterm"),
        cwd=world["tmp"],
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())
    lines = [line for line in text.replace("\r", "").splitlines() if line.strip()]
    assert all(len(line.rstrip()) <= 60 for line in lines), text
    assert "…" not in text
    first = next(i for i, line in enumerate(lines) if line.startswith("file "))
    end = next(i for i, line in enumerate(lines) if line.startswith("kind "))
    assert end - first > 1  # folded onto more lines ...
    shown = lines[first].split(None, 1)[1].strip() + "".join(line.strip() for line in lines[first + 1 : end])
    assert shown == name  # ... and not cut


def test_eval_table_keeps_every_file_name_whole(tiny_model, world):
    data = []
    for folder in ("a-first-domain-with-a-long-name", "a-second-domain-with-a-long-name"):
        (world["tmp"] / folder).mkdir()
        data += ["--data", write_jsonl(world["tmp"] / folder / "evaluation-split.jsonl", TINY_RECORDS[:2])]
    result = runner.invoke(app, ["eval", "--base", str(tiny_model), *map(str, data)], env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    for folder in ("a-first-domain-with-a-long-name", "a-second-domain-with-a-long-name"):
        assert f"{folder}/evaluation-split" in result.output


# ------------------------------------------------------------- row 5: eval --adapter of another base


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """A tiny Llama with another hidden size than conftest's tiny_model."""
    return build_tiny_model(tmp_path_factory.mktemp("other") / "tiny-llama-48", hidden=48)


def test_eval_refuses_an_adapter_exported_for_another_base(tiny_model, other_base, tmp_path):
    state = tmp_path / "g-other.safetensors"
    run("init", "--base", other_base, "--rank", 4, "--targets", "q_proj,v_proj", "--out", state)
    adapter = tmp_path / "adapter"
    run("export", "--global", state, "--base", other_base, "--out", adapter)
    out = tmp_path / "metrics.json"
    data = write_jsonl(tmp_path / "eval.jsonl", TINY_RECORDS)
    args = ["eval", "--base", tiny_model, "--adapter", adapter, "--data", data, "--out", out]
    line = refused(args, 4, "was exported for another base model", watch=(out,), root=tmp_path)
    assert str(tiny_model) in line and "fingerprint" in line
    # The same adapter as PEFT saves it (no fedsrd record): the shapes tell, before PEFT loads it.
    (adapter / "fedsrd_lineage.json").unlink()
    weights = adapter / "adapter_model.safetensors"
    tensors = dict(read_artifact(state).iter_tensors())
    save_file(tensors, str(weights), metadata={"format": "pt"})
    line = refused(args, 4, "was made for another base model", watch=(out,), root=tmp_path)
    assert str(other_base) in line and str(tiny_model) in line and "inputs" in line


# ------------------------------------------------------------- rows 6-8: init flags


@pytest.mark.parametrize(
    ("flags", "code", "words"),
    [
        (["--rank", "0"], 2, "--rank must be in [1, 65,536], got 0"),
        (["--rank", "-4"], 2, "--rank must be in [1, 65,536], got -4"),
        (["--alpha", "0"], 2, "--alpha must be in (0, "),
        (["--targets", "foo_proj"], 2, "no module named 'foo_proj'; its linear modules are"),
        (["--targets", "q_proj,foo_proj"], 2, "--targets foo_proj"),
        (["--rank", "1000"], 2, "--rank 1000 is above min(d_in, d_out) = 16"),
        (["--rank", "17"], 2, "use --rank 16 or less"),
    ],
)
def test_init_refuses_bad_lora_flags_as_usage_errors(world, flags, code, words):
    out = world["tmp"] / "g-new.safetensors"
    line = refused(["init", "--base", world["base"], "--out", out, *flags], code, words, watch=(out,))
    if "foo_proj" in words:
        assert "q_proj" in line and "down_proj" in line


def test_init_accepts_the_largest_rank_that_fits(world):
    out = world["tmp"] / "g-r16.safetensors"
    run("init", "--base", world["base"], "--rank", 16, "--out", out)
    assert read_artifact(out).header.lora.rank == 16


# ------------------------------------------------------------- row 9: divergence


def test_training_that_diverges_is_exit_6_and_says_to_lower_lr(tiny_model, tiny_data, tmp_path):
    g0 = tmp_path / "g0.safetensors"
    run("init", "--base", tiny_model, "--rank", 4, "--out", g0)  # all-linear: the MLP overflows
    out = tmp_path / "local.safetensors"
    args = ["train-local", "--base", tiny_model, "--global", g0, "--data", tiny_data, "--steps", 3]
    line = refused(
        [*args, "--lr", "1e20", "--out", out],
        6,
        "training diverged at step",
        watch=(out, Path(str(out) + ".log.jsonl")),
        root=tmp_path,
    )
    assert "lower --lr" in line
    refused([*args, "--lr", "1e39", "--out", out], 2, "--lr must be in (0, 3.40282e+38]", watch=(out,))


# ------------------------------------------------------------- rows 10, 11, 16: sparsify's inputs


def test_sparsify_refuses_a_local_state_of_another_client(world):
    tmp = world["tmp"]
    state = read_artifact(world["local"])
    site_a = tmp / "local-site-a.safetensors"
    write_artifact(site_a, replace(state.header, client_id="site-a"), dict(state.iter_tensors()))
    out = tmp / "up-site-b.safetensors"
    args = ["sparsify", "--global", world["g0"], "--local", site_a, "--out", out]
    line = refused([*args, "--client", "site-b"], 4, "is the local state of client 'site-a'", watch=(out,))
    assert "--client is 'site-b'" in line
    run(*args, "--client", "site-a")
    assert read_artifact(out).header.client_id == "site-a"


def test_sparsify_refuses_an_adapter_exported_from_another_round(world):
    tmp = world["tmp"]
    adapter = tmp / "adapter-r1"
    run("export", "--global", world["g1"], "--out", adapter)
    lineage = json.loads((adapter / "fedsrd_lineage.json").read_text())
    assert (
        lineage["exported_from"] == read_artifact(world["g1"]).header.content_hash and lineage["round"] == 1
    )
    out = tmp / "up.safetensors"
    for local in (adapter, adapter / "adapter_model.safetensors"):
        args = ["sparsify", "--global", world["g0"], "--local", local, "--client", "a", "--out", out]
        line = refused(args, 4, "started as the export of state", watch=(out,), root=tmp)
        assert "round 1" in line and "round 0" in line
    # PEFT saving the trained adapter over the export drops the weights' metadata; the
    # lineage file beside them still names the state it was trained from.
    tensors = {n: t + 0.01 for n, t in read_artifact(world["g1"]).iter_tensors()}
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    refused(
        ["sparsify", "--global", world["g0"], "--local", adapter, "--client", "a", "--out", out],
        4,
        "started as the export of state",
        watch=(out,),
    )
    run("sparsify", "--global", world["g1"], "--local", adapter, "--client", "a", "--out", out)
    assert read_artifact(out).header.round == 2


def test_sparsify_refuses_the_next_global_state_as_a_local_state(world):
    out = world["tmp"] / "up.safetensors"
    args = ["sparsify", "--global", world["g0"], "--local", world["g1"], "--client", "a", "--out", out]
    refused(args, 4, "is a round-1 state made from", watch=(out,))


def test_sparsify_takes_the_lora_settings_of_the_global_state_for_bare_peft_weights(world):
    tmp = world["tmp"]
    bare = tmp / "bare" / "trained.safetensors"
    bare.parent.mkdir()
    tensors = {n: t + 0.01 for n, t in read_artifact(world["g0"]).iter_tensors()}
    save_file(tensors, str(bare), metadata={"format": "pt"})
    out = tmp / "up-bare.safetensors"
    run("sparsify", "--global", world["g0"], "--local", bare, "--client", "a", "--out", out)
    assert read_artifact(out).header.lora == read_artifact(world["g0"]).header.lora
    name = next(iter(tensors))
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, str(bare), metadata={"format": "pt"})
    out2 = tmp / "up-bare-2.safetensors"
    args = ["sparsify", "--global", world["g0"], "--local", bare, "--client", "a", "--out", out2]
    refused(args, 4, "has no adapter_config.json beside it", watch=(out2,))


# ------------------------------------------------------------- row 12: keygen's folder


def test_keygen_creates_its_private_folder(tmp_path):
    run("keygen", "--out", tmp_path / "keys" / "alice")
    assert (tmp_path / "keys" / "alice.key").is_file() and (tmp_path / "keys" / "alice.pub").is_file()
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "keys" / "alice.key").stat().st_mode & 0o777 == 0o600
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    refused(
        ["keygen", "--out", blocker / "keys" / "bob"],
        5,
        "is not a directory",
        watch=(blocker,),
        root=tmp_path,
    )
    refused(
        ["keygen", "--out", tmp_path / "keys" / "alice"],
        5,
        "already exists",
        watch=(tmp_path / "keys" / "alice.key",),
    )


# ------------------------------------------------------------- row 13: --debug after the command


def test_debug_works_after_the_command_too(world):
    for args in (["inspect", "--debug", "nope.safetensors"], ["inspect", "nope.safetensors", "--debug"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and type(result.exception).__name__ == "ArtifactError"
    assert "--debug" in runner.invoke(app, ["sparsify", "--help"]).output
    run("inspect", world["g0"], "--debug")


# ------------------------------------------------------------- rows 14, 15: inspect


def test_inspect_says_a_local_state_is_one_and_shows_what_it_records(world):
    tmp = world["tmp"]
    state = read_artifact(world["local"])
    local = tmp / "local-site-a.safetensors"
    write_artifact(
        local, replace(state.header, client_id="site-a", num_samples=12), dict(state.iter_tensors())
    )
    report = json.loads(run("inspect", local, "--json").stdout)
    assert (report["state_role"], report["client_id"], report["num_samples"], report["round"]) == (
        "local",
        "site-a",
        12,
        0,
    )
    human = run("inspect", local).stdout
    assert "local state" in human and "site-a" in human and "12" in human
    assert "trained from the round-0 global state; its upload is round 1" in human
    assert json.loads(run("inspect", world["g1"], "--json").stdout)["state_role"] == "global"
    assert "global state (fedsrd)" in run("inspect", world["g1"]).stdout


def test_inspect_describes_any_safetensors_file(world):
    tmp = world["tmp"]
    adapter = tmp / "adapter"
    run("export", "--global", world["g1"], "--out", adapter)
    report = json.loads(run("inspect", adapter / "adapter_model.safetensors", "--json").stdout)
    assert report["kind"] is None and report["tensor_count"] == 16
    assert report["peft_config"]["r"] == 4 and report["exported_from"]["round"] == 1
    assert {"name", "shape", "dtype"} <= set(report["tensors"][0])
    human = run("inspect", adapter / "adapter_model.safetensors").stdout
    assert "not a fedsrd artifact" in human and "exported by fedsrd from a round-1 state" in human
    assert "peft config" in human and "lora_A.weight" in human and "F32" in human
    run("unpack", world["aggregate"], "--out", tmp / "dense.safetensors")
    human = run("inspect", tmp / "dense.safetensors").stdout
    assert "unpacked from a fedsrd aggregate" in human and "aggregate.left" in human
    save_file({"weight": torch.zeros(3, 5, dtype=torch.float16)}, str(tmp / "model.safetensors"))
    report = json.loads(run("inspect", tmp / "model.safetensors", "--json").stdout)
    assert report["tensors"] == [{"name": "weight", "shape": [3, 5], "dtype": "F16", "numel": 15}]


# ------------------------------------------------------------- row 17: --data a folder


def test_data_given_a_folder_says_so(world):
    out = world["tmp"] / "metrics.json"
    args = ["eval", "--base", world["base"], "--data", world["tmp"], "--out", out]
    line = refused(args, 6, "is a folder; give JSON-lines files", watch=(out,))
    assert str(world["tmp"]) in line


# ------------------------------------------------------------- row 18: not a safetensors file


def test_a_text_file_named_safetensors_is_not_a_safetensors_file(world):
    tmp = world["tmp"]
    text = tmp / "notes.safetensors"
    text.write_text("These are my notes about the federation, not tensors.\n" * 3)
    out = tmp / "x.safetensors"
    refused(["inspect", text], 3, "not a safetensors file")
    refused(
        ["sparsify", "--global", world["g0"], "--local", text, "--client", "a", "--out", out],
        3,
        "not a safetensors file",
        watch=(out,),
    )
    refused(
        ["aggregate", "--global", world["g0"], "--out", out, text], 3, "not a safetensors file", watch=(out,)
    )
    inbox = tmp / "inbox"
    inbox.mkdir()
    shutil.copy(text, inbox / text.name)
    report = json.loads(
        runner.invoke(app, ["status", str(inbox), "--global", str(world["g0"]), "--json"]).output
    )
    assert "not a safetensors file" in report["files"][0]["problem"]
    empty = tmp / "empty.safetensors"
    empty.write_bytes(b"")
    refused(["inspect", empty], 3, "is empty, not a safetensors file")
    truncated = tmp / "cut.safetensors"
    truncated.write_bytes(world["g0"].read_bytes()[:200])
    refused(["inspect", truncated], 3, "truncated or corrupt copy")


# ------------------------------------------------------------- also open: status --trust, sign


def test_status_with_trust_and_an_unsigned_global_state_exits_11(world):
    tmp = world["tmp"]
    trust = tmp / "trust"
    trust.mkdir()
    shutil.copy(world["key"].with_suffix(".pub"), trust)
    inbox = tmp / "inbox"
    inbox.mkdir()
    refused(
        ["status", inbox, "--global", world["g0"], "--trust", trust],
        11,
        "is not signed, and --trust",
        watch=(inbox,),
    )


def test_sign_signs_an_existing_artifact_in_place_or_into_out(world):
    tmp = world["tmp"]
    keys, trust = world["key"].parent, tmp / "trust"
    trust.mkdir()
    generate_keypair(keys / "c0")
    generate_keypair(keys / "mallory")
    for party in ("coordinator", "c0"):
        shutil.copy(keys / f"{party}.pub", trust)
    state = tmp / "g0-copy.safetensors"
    shutil.copy(world["g0"], state)
    before = read_artifact(state).header.content_hash
    run("sign", state, "--sign-key", world["key"])
    assert read_artifact(state).header.content_hash == before
    run("inspect", state, "--trust", trust)
    signed_once = state.read_bytes()
    run("sign", state, "--sign-key", world["key"])  # the same key again: the same bytes
    assert state.read_bytes() == signed_once
    refused(
        ["sign", state, "--sign-key", keys / "mallory.key"],
        7,
        "already signed by party 'coordinator'",
        watch=(state,),
    )
    copy = tmp / "g0-mallory.safetensors"
    run("sign", state, "--sign-key", keys / "mallory.key", "--out", copy, "--force")
    assert state.read_bytes() == signed_once
    refused(["inspect", copy, "--trust", trust], 7, "unknown party 'mallory'")
    refused(["sign", state, "--sign-key", world["key"], "--out", copy], 5, "already exists", watch=(copy,))
    upload = tmp / "upload-copy.safetensors"
    shutil.copy(world["upload"], upload)
    refused(["sign", upload, "--sign-key", world["key"]], 2, "is the upload of client 'c0'", watch=(upload,))
    run("sign", upload, "--sign-key", keys / "c0.key")
    inbox = tmp / "inbox"
    inbox.mkdir()
    shutil.copy(upload, inbox)
    status = runner.invoke(
        app, ["status", str(inbox), "--global", str(state), "--trust", str(trust), "--expect", "1", "--json"]
    )
    assert status.exit_code == 0, status.output
    refused(["sign", tmp / "notes.safetensors", "--sign-key", world["key"]], 3, "no such file")
