"""OrtSession, benchmark, compare and the ``secateurs bench`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from secateurs.cli import main
from secateurs.errors import InputError
from secateurs.runtime.ort import LatencyStats, OrtSession, compare


def test_runs_torch_and_numpy_inputs_like_torch(cnn, cnn_onnx):
    sess = OrtSession(cnn_onnx, providers=["CPUExecutionProvider"], intra_op_threads=1)
    x = torch.randn(3, 3, 16, 16)
    want = cnn(x).detach().numpy()
    for inputs in (x, (x,), {"x": x}, x.numpy(), {"x": x.numpy()}):
        (got,) = sess.run(inputs)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    (got,) = sess.run(x.double())  # float64 is cast to the model's float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_default_providers_end_with_cpu(cnn_onnx):
    sess = OrtSession(cnn_onnx)
    assert sess.providers[-1] == "CPUExecutionProvider"


def test_wrong_input_name_names_expected_inputs(cnn_onnx):
    sess = OrtSession(cnn_onnx, providers=["CPUExecutionProvider"])
    with pytest.raises(InputError) as info:
        sess.run({"image": np.zeros((1, 3, 16, 16), np.float32)})
    msg = str(info.value)
    assert "'image'" in msg and "x: float32['batch', 3, 16, 16]" in msg


def test_wrong_shape_and_count_are_clear(cnn_onnx):
    sess = OrtSession(cnn_onnx, providers=["CPUExecutionProvider"])
    with pytest.raises(InputError, match="shape \\[1, 4, 16, 16\\]"):
        sess.run(np.zeros((1, 4, 16, 16), np.float32))
    with pytest.raises(InputError, match="rank 3"):
        sess.run(np.zeros((3, 16, 16), np.float32))
    with pytest.raises(InputError, match="2 positional"):
        sess.run((np.zeros((1, 3, 16, 16), np.float32),) * 2)


def test_bad_model_path(tmp_path):
    with pytest.raises(InputError, match="not found"):
        OrtSession(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model")
    with pytest.raises(InputError, match="not a readable ONNX model"):
        OrtSession(junk)


def test_benchmark_stats_are_sane(cnn_onnx):
    sess = OrtSession(cnn_onnx, providers=["CPUExecutionProvider"], intra_op_threads=1)
    stats = sess.benchmark(torch.randn(4, 3, 16, 16), warmup=2, repeats=30)
    assert 0 < stats.min <= stats.p50 <= stats.p90 <= stats.p99
    assert stats.batch == 4 and stats.repeats == 30
    assert stats.throughput == pytest.approx(4 / (stats.mean / 1e3), rel=1e-9)
    assert stats.peak_rss_mb > 10


def test_latency_percentiles_nearest_rank():
    stats = LatencyStats.from_times([i / 1e3 for i in range(1, 101)], batch=2)
    assert (stats.p50, stats.p90, stats.p99) == (50.0, 90.0, 99.0)
    assert stats.mean == pytest.approx(50.5)
    assert stats.throughput == pytest.approx(2 / 0.0505)


def test_compare_has_ratio_for_every_config(cnn_onnx, narrow_cnn_onnx):
    table = compare(cnn_onnx, [narrow_cnn_onnx], inputs=torch.randn(1, 3, 16, 16),
                    threads=(1, 2), batch=(1, 3), warmup=1, repeats=5)
    assert table.models == ("cnn.onnx", "cnn_narrow.onnx")
    assert len(table.rows) == 2 * 2 * 2
    for t in (1, 2):
        for b in (1, 3):
            assert table.ratio("cnn.onnx", t, b) == 1.0
            ratio = table.ratio("cnn_narrow.onnx", t, b)
            row = next(r for r in table.rows if (r.model, r.threads, r.batch)
                       == ("cnn_narrow.onnx", t, b))
            assert row.stats.batch == b
            dense = next(r for r in table.rows if (r.model, r.threads, r.batch)
                         == ("cnn.onnx", t, b))
            assert ratio == pytest.approx(dense.stats.p50 / row.stats.p50)
    text = table.to_text()
    assert text.count("cnn_narrow.onnx") == 4 and "speedup" in text
    assert len(table.to_dict()["rows"]) == 8


def test_spin_option_reaches_the_session(cnn_onnx):
    def spinning(s: OrtSession) -> str:
        return s.session.get_session_options().get_session_config_entry(
            "session.intra_op.allow_spinning")

    assert spinning(OrtSession(cnn_onnx, intra_op_threads=2, spin=False)) == "0"
    with pytest.raises(RuntimeError, match="does not have"):  # unset: ORT spins (default)
        spinning(OrtSession(cnn_onnx, intra_op_threads=2))


def test_multithread_compare_keeps_one_session_alive(cnn_onnx, narrow_cnn_onnx, monkeypatch):
    """At 2 threads an idle live session's spinning workers take the running session's
    cores (ResNet-50 measured slower at 2 threads than at 1), so compare keeps one session
    alive at a time there; at 1 thread (no workers) its sessions stay open and interleave."""
    import gc
    import weakref

    import secateurs.runtime.ort as ort_mod

    alive: list[weakref.ref] = []
    most = {1: 0, 2: 0}
    threads_now = [1]

    class Spy(OrtSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            gc.collect()
            alive.append(weakref.ref(self))
            t = threads_now[0]
            most[t] = max(most[t], sum(r() is not None for r in alive))

    monkeypatch.setattr(ort_mod, "OrtSession", Spy)
    x = torch.randn(1, 3, 16, 16)
    table = compare(cnn_onnx, [narrow_cnn_onnx], inputs=x, threads=(1,), batch=(1,),
                    warmup=1, repeats=3)
    alive.clear()
    threads_now[0] = 2
    made = len(alive)
    table2 = compare(cnn_onnx, [narrow_cnn_onnx], inputs=x, threads=(2,), batch=(1,),
                     warmup=1, repeats=ort_mod.BLOCK_RUNS + 2)
    assert most == {1: 2, 2: 1}
    # two blocks per model (BLOCK_RUNS + 2 runs) plus the session that reads the inputs
    assert len(alive) - made == 2 * 2 + 1
    assert {r.stats.repeats for r in table.rows} == {3}
    assert {r.stats.repeats for r in table2.rows} == {ort_mod.BLOCK_RUNS + 2}


def test_compare_random_inputs_need_symbolic_batch(tmp_path, cnn):
    from secateurs.runtime.onnx_export import export_onnx

    fixed = tmp_path / "fixed.onnx"
    export_onnx(cnn, torch.randn(1, 3, 16, 16), fixed)  # batch fixed at 1
    with pytest.raises(InputError, match="fixed batch dim of 1"):
        compare(fixed, fixed, threads=(1,), batch=(4,), warmup=0, repeats=1)


def test_bench_command_writes_json_and_png(tmp_path, cnn_onnx, narrow_cnn_onnx, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["bench", cnn_onnx, narrow_cnn_onnx, "--threads", "1", "--batch", "1", "2",
                 "--repeats", "3", "--warmup", "1", "--json", str(out_json),
                 "--png", str(out_png)])
    assert code == 0
    captured = capsys.readouterr()
    assert "p50 ms" in captured.out and "cnn_narrow.onnx" in captured.out
    assert "threads=1 batch=2" in captured.err  # progress goes to stderr
    rows = json.loads(out_json.read_text())["rows"]
    assert {(r["model"], r["batch"]) for r in rows} == {
        ("cnn.onnx", 1), ("cnn.onnx", 2), ("cnn_narrow.onnx", 1), ("cnn_narrow.onnx", 2)}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_command_missing_file_exits_2(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope.onnx")]) == 2
    assert "not found" in capsys.readouterr().err
