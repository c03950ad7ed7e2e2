"""Writing to disk so that a crash, a full disk or a second process never leaves a mix: whole
folders swapped in atomically, append-only JSON-lines logs that survive torn lines, checksums,
and the one default folder for results.

Why a module of its own, at the bottom: adapter files (files/), the Deployer's store and the
Monitor's export (serving/), checkpoints (training/) and the result cache (studies/) all need the
same guarantees, and training may import neither files nor serving. So the one implementation
sits beside runtime.py, below every folder, and imports nothing from peftkit.

- `atomic_folder(target)`: the caller writes into a fresh hidden folder beside `target`; on
  success it replaces `target` in one step (Linux: renameat2 RENAME_EXCHANGE; elsewhere two
  renames), so a crash leaves the old folder or the new one, never a mix. Nothing inside the old
  folder is opened or followed: a symlink planted there is removed with it, never written through.
- `append_lines(path, lines)` / `read_jsonl(path)`: one locked (fcntl) append per batch of lines,
  each batch starting on a fresh line even after a torn last line; reading skips and counts every
  line that is not a JSON object (torn, hand-edited, invalid UTF-8).
- `exclusive(path)`: one process at a time inside the block, for work that two processes (two notebooks
  side by side, `make test`'s two workers) would otherwise both do, such as training the same cached run.
- `runs_dir()`: where results go by default: `runs/` relative to the working directory, or the
  folder named by the environment variable PEFTKIT_RUNS. The result cache (runs/results.jsonl)
  and the Optuna storage (runs/optuna.db) both live there.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

RUNS_ENV = "PEFTKIT_RUNS"


def runs_dir() -> Path:
    """The default folder for results: $PEFTKIT_RUNS, else `runs` (relative to the working directory)."""
    return Path(os.environ.get(RUNS_ENV) or "runs")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# -- atomic folders -------------------------------------------------------------------------------

_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _libc_renameat2():
    # CDLL(None): the symbols already loaded into this process, libc's among them. find_library("c")
    # would run `/sbin/ldconfig -p` in a subprocess at every import of peftkit.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_renameat2 = _libc_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2). False where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # a file system without the flag: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_target(target) -> Path:
    """`target` as a Path, refused (FileExistsError) when it is a symlink or a non-folder."""
    target = Path(target)
    if target.is_symlink():
        raise FileExistsError(f"{target} is a symbolic link; peftkit replaces folders whole and never writes "
                              "through a link. Give the real folder's path, or remove the link.")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose a new folder name, or remove the file.")
    return target


@contextlib.contextmanager
def atomic_folder(target, marker: str | None = None, what: str = "this save"):
    """Yield a new empty folder beside `target`; when the block ends without an error, it
    replaces `target` whole (which may be absent). On an error the new folder is removed and
    `target` is left exactly as it was.

    marker: the file an earlier save leaves in the folder (adapter.json, manifest.json). A
    non-empty `target` without it is refused (FileExistsError): its files are not ours to delete.
    """
    target = check_target(target)
    if marker is not None and target.is_dir() and any(target.iterdir()):
        mark = target / marker
        if mark.is_symlink() or not mark.is_file():
            raise FileExistsError(f"{target} is not empty and holds no {marker}, so it was not written by {what}, "
                                  "which replaces its folder whole. Save into a new or empty folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    os.mkdir(tmp)  # umask-respecting permissions, like any folder the user makes
    try:
        yield tmp
        _fsync_tree(tmp)
        check_target(target)  # again: nothing may have planted a link meanwhile
        if os.path.lexists(target):
            if _exchange(tmp, target):
                shutil.rmtree(tmp)  # the old folder, now under the temporary name; links are unlinked, not followed
            else:
                old = target.parent / f".{target.name}.{secrets.token_hex(6)}.old"
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- append-only JSON-lines logs -----------------------------------------------------------------

def append_lines(path, lines: list[str], fsync: bool = False) -> int:
    """Append `lines` (JSON texts without newlines) to `path` under an exclusive lock, in one
    write that starts on a fresh line: a torn last line left by a killed writer stays a line of
    its own (skipped by `read_jsonl`) instead of swallowing the first new one."""
    if not lines:
        return 0
    if any("\n" in line for line in lines):
        raise ValueError("append_lines takes one JSON text per line, without newlines.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(lines) + "\n").encode("utf-8")
    with open(path, "a+b") as f:  # O_APPEND: every write lands at the end, whoever wrote last
        fcntl.flock(f, fcntl.LOCK_EX)  # several processes may append at once
        try:
            size = os.fstat(f.fileno()).st_size
            if size and os.pread(f.fileno(), 1, size - 1) != b"\n":
                data = b"\n" + data
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return len(lines)


@contextlib.contextmanager
def exclusive(path):
    """Hold an exclusive lock (fcntl) on the file `path` (created, with its folder) for the block; a second
    process waits at the door until the first leaves. The lock goes with the process, so a killed holder never
    leaves it taken; the empty file stays, for the next holder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_jsonl(path) -> tuple[list[dict], int]:
    """(the JSON objects in `path`, one per line, in order; the number of lines skipped because
    they are not a JSON object: torn, truncated, invalid UTF-8, null, a list, a number...)."""
    rows, skipped = [], 0
    for raw in Path(path).read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            skipped += 1
            continue
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            skipped += 1
    return rows, skipped
