"""Bad input fails with a clear InputError and writes nothing; external data and dynamic
batch dims survive pruning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _onnx_testlib import export_zoo
from onnx import numpy_helper

from secateurs.errors import InputError
from secateurs.graph.onnx_apply import (
    has_lazy_tensors,
    load_onnx,
    materialized,
    uses_external_data,
)
from secateurs.passes.prune_onnx import prune_onnx


def _fails_cleanly(src: Path, tmp_path: Path, match: str, **kwargs) -> None:
    out = tmp_path / "out" / "pruned.onnx"
    with pytest.raises(InputError, match=match):
        prune_onnx(src, ratio=0.5, output_path=out, **kwargs)
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_missing_file(tmp_path: Path) -> None:
    _fails_cleanly(tmp_path / "nope.onnx", tmp_path, "does not exist")


def test_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage\xff\xfe" * 50)
    _fails_cleanly(bad, tmp_path, "corrupt|no ONNX graph|not a valid")


def test_truncated_file(tmp_path: Path, export_dir: Path) -> None:
    data = export_zoo("resnet", export_dir).read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    _fails_cleanly(cut, tmp_path, "truncated|corrupt|not a valid")


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)


def test_missing_external_data(tmp_path: Path, export_dir: Path) -> None:
    path = tmp_path / "ext.onnx"
    _save_external(onnx.load(str(export_zoo("vgg", export_dir))), path)
    (tmp_path / "ext.onnx.data").unlink()
    _fails_cleanly(path, tmp_path, "ext.onnx.data")


def test_external_data_round_trip(tmp_path: Path, export_dir: Path) -> None:
    path = tmp_path / "ext.onnx"
    _save_external(onnx.load(str(export_zoo("vgg", export_dir))), path)
    out = tmp_path / "pruned" / "vgg.onnx"
    result = prune_onnx(path, ratio=0.5, round_to=1, verify=True, output_path=out)
    assert result.report.exact
    assert uses_external_data(onnx.load(str(out), load_external_data=False))
    reloaded, external = load_onnx(out)
    assert external
    onnx.checker.check_model(reloaded, full_check=True)
    assert len(list(out.parent.glob("*.data"))) == 1


def test_dynamic_batch_needs_input_shapes(tmp_path: Path, export_dir: Path) -> None:
    path = export_zoo("vit", export_dir, dynamic_batch=True)
    _fails_cleanly(path, tmp_path, r"input 'x' has a dynamic dim 'batch'.*input_shapes=")


def test_input_shapes_prunes_and_keeps_dynamic_batch(tmp_path: Path, export_dir: Path) -> None:
    path = export_zoo("vit", export_dir, dynamic_batch=True)
    result = prune_onnx(path, ratio=0.5, round_to=1, verify=True,
                        input_shapes={"x": [1, 3, 32, 32]})
    assert result.report.exact and result.plan.n_removed > 0
    sess = ort.InferenceSession(result.model.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": np.zeros((3, 3, 32, 32), np.float32)})[0]
    assert out.shape[0] == 3


def test_input_shapes_must_name_an_input(export_dir: Path) -> None:
    with pytest.raises(InputError, match="not an input"):
        prune_onnx(export_zoo("vgg", export_dir), input_shapes={"y": [1, 3, 32, 32]})


def test_plan_from_another_frontend_is_refused(export_dir: Path) -> None:
    from secateurs.errors import PlanError
    from secateurs.graph.onnx_apply import apply_plan_onnx
    from secateurs.passes.plan import Plan

    model = onnx.load(str(export_zoo("vgg", export_dir)))
    with pytest.raises(PlanError, match="frontend"):
        apply_plan_onnx(model, Plan({"features.0.weight": {0: [1]}}, frontend="fx"))
    with pytest.raises(PlanError, match="neither an initializer"):
        apply_plan_onnx(model, Plan({"nope": {0: [1]}}, frontend="onnx"))


def test_legacy_opsets_are_refused_with_a_conversion_hint() -> None:
    from _onnx_testlib import init, make_model, rand
    from onnx import helper

    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)]
    model = make_model(nodes, {"x": [2, 8]}, {"y": [2, 4]}, [init("w", rand(4, 8))])
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 6))
    with pytest.raises(InputError, match=r"opset 6.*broadcast.*convert_version"):
        prune_onnx(model, ratio=0.5)
    model.opset_import[0].version = 99
    with pytest.raises(InputError, match="opset 99, newer"):
        prune_onnx(model, ratio=0.5)
    model.opset_import[0].version = 17
    model.ir_version = 2
    with pytest.raises(InputError, match="IR version 2"):
        prune_onnx(model, ratio=0.5)


def _refuse_whole_protos(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """Make the big-model path (``BIG_MODEL_BYTES``) apply from ``limit`` bytes on, and make
    the checker fail on any in-memory model holding more tensor bytes than that, as protobuf
    does past 2 GB: what passes here never serialises a big model whole."""
    import secateurs.graph.onnx_apply as oa

    real = onnx.checker.check_model
    monkeypatch.setattr(oa, "BIG_MODEL_BYTES", limit)
    monkeypatch.setattr(oa, "LAZY_MIN_BYTES", limit)

    def check(model, *args, **kwargs):
        if isinstance(model, onnx.ModelProto) and oa.tensor_bytes(model) > limit and any(
                t.HasField("raw_data") and len(t.raw_data) > 4096
                for t in model.graph.initializer):
            raise ValueError("EncodeError: the model is over the (lowered) protobuf limit")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", check)


def test_big_model_path_prunes_and_sparsifies_by_path_keeping_external_data(
        tmp_path: Path, export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from secateurs.passes.onnx_sparsify import sparsify_onnx

    src = tmp_path / "big.onnx"
    _save_external(onnx.load(str(export_zoo("resnet", export_dir))), src)
    _refuse_whole_protos(monkeypatch, 100_000)
    pruned_path = tmp_path / "out" / "pruned.onnx"
    result = prune_onnx(src, ratio=0.5, output_path=pruned_path)
    assert result.plan.n_removed > 0
    sparse_path = tmp_path / "out" / "sparse.onnx"
    sparsify_onnx(src, "2:4", output_path=sparse_path)
    for path in (pruned_path, sparse_path):
        head = onnx.load(str(path), load_external_data=False)
        assert uses_external_data(head), f"{path.name} was written without external data"
        assert path.stat().st_size < 200_000
        reloaded, external = load_onnx(path)
        assert external
        feeds = {reloaded.graph.input[0].name: np.zeros((1, 3, 32, 32), np.float32)}
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    # the in-memory result keeps its large tensors lazy (read from the source, sliced when
    # read); read back, they are what the writer wrote
    assert has_lazy_tensors(result.model)
    written, _ = load_onnx(pruned_path)
    got = {t.name: numpy_helper.to_array(t) for t in materialized(result.model).graph.initializer}
    for t in written.graph.initializer:
        np.testing.assert_array_equal(got[t.name], numpy_helper.to_array(t))


def test_save_external_leaves_nothing_on_failure(tmp_path: Path, export_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import secateurs.runtime.io as sio
    from secateurs.graph.onnx_apply import save_external

    model = onnx.load(str(export_zoo("resnet", export_dir)))
    before = model.SerializeToString()

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(sio, "atomic_path", broken)
    with pytest.raises(OSError, match="disk full"):
        save_external(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    assert model.SerializeToString() == before


def test_lazy_by_path_matches_in_memory(tmp_path: Path, export_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """By path, large external tensors stay on disk (read, sliced or sparsified one at a
    time); the files written hold exactly what the in-memory passes compute."""
    import secateurs.graph.onnx_apply as oa
    from secateurs.passes.onnx_sparsify import sparsify_onnx

    monkeypatch.setattr(oa, "LAZY_MIN_BYTES", 0)  # the big-model path at a small size

    src = tmp_path / "m.onnx"
    _save_external(onnx.load(str(export_zoo("resnet", export_dir))), src)
    dense = onnx.load(str(export_zoo("resnet", export_dir)))
    lazy, external = load_onnx(src, lazy=True)
    assert external and has_lazy_tensors(lazy)
    assert all(len(t.raw_data) == 0 for t in lazy.graph.initializer if int(np.prod(t.dims)) > 4096)
    cases = [(prune_onnx(src, ratio=0.5, output_path=tmp_path / "p" / "p.onnx").model,
              prune_onnx(dense, ratio=0.5).model, tmp_path / "p" / "p.onnx"),
             (sparsify_onnx(src, "2:4", output_path=tmp_path / "s" / "s.onnx"),
              sparsify_onnx(dense, "2:4"), tmp_path / "s" / "s.onnx")]
    for by_path, in_memory, path in cases:
        written, _ = load_onnx(path)
        want = {t.name: numpy_helper.to_array(t) for t in in_memory.graph.initializer}
        got = {t.name: numpy_helper.to_array(t) for t in materialized(by_path).graph.initializer}
        assert set(want) == {t.name for t in written.graph.initializer} == set(got)
        for t in written.graph.initializer:
            np.testing.assert_array_equal(numpy_helper.to_array(t), want[t.name])
            np.testing.assert_array_equal(got[t.name], want[t.name])
    assert not list((tmp_path / "s").glob(".secateurs-spill-*"))
    # verify=True runs both models under ORT from scratch files with external data
    checked = prune_onnx(src, ratio=0.5, verify=True)
    assert checked.report.exact is True and has_lazy_tensors(checked.model)


def test_small_external_model_loads_whole(tmp_path: Path, export_dir: Path) -> None:
    """Below ``LAZY_MIN_BYTES`` a by-path prune returns a whole proto (ORT runs it from
    bytes), as before."""
    src = tmp_path / "m.onnx"
    _save_external(onnx.load(str(export_zoo("resnet", export_dir))), src)
    result = prune_onnx(src, ratio=0.5)
    assert result.external_data and not has_lazy_tensors(result.model)
    feeds = {result.model.graph.input[0].name: np.zeros((1, 3, 32, 32), np.float32)}
    ort.InferenceSession(result.model.SerializeToString(),
                         providers=["CPUExecutionProvider"]).run(None, feeds)


def _mlp_with(extra: list[onnx.NodeProto], out: str, inits: list[onnx.TensorProto]
              ) -> onnx.ModelProto:
    """x[1,8] -> MatMul W1 -> Relu -> ``extra`` (ending in ``out``) -> MatMul W2 -> y."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W2")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), *extra,
             helper.make_node("MatMul", [out, "W2"], ["y"])]
    graph = helper.make_graph(
        nodes, "drop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w1, w2, *inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _flag(name: str, value: bool) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value), name)


def _ratio() -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(0.1, np.float32), "ratio")


def test_a_model_exported_in_training_mode_is_refused_with_the_nodes_named(tmp_path) -> None:
    from onnx import helper

    dropout = helper.make_node("Dropout", ["r", "ratio", "train"], ["d"], name="drop1")
    src = tmp_path / "train.onnx"
    onnx.save(_mlp_with([dropout], "d", [_ratio(), _flag("train", True)]), src)
    _fails_cleanly(src, tmp_path, r"random: Dropout 'drop1' \(training_mode\).*model\.eval\(\)")
    noise = [helper.make_node("RandomNormalLike", ["r"], ["n"], name="noise"),
             helper.make_node("Add", ["r", "n"], ["s"])]
    src2 = tmp_path / "noise.onnx"
    onnx.save(_mlp_with(noise, "s", []), src2)
    _fails_cleanly(src2, tmp_path, "random: RandomNormalLike 'noise'")


def test_dropout_in_inference_mode_prunes() -> None:
    from onnx import helper

    dropout = helper.make_node("Dropout", ["r", "ratio", "train"], ["d"], name="drop1")
    model = _mlp_with([dropout], "d", [_ratio(), _flag("train", False)])
    result = prune_onnx(model, ratio=0.5, round_to=1, verify=True)
    assert result.report.exact is True
    assert result.plan.removed["W1"][1]  # the hidden width shrank through the Dropout


def test_an_already_quantized_model_says_to_prune_first(export_dir: Path) -> None:
    """A QDQ model (int8 weights behind DequantizeLinear) prunes nothing: the report says it
    is quantized and what to do, instead of only listing 'no channel rule' pins."""
    from secateurs.passes.quantize import quantize_onnx

    dense = onnx.load(str(export_zoo("resnet", export_dir)))
    qdq = quantize_onnx(dense, random_batches=2).model
    result = prune_onnx(qdq, ratio=0.5, round_to=1)
    assert result.plan.n_removed == 0 and result.report.macs_kept == 1.0
    assert any("already quantized" in n and "prune the float model, then quantize" in n
               for n in result.report.notes)
    plain = prune_onnx(dense, ratio=0.5, round_to=1)
    assert not any("quantized" in n for n in plain.report.notes)
