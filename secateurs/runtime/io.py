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
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_save_torch", "atomic_save_onnx", "atomic_path"]

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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on clean exit it replaces ``path`` atomically.

    The caller writes the whole content to the yielded path. If the ``with`` body raises, the
    temporary file is deleted and ``path`` keeps whatever it held before.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if target.exists():
            # mkstemp creates 0600 files; keep the permissions the user gave the old file.
            os.chmod(tmp, target.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, target)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(target.parent)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path written."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_save_torch(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` atomically; return the path written."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)


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
