"""Atomic file output: a file secateurs writes is either the old one or the complete new one.

Every writer follows the same rule: write to a temporary file in the *same directory* (so the
final ``os.replace`` is a rename within one filesystem, which POSIX and Windows make atomic),
flush and ``fsync`` it, then ``os.replace`` it over the target. If anything raises before the
rename, the temporary file is removed and an existing file at the target is left untouched.

ONNX models above protobuf's 2 GiB limit keep their tensors in an external data file next to
the model. Two files cannot be replaced in one atomic step, so the data file gets a fresh,
unique name (``<model>.<token>.data``) that no existing model refers to; the rename of the
model file is then the single commit point. After it, data files that only the previous model
referred to are removed. A crash at any moment leaves either the old model with its old data or
the new model with its new data (plus, at worst, an orphaned data file).

Temporary files are named ``.<name>.secateurs-<pid>-<token>.tmp``. A process killed with
SIGKILL cannot remove its own; the next write to the same target (and the CLI's output checks,
:func:`remove_stale_temps`) removes those whose process is gone. Files named by the old scheme
(``.<name>.XXXXXXXX.tmp``, from ``mkstemp``) are removed when more than an hour old.

A write that fails with an OS error (full disk, read-only filesystem, missing permission)
raises :class:`OutputError` naming the *target*, never the hidden temporary file. torch
archives are serialised in memory first and then written from Python, so a full disk is an
``OSError`` there and not a C++ abort of the interpreter.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from secateurs.errors import SecateursError

__all__ = ["atomic_write_bytes", "atomic_save_torch", "atomic_save_onnx", "atomic_path",
           "atomic_write_text", "atomic_save_export", "OutputError", "remove_stale_temps",
           "temp_name"]

_log = logging.getLogger(__name__)

# Stay well under protobuf's hard 2 GiB serialisation limit.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; a no-op where directories cannot be opened (Windows)."""
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


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class OutputError(SecateursError, OSError):
    """An output file could not be written (the OS error's message, naming the target)."""

    def __str__(self) -> str:  # OSError would format "[Errno N] ..." from errno/filename
        return str(self.args[0]) if self.args else super().__str__()


_TMP_TAG = "secateurs"
_LEGACY_AGE_S = 3600.0


def temp_name(target: Path, token: str | None = None) -> Path:
    """The temporary sibling this process uses for ``target``."""
    token = token or secrets.token_hex(4)
    return target.parent / f".{target.name}.{_TMP_TAG}-{os.getpid()}-{token}.tmp"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary siblings of ``target`` left by secateurs processes that are gone.

    Recognised: ``.<name>.secateurs-<pid>-<hex>.tmp`` whose pid is not running, and the older
    ``.<name>.<8 chars>.tmp`` (``mkstemp``) more than an hour old. Returns what was removed."""
    target = Path(target)
    ours = re.compile(re.escape(f".{target.name}.{_TMP_TAG}-") + r"(\d+)-[0-9a-f]+\.tmp\Z")
    legacy = re.compile(re.escape(f".{target.name}.") + r"[A-Za-z0-9_]{8}\.tmp\Z")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(f".{target.name}.") or not entry.name.endswith(".tmp"):
            continue
        match = ours.match(entry.name)
        try:
            if match:
                stale = not _pid_alive(int(match.group(1)))
            elif legacy.match(entry.name):
                stale = now - entry.stat(follow_symlinks=False).st_mtime > _LEGACY_AGE_S
            else:
                continue
            if stale and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError as exc:
            _log.debug("could not remove stale temp %s: %s", entry.path, exc)
    if removed:
        _log.info("removed stale temporary files: %s", ", ".join(p.name for p in removed))
    return removed


def _output_error(target: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = {errno.ENOSPC: "free some space or write elsewhere",
            errno.EROFS: "the filesystem is read-only; write elsewhere",
            errno.EACCES: "no permission; write elsewhere",
            errno.EISDIR: "it is a directory; give a file name"}.get(exc.errno or -1, "")
    err = OutputError(f"cannot write '{target}': {reason}" + (f" ({hint})" if hint else ""))
    err.errno, err.strerror, err.filename = exc.errno, reason, str(target)
    return err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on clean exit it replaces ``path`` atomically.

    The caller writes the whole content to the yielded path. If the ``with`` body raises
    (KeyboardInterrupt included), the temporary file is deleted and ``path`` keeps whatever it
    held before. A missing parent directory is created. OS errors become :class:`OutputError`.
    """
    target = Path(path)
    if not target.name:
        raise OutputError(f"cannot write '{path}': not a file name")
    tmp = temp_name(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except OSError as exc:
        raise _output_error(target, exc) from exc
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if target.exists():
            # the temp file is created 0600; keep the permissions the user gave the old file.
            os.chmod(tmp, target.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, target)
    except OSError as exc:
        _remove_quietly(tmp)
        if isinstance(exc, OutputError):
            raise
        raise _output_error(target, exc) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(target.parent)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically; return the path written."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path written."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_torch(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` atomically; return the path written.

    Serialised to memory first: torch's zip writer aborts the process on a failed write (a
    full disk), so the bytes are written from Python, where that is an ``OSError``."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


def atomic_save_export(program: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.export.save(program, path)`` atomically (in memory first, as above)."""
    import torch

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


def _external_locations(model_path: Path) -> set[str]:
    """External data file names the ONNX model at ``model_path`` refers to (empty if none)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        old = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - an unreadable old file just means nothing to clean
        _log.debug("could not read previous model %s: %s", model_path, exc)
        return set()
    return {ExternalDataInfo(t).location for t in _graph_tensors(old.graph) if uses_external_data(t)}


def _graph_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph: initializers and tensor attributes, subgraphs included."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graph_tensors(sub)


def atomic_save_onnx(
    model: Any,
    path: str | os.PathLike[str],
    external_data: bool | None = None,
) -> Path:
    """Save an ``onnx.ModelProto`` to ``path`` atomically; return the path written.

    ``external_data=None`` stores tensors externally only when the model is too large for a
    single protobuf (about 1.8 GB); ``True`` forces it. The caller's model is never modified.
    """
    import onnx

    target = Path(path)
    if external_data is None:
        external_data = model.ByteSize() > _EXTERNAL_DATA_THRESHOLD
    if not external_data:
        return atomic_write_bytes(target, model.SerializeToString())

    previous = _external_locations(target) if target.exists() else set()
    location = f"{target.name}.{secrets.token_hex(4)}.data"
    data_path = target.parent / location
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # onnx writes the data file relative to the model file's directory; the temp model
        # sits in the same directory, so the data lands at ``data_path`` under its final name.
        with atomic_path(target) as tmp:
            onnx.save_model(copy, str(tmp), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=location, size_threshold=1024)
            if data_path.exists():
                with open(data_path, "rb+") as fh:
                    os.fsync(fh.fileno())
    except BaseException:
        _remove_quietly(data_path)
        raise
    for stale in previous - {location}:
        stale_path = target.parent / stale
        if stale_path.parent == target.parent:  # never follow a location out of the directory
            _remove_quietly(stale_path)
    return target
