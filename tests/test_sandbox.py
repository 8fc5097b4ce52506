"""The MBPP sandbox against hostile generated code: nothing outside its scratch directory changes."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedsrd_cli.errors import UsageError
from fedsrd_cli.sandbox import run_program, sandbox_layers

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox's limits are Linux's")


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its sha256 (a change, a removal or a new file shows)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    (tmp_path / "keep").mkdir()
    path = tmp_path / "keep" / "precious.txt"
    path.write_text("do not touch\n")
    return path


def sandbox_temp_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("fedsrd-sandbox-")}


def test_a_correct_solution_passes_and_a_wrong_one_fails() -> None:
    good = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
    result = run_program(good, timeout_s=10)
    assert (result.passed, result.status, result.returncode) == (True, "passed", 0)
    wrong = "def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n"
    result = run_program(wrong, timeout_s=10)
    assert (result.passed, result.status) == (False, "failed")
    assert "AssertionError" in result.stderr_tail
    # writing in the scratch directory (its working directory) is allowed
    assert run_program("open('notes.txt', 'w').write('x')\nimport os\nos.remove('notes.txt')\n").passed


def test_an_infinite_loop_is_killed_at_the_time_limit() -> None:
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout_s=2)
    assert (result.passed, result.status) == (False, "timeout")
    assert time.monotonic() - start < 8


def test_a_fork_bomb_is_refused(victim: Path) -> None:
    before = snapshot(victim.parent.parent)
    for bomb in (
        "import os\nwhile True:\n    os.fork()\n",
        "import subprocess\nsubprocess.Popen(['sh', '-c', ':(){ :|:& };:'])\n",
        "import os\nos.system('sleep 100 &')\n",
        "import _posixsubprocess\n",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()\n",
    ):
        start = time.monotonic()
        result = run_program(bomb, timeout_s=10)
        assert not result.passed, bomb
        assert result.status == "failed", (bomb, result)
        assert time.monotonic() - start < 8
    assert snapshot(victim.parent.parent) == before


def test_deleting_or_writing_outside_the_scratch_directory_changes_nothing(victim: Path) -> None:
    root = victim.parent.parent
    before = snapshot(root)
    for hostile in (
        f"import os\nos.remove({str(victim)!r})\n",
        f"import shutil\nshutil.rmtree({str(victim.parent)!r})\n",
        f"open({str(victim)!r}, 'w').write('gone')\n",
        f"import os\nos.rename({str(victim)!r}, {str(victim) + '.moved'!r})\n",
        f"import os\nos.chmod({str(victim)!r}, 0)\n",
        f"open({str(root / 'new.txt')!r}, 'x').write('new')\n",
        f"import os\nos.remove('../../../../../../..{victim}')\n",  # climbing out of the scratch directory
        f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('through a link')\n",
        "import sys\nsys.exit(0)\n",  # leaving before the tests is no pass
    ):
        result = run_program(hostile, timeout_s=10)
        assert not result.passed, hostile
    assert snapshot(root) == before
    assert victim.read_text() == "do not touch\n"


def test_a_network_call_fails() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        for hostile in (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).sendall(b'x')\n",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=3)\n",
            f"import http.client\nhttp.client.HTTPConnection('127.0.0.1', {port}).request('GET', '/')\n",
        ):
            result = run_program(hostile, timeout_s=10)
            assert not result.passed, hostile
            with pytest.raises(TimeoutError):
                server.accept()  # nothing reached the listener


def test_the_network_namespace_alone_has_no_route() -> None:
    """The kernel layer under the audit hook: `unshare -rn` leaves no interface to connect from."""
    if not sandbox_layers()["network_namespace"]:
        pytest.skip("this machine allows no network namespace (unshare -rn)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
        done = subprocess.run(
            ["unshare", "-rn", "--", sys.executable, "-I", "-c", code], capture_output=True, timeout=30
        )
        assert done.returncode != 0
        assert b"Error" in done.stderr


def test_memory_and_file_size_are_limited(tmp_path: Path) -> None:
    result = run_program("x = bytearray(8 * 1024 ** 3)\n", timeout_s=10, memory_mb=512)
    assert not result.passed
    assert "MemoryError" in result.stderr_tail
    result = run_program("open('big', 'wb').write(b'0' * (64 * 1024 * 1024))\n", timeout_s=10)
    assert not result.passed


def test_scratch_directories_are_removed_and_limits_checked() -> None:
    before = sandbox_temp_dirs()
    run_program("open('x', 'w').write('x')\n")
    assert sandbox_temp_dirs() == before
    with pytest.raises(UsageError, match="time limit"):
        run_program("pass\n", timeout_s=0)
    with pytest.raises(UsageError, match="memory limit"):
        run_program("pass\n", memory_mb=1)
