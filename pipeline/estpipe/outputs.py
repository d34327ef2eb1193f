"""Output files: checked before the work starts, and failures while writing told in one line.

Every command checks each file it will write (data, results, checkpoint, logs) before it reads or
computes anything: `check_writable` creates and removes a small probe file in the target folder,
which is the only test that tells the truth (os.access says yes to root on a read-only mount, and
says nothing about a full disk). `check_free_space` compares a file's estimated size with the
folder's free space (statvfs) before a large file is written. `write_error` turns an OSError met
while writing into a UserError naming the file and the device. Files get the usual permissions,
0666 less the umask (`file_mode`), even when written through mkstemp (which makes them 0600).
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path

from estpipe import interrupts
from estpipe.errors import UserError

PROBE_BYTES = 4096
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def current_umask() -> int:
    # Linux shows the umask in /proc; elsewhere set and restore it (racy only across threads).
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain open() would give a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} EiB"


def folder_of(path: str | os.PathLike) -> Path:
    parent = Path(path).parent
    return parent if str(parent) else Path(".")


def device_of(path: str | os.PathLike) -> str:
    """'MOUNT (DEVICE)' of the file system holding `path` (which need not exist), for messages."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    mount = p
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    device = None
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) >= 3 and fields[1].replace("\\040", " ") == str(mount):
                    device = fields[0] if fields[0] == fields[2] else f"{fields[0]}, {fields[2]}"
    except OSError:
        pass
    return f"{mount} ({device})" if device else str(mount)


def is_no_space(exc: BaseException) -> bool:
    """An error that means a full disk or an exhausted quota (h5py passes the errno only in its
    message when the failure is in a flush)."""
    if getattr(exc, "errno", None) in _NO_SPACE:
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text or bool(
        re.search(rf"errno = ({errno.ENOSPC}|{errno.EDQUOT})\b", text))


def _reason(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if code:
        return os.strerror(code)
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def write_error(path: str | os.PathLike, exc: BaseException) -> UserError:
    """The one line for an OSError met while writing `path`."""
    if is_no_space(exc):
        return UserError(f"no space left on {device_of(path)} while writing {path}; "
                         "free some space there or write to another folder")
    return UserError(f"cannot write {path}: {_reason(exc)}; check the folder and the disk, or write elsewhere")


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Refuse (UserError naming `what`, e.g. "--out", or only the path when empty) unless a new
    file can be written as `path`: its folder exists, `path` is not a folder, and a probe file of
    PROBE_BYTES can be created, written and removed in that folder."""
    path = Path(path)
    folder = folder_of(path)
    name = f"{what} {path}" if what else str(path)
    if not folder.is_dir():
        raise UserError(f"{name}: folder {folder} does not exist; create it or choose another path")
    if path.is_dir():
        raise UserError(f"{name}: is a folder; give a file name")
    _probe(folder, path.name, name)


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
    """Make `folder` (and its parents) if needed and check that files can be written in it."""
    folder = Path(folder)
    name = f"{what} {folder}" if what else str(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{name}: cannot make the folder ({_reason(exc)}); choose a folder you can write to") from None
    if not folder.is_dir():
        raise UserError(f"{name}: is a file, not a folder")
    _probe(folder, "probe", name)


def _probe(folder: Path, stem: str, name: str) -> None:
    token = None
    try:
        with interrupts.deferred():
            fd, probe = tempfile.mkstemp(prefix=f".{stem}.", suffix=".probe", dir=folder)
            token = interrupts.register(interrupts.remove_file(probe), probe)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
        finally:
            os.close(fd)
            os.unlink(probe)
            interrupts.unregister(token)
    except OSError as exc:
        if is_no_space(exc):
            raise UserError(f"{name}: no space left on {device_of(folder)}; free some space there "
                            "or choose another folder") from None
        raise UserError(f"{name}: cannot write in folder {folder} ({_reason(exc)}); "
                        "choose a folder you can write to") from None


def free_bytes(folder: str | os.PathLike) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def check_free_space(path: str | os.PathLike, need: int, advice: str) -> None:
    """Refuse (UserError) when the folder of `path` has less free space than `need` bytes.

    advice: what to change, e.g. "simulate fewer sets (--sets) or write to another folder"."""
    folder = folder_of(path)
    have = free_bytes(folder)
    if need > have:
        raise UserError(f"{path}: the file needs about {size_text(need)}, but {device_of(folder)} has only "
                        f"{size_text(have)} free; {advice}")


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON atomically (write_bytes_atomic)."""
    write_bytes_atomic(path, (json.dumps(payload, indent=1, allow_nan=True) + "\n").encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file in the same folder, flush it to disk, rename over `path`.

    The file gets the usual permissions (0666 less the umask). The temporary file is registered
    with estpipe.interrupts while it exists, so a signal removes it; `path` is always either the
    old file or the new one. OSError propagates (the callers decide what a failed write means)."""
    path = Path(path)
    with interrupts.deferred():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
        cleanup = interrupts.register(interrupts.remove_file(tmp), tmp)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        interrupts.unregister(cleanup)
