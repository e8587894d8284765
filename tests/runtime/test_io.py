"""Atomic writers: complete file or nothing, never a clobbered or partial file."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from secateurs.runtime import io as sio


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("serialization failed on purpose")


def _files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_bytes_writes_and_replaces(tmp_path):
    path = tmp_path / "a.bin"
    sio.atomic_write_bytes(path, b"one")
    sio.atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert _files(tmp_path) == ["a.bin"]


def test_failed_replace_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(sio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        sio.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert _files(tmp_path) == ["a.bin"]


def test_torch_save_failure_leaves_no_partial_file(tmp_path):
    path = tmp_path / "m.pt"
    with pytest.raises(RuntimeError, match="on purpose"):
        sio.atomic_save_torch({"w": torch.ones(3), "bad": _Unpicklable()}, path)
    assert _files(tmp_path) == []  # nothing half-written, no temp left behind


def test_torch_save_failure_does_not_clobber_existing(tmp_path):
    path = tmp_path / "m.pt"
    sio.atomic_save_torch({"w": torch.arange(4)}, path)
    with pytest.raises(RuntimeError):
        sio.atomic_save_torch({"bad": _Unpicklable()}, path)
    assert torch.equal(torch.load(path)["w"], torch.arange(4))
    assert _files(tmp_path) == ["m.pt"]


def test_existing_permissions_kept(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"x")
    os.chmod(path, 0o640)
    sio.atomic_write_bytes(path, b"y")
    assert path.stat().st_mode & 0o777 == 0o640


def _model(values: np.ndarray) -> onnx.ModelProto:
    w = numpy_helper.from_array(values.astype(np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, values.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, values.shape[1]])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


class _BrokenModel:
    """Quacks like a ModelProto whose serialization fails."""

    def ByteSize(self) -> int:
        return 10

    def SerializeToString(self) -> bytes:
        raise RuntimeError("serialization failed on purpose")


def test_onnx_save_failure_keeps_existing(tmp_path):
    path = tmp_path / "m.onnx"
    sio.atomic_save_onnx(_model(np.ones((4, 4))), path)
    with pytest.raises(RuntimeError, match="on purpose"):
        sio.atomic_save_onnx(_BrokenModel(), path)
    loaded = onnx.load(str(path))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]),
                                  np.ones((4, 4)))
    assert _files(tmp_path) == ["m.onnx"]


def test_onnx_external_data_round_trip_and_replace(tmp_path):
    path = tmp_path / "m.onnx"
    first = _model(np.full((64, 64), 1.0))
    sio.atomic_save_onnx(first, path, external_data=True)
    assert first.graph.initializer[0].raw_data or first.graph.initializer[0].float_data  # intact
    data_files = [n for n in _files(tmp_path) if n.endswith(".data")]
    assert len(data_files) == 1
    loaded = onnx.load(str(path))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), 1.0)

    sio.atomic_save_onnx(_model(np.full((64, 64), 2.0)), path, external_data=True)
    loaded = onnx.load(str(path))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), 2.0)
    data_now = [n for n in _files(tmp_path) if n.endswith(".data")]
    assert len(data_now) == 1 and data_now != data_files  # old data removed, new one in place


def test_onnx_external_data_failure_keeps_old_model_and_data(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    sio.atomic_save_onnx(_model(np.full((64, 64), 3.0)), path, external_data=True)
    before = _files(tmp_path)
    real_save = onnx.save_model

    def save_then_fail(proto, f, **kwargs):
        real_save(proto, f, **kwargs)  # data file fully written under its new name ...
        raise OSError("crash before the commit")  # ... then the process dies

    monkeypatch.setattr(onnx, "save_model", save_then_fail)
    with pytest.raises(OSError, match="commit"):
        sio.atomic_save_onnx(_model(np.full((64, 64), 4.0)), path, external_data=True)
    monkeypatch.undo()
    assert _files(tmp_path) == before
    loaded = onnx.load(str(path))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), 3.0)


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    path = tmp_path / "m.pt"
    dead = tmp_path / f".m.pt.secateurs-{_dead_pid()}-abcd1234.tmp"
    alive = tmp_path / f".m.pt.secateurs-{os.getpid()}-00ff00ff.tmp"  # this process: in use
    legacy_old = tmp_path / ".m.pt.a1b2c3d4.tmp"
    legacy_new = tmp_path / ".m.pt.z9y8x7w6.tmp"
    other = tmp_path / ".other.pt.secateurs-1-aa.tmp"
    for f in (dead, alive, legacy_old, legacy_new, other):
        f.write_bytes(b"partial")
    os.utime(legacy_old, (1, 1))
    sio.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert not dead.exists() and not legacy_old.exists()
    assert alive.exists() and legacy_new.exists() and other.exists()


def test_interrupt_removes_temp_and_keeps_old(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), sio.atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and _files(tmp_path) == ["a.bin"]


def test_os_errors_name_the_target_not_the_temp(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(sio.OutputError, match="adir") as info:
        sio.atomic_write_bytes(tmp_path / "adir", b"x")  # a directory cannot be replaced
    assert ".tmp" not in str(info.value)
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(sio.OutputError, match="afile/x.bin"):
        sio.atomic_write_bytes(tmp_path / "afile" / "x.bin", b"x")  # parent is a file
    assert sorted(_files(tmp_path)) == ["adir", "afile"]


def test_full_disk_while_writing_is_an_output_error(tmp_path, monkeypatch):
    import builtins
    import errno

    path = tmp_path / "m.pt"
    real_open = builtins.open

    class _Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return _Full(fh) if "w" in mode and ".tmp" in str(file) else fh

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(sio.OutputError, match=r"cannot write '.*m\.pt': No space left"):
        sio.atomic_save_torch({"w": torch.ones(3)}, path)
    monkeypatch.undo()
    assert _files(tmp_path) == []


def test_export_program_saved_in_memory_then_atomically(tmp_path):
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),))
    path = sio.atomic_save_export(program, tmp_path / "m.pt2")
    assert torch.export.load(str(path)).module()(torch.randn(1, 3)).shape == (1, 2)
    assert _files(tmp_path) == ["m.pt2"]
