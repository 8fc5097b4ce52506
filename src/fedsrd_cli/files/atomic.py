"""Crash-safe writing: every file fedsrd writes goes to a temporary file beside its path, is
fsynced, then renamed into place; an existing file is never replaced without --force, and a
command that writes several files writes all of them or none (docs/security.md, "Crash safety").

This module knows bytes and paths only; artifacts.py turns headers and tensors into the bytes.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsrd_cli.errors import OutputError, OutputExistsError, UsageError

# The files a command reads, as (flag, path or paths): none of them may be its output.
Inputs = Sequence[tuple[str, str | os.PathLike | Sequence[str | os.PathLike] | None]]


def ensure_writable(path: str | os.PathLike, force: bool, inputs: Inputs = ()) -> None:
    """Fail early, before any work, if `path` is one of the command's `inputs` (even with --force:
    the input would be lost), is a directory, exists and --force was not given, or if its folder
    cannot take a new file (missing, not a folder, no write permission, read-only).

    Every command checks its outputs here, so an input is never replaced: the same file is found
    whatever the spelling (relative, through a symbolic link, a hard link) by comparing the files
    themselves (os.path.samefile).
    """
    path = Path(path)
    try:
        exists = path.exists()
    except OSError as err:
        raise OutputError(f"{path}: cannot be written ({err.strerror or err})") from None
    if exists:
        ensure_not_input(path, inputs)
        if path.is_dir():
            raise OutputError(f"{path}: is a directory; give a file name")
    if exists and not force:
        remove_stale_temp_files(path)  # a rerun after a crash that had finished the file
        raise OutputExistsError(f"{path}: already exists (pass --force to replace it)")
    check_output_folder(path.parent)


def ensure_not_input(path: str | os.PathLike, inputs: Inputs) -> None:
    """UsageError if the output `path` is the same file as one of `inputs` (ensure_writable)."""
    for flag, given in _flat(inputs):
        if _same_file(Path(path), given):
            raise UsageError(
                f"{path}: is also {flag} {given}; refusing to replace an input of this command, even"
                " with --force (write the output to another file)"
            )


def _flat(inputs: Inputs) -> list[tuple[str, Path]]:
    """(flag, path) for every path of `inputs` given (a flag may name several, or none)."""
    out = []
    for flag, given in inputs:
        if given is None:
            continue
        paths = [given] if isinstance(given, (str, os.PathLike)) else list(given)
        out += [(flag, Path(p)) for p in paths]
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # b does not exist (reading it fails later) or cannot be looked at
        return False


def check_output_folder(folder: str | os.PathLike) -> None:
    """OutputError unless `folder` exists, is a folder and this process may create files in it.

    os.access also reports a read-only file system (for root too). What it cannot foresee
    (a pseudo file system such as /proc, a full disk) is caught when the file is written.
    """
    folder = Path(folder)
    if not folder.exists():
        raise OutputError(f"{folder}: output directory does not exist")
    if not folder.is_dir():
        raise OutputError(f"{folder}: is not a directory, so no output can be written inside it")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(
            f"{folder}: output directory is not writable (no permission, or a read-only file system)"
        )


def ensure_output_dir(path: str | os.PathLike) -> None:
    """For a command whose output is a directory (created if absent): fail early unless it can be.

    An existing directory must be writable; for a missing one, its nearest existing parent
    must be, and creating (then removing) the first missing folder is tried, so a path the
    system refuses (/proc/x) fails here rather than after the work.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"{path}: exists and is not a directory")
        check_output_folder(path)
        return
    first_missing = path
    while not first_missing.parent.exists() and first_missing.parent != first_missing:
        first_missing = first_missing.parent
    check_output_folder(first_missing.parent)
    try:
        first_missing.mkdir()
        first_missing.rmdir()
    except OSError as err:
        raise OutputError(f"{first_missing}: cannot be created ({err.strerror or err})") from None


@dataclass(frozen=True)
class FileWrite:
    """One file of `write_files_atomic`: its path and bytes (or a list of byte parts).

    allow_identical: an existing file holding exactly these bytes counts as written (a
    rerun after a crash between the writes of one command). The temporary file is created
    with mode 0600 and given `mode` (less the umask) before it is renamed into place.
    """

    path: Path
    data: bytes | list[Any]
    allow_identical: bool = False
    mode: int = 0o666  # file mode before the umask; 0o600 for a private key


def write_bytes_atomic(
    path: str | os.PathLike, data: bytes | list[Any], force: bool, allow_identical: bool = False
) -> None:
    """Write to a temporary file beside `path`, fsync, then rename into place.

    Without force the final step is a hard link, which fails if `path` appeared in
    the meantime, so an existing file is never replaced. With `allow_identical`, an
    existing file holding exactly `data` counts as written (a rerun after a crash).
    A folder that refuses the file is an OutputError (exit 5), like an existing file.

    The temporary file is named `.NAME.PID@HOST.XXXXXXXX.tmp`. A process killed
    before the rename leaves it behind; the next write of NAME on the same host
    removes the ones whose process no longer runs (see docs/security.md).
    """
    write_files_atomic([FileWrite(Path(path), data, allow_identical)], force)


def write_files_atomic(writes: Sequence[FileWrite], force: bool) -> None:
    """Write several files, all or none: every file is staged (written to its temporary file and
    fsynced) before the first is renamed into place.

    If staging fails nothing is placed. If placing a later file fails, the files this call
    placed before it are removed again, except those that existed before (an identical file
    accepted by `allow_identical`, or one replaced under `force`, which cannot be restored).
    A kill between two renames can leave the earlier files: `allow_identical` lets the
    rerun accept them.
    """
    pending: list[tuple[Path, list[Any], int]] = []
    for write in writes:
        parts = [write.data] if isinstance(write.data, bytes) else list(write.data)
        path = Path(write.path)
        if write.allow_identical and not force and _holds(path, parts):
            continue
        ensure_writable(path, force)
        pending.append((path, parts, write.mode))
    staged: list[tuple[Path, str]] = []
    placed: list[Path] = []
    try:
        for path, parts, mode in pending:
            remove_stale_temp_files(path)
            staged.append((path, _stage(path, parts, mode)))
        for path, tmp_name in staged:
            existed = path.exists()
            _place(path, tmp_name, force)
            if not existed:
                placed.append(path)
        for folder in dict.fromkeys(path.parent for path, _ in staged):
            _fsync_dir(folder)
    except BaseException:
        for path in placed:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    finally:
        for _, tmp_name in staged:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)


def _stage(path: Path, parts: list[Any], mode: int = 0o666) -> str:
    """Write `parts` to a new temporary file beside `path` and fsync it; returns its name."""
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.{os.getpid()}@{_host()}.", suffix=".tmp", dir=path.parent
        )
    except OSError as err:
        raise OutputError(f"{path}: cannot be written ({err.strerror or err})") from None
    try:
        os.fchmod(fd, mode & ~_umask())
        with os.fdopen(fd, "wb") as tmp:
            for part in parts:
                tmp.write(part)
            tmp.flush()
            os.fsync(tmp.fileno())
    except OSError as err:
        os.unlink(tmp_name)
        raise OutputError(f"{path}: cannot be written ({err.strerror or err})") from None
    except BaseException:
        os.unlink(tmp_name)
        raise
    return tmp_name


def _place(path: Path, tmp_name: str, force: bool) -> None:
    """Rename a staged file into place; without force never replace a file that exists."""
    try:
        if force:
            os.replace(tmp_name, path)
            return
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            raise OutputExistsError(f"{path}: already exists (pass --force to replace it)") from None
        except OSError:  # file systems without hard links
            if path.exists():
                raise OutputExistsError(f"{path}: already exists (pass --force)") from None
            os.replace(tmp_name, path)
        else:
            os.unlink(tmp_name)  # before the directory fsync: a kill there leaves no temp file
    except OutputExistsError:
        raise
    except OSError as err:
        raise OutputError(f"{path}: cannot be written ({err.strerror or err})") from None


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _holds(path: Path, parts: list[Any]) -> bool:
    """Whether `path` is a file holding exactly the concatenated parts (False when unreadable)."""
    try:
        if not path.is_file() or path.stat().st_size != sum(len(memoryview(p).cast("B")) for p in parts):
            return False
        with path.open("rb") as handle:
            for part in parts:
                view = memoryview(part).cast("B")
                if handle.read(view.nbytes) != view.tobytes():
                    return False
    except OSError:
        return False
    return True


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete `.NAME.PID@HOST.*.tmp` files of output `path` left by dead processes of this host.

    Only temporary files written on this host by a process that no longer exists are
    removed, so a concurrent writer (here or on another machine sharing the folder) is
    never disturbed. Returns the removed paths.
    """
    path = Path(path)
    pattern = re.compile(r"^\." + re.escape(path.name) + r"\.(\d+)@([A-Za-z0-9-]+)\.[A-Za-z0-9_]+\.tmp$")
    removed = []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    host = _host()
    for candidate in candidates:
        match = pattern.match(candidate.name)
        if not match or match.group(2) != host or _pid_alive(int(match.group(1))):
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replaces_assets(out_dir: Path, force: bool) -> bool:
    """Whether writing demo assets into out_dir replaces an earlier demo-assets output (True:
    --force was given and out_dir holds one); False when out_dir is absent or empty. Anything
    else raises OutputExistsError, saying how to proceed."""
    if not (out_dir.exists() and any(out_dir.iterdir())):
        return False
    if not force:
        raise OutputExistsError(f"{out_dir}: exists and is not empty (pass --force to replace it)")
    if not (out_dir / "manifest.json").is_file():
        raise OutputExistsError(
            f"{out_dir}: not a fedsrd demo-assets directory; refusing to replace it even with --force"
        )
    return True
