"""Checks every command runs on its paths *before* the work starts.

Output paths (``check_outputs``): not empty, the extension of the format written, not a
directory or a special file, writable (a probe file is created and removed in the parent, or in
its nearest existing ancestor, which also catches read-only filesystems and paths under /proc;
missing parent directories are created only when the file is written, so a failed run creates
none), some free space, and not the same file
as any input (the model, a ``.py`` spec, calibration data) or another output (compared after
resolving symlinks, and with ``samefile`` for hard links). Stale temporary files that an
earlier killed secateurs run left next to an output are removed here.

Input paths (``check_input_file``): exists, is a regular file, readable, not empty.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from secateurs.errors import InputError
from secateurs.runtime.io import remove_stale_temps, temp_name

__all__ = ["Output", "check_outputs", "check_input_file", "spec_files"]

_MIN_FREE_BYTES = 1 << 20


@dataclass(frozen=True)
class Output:
    """One output a command will write: its option, path, accepted suffixes and what it is."""

    option: str
    path: str | None
    suffixes: tuple[str, ...]
    what: str


def spec_files(spec: str | None) -> list[str]:
    """The files a model spec reads: the ``.onnx`` file or the ``.py`` of ``file.py:factory``."""
    if not spec:
        return []
    if spec.lower().endswith(".onnx"):
        return [spec]
    if ".py:" in spec:
        return [spec.rsplit(":", 1)[0]]
    return []


def check_input_file(path: str, what: str, option: str | None = None) -> Path:
    """A readable, non-empty regular file, or an InputError naming it."""
    label = f"{option} '{path}'" if option else f"{what} '{path}'"
    p = Path(path)
    if not path:
        raise InputError(f"{option or what} is empty; name a file")
    if not p.exists():
        raise InputError(f"{label} not found (no such file)")
    if p.is_dir():
        raise InputError(f"{label} is a directory; name the {what} file inside it")
    if not p.is_file():
        raise InputError(f"{label} is not a regular file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{label} is not readable (permissions)")
    if p.stat().st_size == 0:
        raise InputError(f"{label} is empty (0 bytes); is it the right file?")
    return p


def _same(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_one(out: Output) -> Path:
    assert out.path is not None
    shown = f"{out.option} '{out.path}'"
    if not out.path.strip():
        raise InputError(f"{out.option} is empty; name the {out.what} file, e.g. "
                         f"{out.option} out{out.suffixes[0]}")
    p = Path(out.path)
    if out.path.endswith(os.sep) or p.is_dir():
        raise InputError(f"{shown} is a directory; name the {out.what} file inside it, e.g. "
                         f"{p / ('out' + out.suffixes[0])}")
    if p.suffix.lower() not in out.suffixes:
        want = " or ".join(out.suffixes)
        raise InputError(f"{shown}: the {out.what} is written as {want}; name the file "
                         f"{p.with_suffix(out.suffixes[0]).name if p.suffix else p.name + out.suffixes[0]}")
    if p.exists() and not p.is_file():
        raise InputError(f"{shown} exists and is not a regular file; choose another name")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:  # created at write time
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{shown}: '{parent}' is not a directory")
    probe = temp_name(parent / p.name, "probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{shown}: cannot write in directory '{parent}': "
                         f"{exc.strerror or exc}") from exc
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        free = _MIN_FREE_BYTES
    if free < _MIN_FREE_BYTES:
        raise InputError(f"{shown}: no space left in '{parent}' ({free} bytes free)")
    if p.parent.is_dir():
        remove_stale_temps(p)
    return p


def check_outputs(outputs: Sequence[Output], inputs: Mapping[str, str] | Iterable[str] = ()
                  ) -> list[Path]:
    """Validate every given output (``path=None``: not requested) against the inputs and each
    other; return their paths. ``inputs`` maps a description ("the input model") to a path."""
    named = dict(inputs) if isinstance(inputs, Mapping) else {
        f"the input '{p}'": p for p in inputs}
    seen: list[tuple[str, Path]] = [(label, Path(p)) for label, p in named.items() if p]
    checked = []
    for out in outputs:
        if out.path is None:
            continue
        if out.path.strip():  # the worst mistake first: overwriting an input
            for label, other in seen:
                if _same(Path(out.path), other):
                    raise InputError(f"{out.option} '{out.path}' is the same file as {label}; "
                                     "it would be overwritten: choose another output name")
        p = _check_one(out)
        seen.append((f"{out.option} '{out.path}'", p))
        checked.append(p)
    return checked


def read_onnx(path: str, load_external_data: bool = False) -> object:
    """An ``onnx.ModelProto`` read from ``path``, or an InputError saying why it cannot be:
    missing, empty, truncated or not ONNX at all, or a graph with no nodes (nothing to do).
    Lighter than the ONNX checker: hand-made models that the checker rejects still load."""
    import onnx

    check_input_file(path, "ONNX model")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise InputError(f"'{path}' is not a readable ONNX model (truncated, corrupt or another "
                         f"format?): {type(exc).__name__}: {exc}") from exc
    if not model.HasField("graph") or not model.graph.node:
        raise InputError(f"'{path}' holds no ONNX graph nodes (empty graph, or not an ONNX "
                         "file): nothing to do")
    if load_external_data:
        try:
            onnx.load_external_data_for_model(model, str(Path(path).parent))
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read the external data of '{path}': "
                             f"{type(exc).__name__}: {exc}; copy the data file along with "
                             "the model") from exc
    return model
