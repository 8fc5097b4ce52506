"""Run untrusted generated Python (MBPP's pass@1) in a separate, confined process.

`run_program(source)` writes the program into a fresh scratch directory and runs it as

    python -I -B -c RUNNER SCRATCH PROGRAM ... LAYERS

with the scratch directory as working directory, HOME and TMPDIR, an environment of PATH and
LANG only, its own session (process group), and stdout/stderr going to files outside the
scratch directory. RUNNER confines its own interpreter before it reads the program; nothing
of this is done in fedsrd's process. The layers (docs/real-tasks.md says the same):

- a private mount namespace in which every file system is read-only (one recursive
  `mount_setattr`), except the scratch directory, bind-mounted read-write on itself: nothing
  outside the scratch directory can be created, changed or removed whatever the program calls,
  since the kernel refuses the write (EROFS). The program runs as pid 1 of a new PID
  namespace with a /proc of its own, so no other process's /proc/PID/root or cwd leads back to
  a writable view. Run by root, RUNNER makes the namespaces directly; run by another user,
  inside a new user namespace that maps that user to itself;
- an unprivileged user: run by root, the program runs as nobody (uid/gid 65534, no
  supplementary groups), and when a directory above the interpreter cannot be searched by
  nobody (a Python under /root), that directory is covered, in the namespace only, by an
  empty read-only tmpfs holding the interpreter's prefix alone; run by another user, the
  program runs as that user. Either way it keeps no capability and cannot gain one
  (no_new_privs);
- no network: a new network namespace (no interface but a loopback that is down) and a new
  IPC namespace;
- a wall-clock time limit, after which the whole process group is killed (SIGKILL);
- resource limits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), size of a written
  file (RLIMIT_FSIZE), open files (RLIMIT_NOFILE), no new processes (RLIMIT_NPROC 0: effective
  for a user other than root), no core files;
- an audit hook (`sys.addaudithook`), installed before the program runs, that refuses:
  creating sockets, starting processes (fork, exec, spawn, system, subprocess), signals to
  other processes, ctypes, changing resource limits, the modules that bypass those
  (_posixsubprocess, ctypes, _ctypes, socket, _socket), and opening for writing, creating,
  removing, renaming or changing the permissions of any path outside the scratch directory.

The kernel enforces all but the audit hook, which is a guard against accidents, not a security
boundary (PEP 578 says so). `sandbox_layers()` probes once which of the kernel layers this
machine allows (a machine without namespaces, a container without CAP_SYS_ADMIN); a layer the
probe found is required afterwards (its failure fails the program), and `sandbox_statement()`
says in one line which layers hold. What is not covered: reading files the program's user may
read, CPU side channels, and services listening on Unix sockets that user may connect to.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import secrets
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
SETUP_FAILED = 86  # RUNNER's exit code when a required layer cannot be set up

# The kernel layers, in the order sandbox_statement() names them.
LAYERS = ("read_only_filesystem", "unprivileged_user", "network_namespace")

# Runs inside the sandboxed interpreter:
# argv = [scratch, program, cpu_s, memory_bytes, file_bytes, layers, audit].
# It reads a one-time token on stdin, sets up the layers named in `layers` (comma-separated;
# failing, it exits SETUP_FAILED), sets the limits, installs the audit hook (unless audit is
# "0": tests and the probe check the kernel layers alone), runs the program, and prints the
# token only when the program ran to its end (an exit() inside the program is a failure).
RUNNER = r"""
import os, resource, sys
_scratch, _program = os.path.realpath(sys.argv[1]), sys.argv[2]
_cpu, _memory, _fsize = (int(v) for v in sys.argv[3:6])
_layers, _audit = set(filter(None, sys.argv[6].split(","))), sys.argv[7] == "1"
_token = sys.stdin.readline().strip()
sys.stdin.close()

def _confine():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def check(ret, what):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
    NEWNS, NEWUSER, NEWNET, NEWIPC, NEWPID = 0x20000, 0x10000000, 0x40000000, 0x08000000, 0x20000000
    MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 1 << 18
    uid, gid, root = os.geteuid(), os.getegid(), os.geteuid() == 0
    flags = (NEWNS | NEWIPC | NEWPID if "read_only_filesystem" in _layers else 0)
    flags |= NEWNET if "network_namespace" in _layers else 0
    if flags and not root:
        flags |= NEWUSER
    if flags:
        check(libc.unshare(flags), "unshare")
    if flags & NEWUSER:
        maps = (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1"))
        for name, text in maps:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    def mount(source, target, fstype, mflags, data=None):
        enc = lambda v: None if v is None else os.fsencode(v)
        check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(mflags), enc(data)),
              f"mount {target}")
    if flags & NEWPID:
        _become_init()
    if "read_only_filesystem" in _layers:
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        # a /proc of this PID namespace: no other process's /proc/PID/root or /proc/PID/cwd
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        if root and "unprivileged_user" in _layers:
            _expose(os.path.realpath(sys.base_prefix), mount, MS_BIND | MS_REC)
        mount(_scratch, _scratch, None, MS_BIND | MS_REC)
        class Attr(ctypes.Structure):
            _fields_ = [(n, ctypes.c_uint64) for n in ("set", "clr", "propagation", "userns_fd")]
        def setattr_(path, recursive, set_, clr):  # mount_setattr(2): 442 on every Linux but alpha
            attr = Attr(set_, clr, 0, 0)
            check(libc.syscall(442, -100, os.fsencode(path), 0x8000 if recursive else 0,
                               ctypes.byref(attr), ctypes.sizeof(attr)), f"mount_setattr {path}")
        setattr_("/", True, 0x1 | 0x2, 0)  # MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
        setattr_(_scratch, False, 0, 0x1)
        os.chdir(_scratch)  # the bind mount, not the read-only directory beneath it
    if root and "unprivileged_user" in _layers:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    if "unprivileged_user" in _layers:
        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
        data = (ctypes.c_uint32 * 6)()
        check(libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset")
        check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS
        if os.geteuid() == 0:
            raise OSError("the program would run as root")

def _become_init():
    # The caller stays outside the new PID namespace: it forks the program's process, pid 1 of
    # that namespace, waits for it and ends as it ended.
    pid = os.fork()
    if pid == 0:
        return
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        import signal
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))

def _expose(prefix, mount, bind):
    # The first directory above the interpreter's prefix that nobody cannot search is covered
    # by a tmpfs (in this namespace only) that holds the prefix alone.
    parts, blocked = prefix.strip("/").split("/"), None
    for depth in range(1, len(parts)):
        path = "/" + "/".join(parts[:depth])
        if not os.stat(path).st_mode & 0o001:
            blocked = path
            break
    if blocked is None:
        return
    fd = os.open(prefix, os.O_PATH | os.O_DIRECTORY)
    mount("tmpfs", blocked, "tmpfs", 0, "mode=0755,size=64k")
    mask = os.umask(0o022)  # the directories leading to the prefix: searchable by nobody
    os.makedirs(prefix, mode=0o755)
    os.umask(mask)
    mount(f"/proc/self/fd/{fd}", prefix, None, bind)
    os.close(fd)

NOBODY = 65534
if _layers:
    try:
        _confine()
    except OSError as error:
        sys.stderr.write(f"sandbox: cannot set up {','.join(sorted(_layers))}: {error}\n")
        os._exit(86)  # SETUP_FAILED
    for _name in ("ctypes", "_ctypes", "ctypes._endian"):
        sys.modules.pop(_name, None)
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
_realpath, _sep = os.path.realpath, os.sep
_busy = []

def _inside(path):
    if isinstance(path, int):
        return True
    try:
        path = os.fsdecode(path)
    except TypeError:
        return False
    full = _realpath(path)  # a relative path from the working directory, which chdir may change
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

if _audit:
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


# The probe: run with the layers asked for and no audit hook; it checks each layer's effect.
_PROBE = """
import decimal, json, os, socket, sys
expected = set({layers!r})
open("probe", "w").write("scratch is writable")
os.remove("probe")
if "read_only_filesystem" in expected:
    outside = os.path.join(os.path.dirname(os.getcwd()), "outside")
    try:
        os.close(os.open(outside, os.O_WRONLY | os.O_CREAT, 0o600))
    except OSError as error:
        assert error.errno == 30, error  # EROFS: the kernel, not a permission, refused it
    else:
        raise AssertionError("created a file outside the scratch directory")
    assert os.getpid() == 1 and sorted(p for p in os.listdir("/proc") if p.isdigit()) == ["1"]
if "unprivileged_user" in expected:
    assert os.geteuid() != 0 and os.getegid() != 0
    with open("/proc/self/status") as status:
        caps = dict(line.split(":", 1) for line in status if line.startswith("Cap"))
    assert int(caps["CapEff"], 16) == 0 and int(caps["CapPrm"], 16) == 0, caps
if "network_namespace" in expected:
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
"""


@functools.lru_cache(maxsize=1)
def sandbox_layers() -> dict[str, bool]:
    """Which kernel layers (LAYERS) this machine allows, probed once per process by running a
    program that checks each one's effect: the strongest combination that works, tried in the
    order read-only file systems and unprivileged user, then each alone, then neither, each with
    and then without the network namespace. The limits and the audit hook are always on."""
    if sys.platform != "linux":
        return dict.fromkeys(LAYERS, False)
    for files in (LAYERS[:2], LAYERS[:1], LAYERS[1:2], ()):
        for net in (LAYERS[2:], ()):
            layers = (*files, *net)
            if _run(_PROBE.format(layers=layers), layers, False, 30.0, DEFAULT_MEMORY_MB).passed:
                return {name: name in layers for name in LAYERS}
    return dict.fromkeys(LAYERS, False)


def sandbox_statement() -> str:
    """One line: which confinement layers hold on this machine, and what a missing one leaves."""
    layers, root = sandbox_layers(), os.geteuid() == 0
    held, missing = [], []
    if layers["read_only_filesystem"]:
        held.append("private mount namespace with every file system read-only but the scratch directory")
    else:
        missing.append("no mount namespace on this machine: only the audit hook guards files outside scratch")
    if layers["unprivileged_user"]:
        held.append(f"uid {NOBODY if root else os.geteuid()} without capabilities")
    elif root:
        missing.append("the program runs as root")
    if layers["network_namespace"]:
        held.append("no network (network namespace)")
    else:
        missing.append("no network namespace: only the audit hook refuses sockets")
    held += ["time and resource limits", "audit hook"]
    return "sandbox: " + ", ".join(held) + (f" ({'; '.join(missing)})" if missing else "")


def run_program(
    source: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    *,
    audit_hook: bool = True,
) -> SandboxResult:
    """Run `source` in the sandbox (module docstring); passed when it runs to its end.
    audit_hook=False leaves the audit hook out, so that tests check the kernel layers alone."""
    _check_limits(timeout_s, memory_mb)
    layers = tuple(name for name, held in sandbox_layers().items() if held)
    return _run(source, layers, audit_hook, timeout_s, memory_mb)


def _run(
    source: str, layers: tuple[str, ...], audit: bool, timeout_s: float, memory_mb: int
) -> SandboxResult:
    as_nobody = os.geteuid() == 0 and "unprivileged_user" in layers
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
            ",".join(layers),
            "1" if audit else "0",
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
