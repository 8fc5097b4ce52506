"""Run untrusted generated Python (MBPP's pass@1) in a separate, limited process.

`run_program(source)` writes the program into a fresh scratch directory and runs it as

    [unshare -rn --] python -I -B -c RUNNER SCRATCH PROGRAM

with the scratch directory as working directory, HOME and TMPDIR, an environment of PATH and
LANG only, its own session (process group), and stdout/stderr going to files outside the
scratch directory. The layers, strongest first (docs/real-tasks.md says the same):

- a wall-clock time limit, after which the whole process group is killed (SIGKILL);
- resource limits, set by RUNNER before the program is read: CPU seconds (RLIMIT_CPU),
  address space (RLIMIT_AS), size of a written file (RLIMIT_FSIZE), open files
  (RLIMIT_NOFILE), no new processes (RLIMIT_NPROC 0: effective for a user other than root;
  root is exempt from it in Linux), no core files;
- no network: a new user and network namespace (`unshare -rn`: no interface but a loopback
  that is down) when the machine allows one (`sandbox_layers()` says whether it does);
- when fedsrd runs as root and the interpreter is readable by user nobody, the program runs
  as nobody (uid/gid 65534), so file permissions keep it from the machine's files;
- an audit hook (`sys.addaudithook`), installed before the program runs, that refuses:
  creating sockets, starting processes (fork, exec, spawn, system, subprocess), signals to
  other processes, ctypes, changing resource limits, the modules that bypass those
  (_posixsubprocess, ctypes, _ctypes, socket, _socket), and opening for writing, creating,
  removing, renaming or changing the permissions of any path outside the scratch directory.

The audit hook is a guard against accidents, not a security boundary: Python code that sets
out to escape it can (PEP 578 says so). The time and resource limits, the namespace and the
unprivileged user are enforced by the kernel. Nothing here stops a program from reading files
its user may read; do not run this as root on a machine with secrets.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedsrd_cli.errors import UsageError

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024
MAX_FILE_BYTES = 16 * 1024 * 1024
NOBODY = 65534
OUTPUT_TAIL = 2000  # characters of stderr kept in a result

# Runs inside the sandboxed interpreter: argv = [scratch, program, cpu_s, memory_bytes, file_bytes].
# It reads a one-time token on stdin, sets the limits, installs the audit hook, runs the
# program, and prints the token only when the program ran to its end (an exit() inside the
# program is a failure, not a pass).
RUNNER = r"""
import os, resource, sys
_scratch, _program = os.path.realpath(sys.argv[1]), sys.argv[2]
_cpu, _memory, _fsize = (int(v) for v in sys.argv[3:6])
_token = sys.stdin.readline().strip()
sys.stdin.close()
for _limit, _value in (
    (resource.RLIMIT_CPU, _cpu), (resource.RLIMIT_AS, _memory), (resource.RLIMIT_FSIZE, _fsize),
    (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0),
):
    resource.setrlimit(_limit, (_value, _value))
with open(_program, encoding="utf-8") as _file:
    _source = _file.read()
_REFUSED = frozenset((
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
    "subprocess.Popen", "os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn",
    "os.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.startfile",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "resource.setrlimit",
    "resource.prlimit", "sys.remote_exec",
))
_MODULES = frozenset(("_posixsubprocess", "ctypes", "_ctypes", "socket", "_socket", "multiprocessing"))
_PATH_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.replace": (0, 1), "os.mkdir": (0,),
    "os.chmod": (0,), "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,),
    "os.utime": (0,), "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,),
    "os.mkfifo": (0,), "os.mknod": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_realpath, _join, _sep = os.path.realpath, os.path.join, os.sep
_busy = []

def _inside(path):
    if isinstance(path, int):
        return True
    try:
        path = os.fsdecode(path)
    except TypeError:
        return False
    full = _realpath(_join(_scratch, path))
    return full == _scratch or full.startswith(_scratch + _sep) or full == "/dev/null"

def _hook(event, args):
    if _busy:
        return
    _busy.append(1)
    try:
        if event in _REFUSED or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].split(".")[0] in _MODULES:
            raise PermissionError(f"sandbox: import {args[0]} is not allowed")
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1] or "", args[2] or 0
            writes = any(c in str(mode) for c in "wax+") or flags & _WRITE_FLAGS
            if writes and not _inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the scratch directory")
        for index in _PATH_EVENTS.get(event, ()):
            if index < len(args) and not _inside(args[index]):
                raise PermissionError(f"sandbox: {event} on {args[index]!r} outside the scratch directory")
    finally:
        _busy.pop()

sys.addaudithook(_hook)
_code = compile(_source, "program.py", "exec")
try:
    exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit:
    sys.stderr.write("sandbox: the program called exit() before its tests ran to the end\n")
    os._exit(3)
sys.stdout.flush()
sys.stdout.write("\n" + _token + "\n")
sys.stdout.flush()
"""


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one program: passed (it ran to its end), else why not.

    status: "passed", "failed" (an exception, e.g. a failed assert, or a refused operation),
    "timeout" (killed at the wall-clock limit) or "killed" (a resource limit's signal).
    """

    passed: bool
    status: str
    returncode: int | None
    seconds: float
    stderr_tail: str


def _check_limits(timeout_s: float, memory_mb: int) -> None:
    if not (math.isfinite(timeout_s) and 0 < timeout_s <= 3600):
        raise UsageError(f"the sandbox's time limit must be in (0, 3600] seconds, got {timeout_s}")
    if not 64 <= memory_mb <= 1024 * 1024:
        raise UsageError(f"the sandbox's memory limit must be in [64, 1048576] MB, got {memory_mb}")


@functools.lru_cache(maxsize=1)
def sandbox_layers() -> dict[str, bool]:
    """Which optional layers this machine allows (probed once per process):
    "network_namespace" (`unshare -rn` works) and "unprivileged_user" (running as root, and the
    interpreter runs as user nobody). The limits and the audit hook are always on."""
    as_nobody = os.geteuid() == 0 and _probe([], user=True)
    netns = shutil.which("unshare") is not None and _probe(["unshare", "-rn", "--"], user=as_nobody)
    return {"network_namespace": netns, "unprivileged_user": as_nobody}


def _probe(prefix: list[str], user: bool) -> bool:
    try:
        result = subprocess.run(
            [*prefix, sys.executable, "-I", "-c", "pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
            env={"PATH": os.defpath},
            cwd="/",
            **_user_kwargs(user),
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _user_kwargs(as_nobody: bool) -> dict[str, object]:
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []} if as_nobody else {}


def run_program(
    source: str, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB
) -> SandboxResult:
    """Run `source` in the sandbox (module docstring); passed when it runs to its end."""
    _check_limits(timeout_s, memory_mb)
    layers = sandbox_layers()
    as_nobody = layers["unprivileged_user"]
    prefix = ["unshare", "-rn", "--"] if layers["network_namespace"] else []
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="fedsrd-sandbox-") as holder:
        scratch = Path(holder) / "scratch"
        scratch.mkdir()
        program = Path(holder) / "program.py"  # outside the scratch: the program cannot change it
        program.write_text(source, encoding="utf-8")
        if as_nobody:
            os.chown(scratch, NOBODY, NOBODY)
            Path(holder).chmod(0o755)
            program.chmod(0o644)
        args = [
            *prefix,
            sys.executable,
            "-I",
            "-B",
            "-c",
            RUNNER,
            str(scratch),
            str(program),
            str(math.ceil(timeout_s) + 1),
            str(memory_mb * 1024 * 1024),
            str(MAX_FILE_BYTES),
        ]
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": str(scratch), "TMPDIR": str(scratch)}
        start = time.monotonic()
        with open(Path(holder) / "stdout", "w+b") as out, open(Path(holder) / "stderr", "w+b") as err:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                cwd=scratch,
                env=env,
                start_new_session=True,
                close_fds=True,
                umask=0o077,
                **_user_kwargs(as_nobody),
            )
            timed_out = False
            try:
                proc.communicate((token + "\n").encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
            seconds = time.monotonic() - start
            out.seek(0)
            stdout = out.read()[-4096:].decode("utf-8", "replace")
            err.seek(0)
            stderr = err.read()[-OUTPUT_TAIL:].decode("utf-8", "replace")
    code = proc.returncode
    passed = not timed_out and code == 0 and stdout.rstrip().endswith(token)
    if passed:
        status = "passed"
    elif timed_out:
        status = "timeout"
    elif code is not None and code < 0:
        status = "killed"
    else:
        status = "failed"
    return SandboxResult(passed, status, code, seconds, stderr)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the program's process group (whatever it left behind too), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
