"""The demo's digits model, data split, training harness and shipped weights."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.fx

from secateurs.demo.digits import (
    DigitsCNN,
    evaluate,
    example_input,
    fine_tune,
    latency_ms,
    load_digits_split,
    load_pretrained,
    train,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def split():
    return load_digits_split(seed=0)


def _small_model() -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN(widths=(8, 16, 16))


# -- shipped weights ---------------------------------------------------------------------------


def test_pretrained_weights_reach_target_accuracy(split) -> None:
    model = load_pretrained()
    assert not model.training
    params = sum(p.numel() for p in model.parameters())
    assert params < 200_000
    _, val, test = split
    assert evaluate(model, test) >= 0.95
    assert evaluate(model, val) >= 0.95


def test_pretrained_file_is_small() -> None:
    from importlib import resources

    resource = resources.files("secateurs").joinpath("data", "digits_cnn.pt")
    assert resource.is_file()
    with resources.as_file(resource) as path:
        assert 0 < path.stat().st_size < 1_000_000


def test_load_pretrained_missing_file_names_the_fix(monkeypatch) -> None:
    import secateurs.demo.digits as digits

    monkeypatch.setattr(digits, "WEIGHTS_RESOURCE", ("data", "no_such_weights.pt"))
    with pytest.raises(FileNotFoundError, match="tools/train_digits.py"):
        digits.load_pretrained()


# -- data --------------------------------------------------------------------------------------


def test_split_shapes_ranges_and_sizes(split) -> None:
    train_data, val, test = split
    assert [len(part) for part in split] == [1077, 360, 360]
    for part in split:
        assert part.x.dtype == torch.float32 and part.y.dtype == torch.long
        assert part.x.shape[1:] == (1, 8, 8)
        assert float(part.x.min()) >= 0.0 and float(part.x.max()) <= 1.0
    assert float(train_data.x.max()) == 1.0


def test_split_is_deterministic_and_disjoint(split) -> None:
    again = load_digits_split(seed=0)
    for a, b in zip(split, again):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    other = load_digits_split(seed=1)
    assert not torch.equal(split[0].x, other[0].x)
    rows = [{tuple(x.flatten().tolist()) for x in part.x} for part in split]
    # A handful of digits images are exact duplicates in the dataset; the parts share almost none.
    assert len(rows[0] & rows[2]) + len(rows[1] & rows[2]) + len(rows[0] & rows[1]) < 5


def test_split_is_stratified(split) -> None:
    total = sum(len(part) for part in split)
    overall = Counter()
    for part in split:
        overall.update(part.y.tolist())
    for part in split:
        counts = Counter(part.y.tolist())
        assert set(counts) == set(range(10))
        for label, n in overall.items():
            expected = n * len(part) / total
            assert abs(counts[label] - expected) <= 1.5, (label, counts[label], expected)


def test_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="sum to less than 1"):
        load_digits_split(val_fraction=0.5, test_fraction=0.5)


# -- model -------------------------------------------------------------------------------------


def test_model_shape_and_fx_trace() -> None:
    model = DigitsCNN().eval()
    x = example_input()
    assert x.shape == (1, 1, 8, 8)
    traced = torch.fx.symbolic_trace(model)
    assert isinstance(traced, torch.fx.GraphModule)
    with torch.no_grad():
        assert model(x).shape == (1, 10)
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert "layer2.downsample.0" in targets and "fc" in targets


def test_pretrained_traces_with_same_outputs(split) -> None:
    model = load_pretrained()
    traced = torch.fx.symbolic_trace(model)
    test = split[2]
    with torch.no_grad():
        torch.testing.assert_close(traced(test.x[:32]), model(test.x[:32]))


# -- training ----------------------------------------------------------------------------------


def test_short_training_is_deterministic_and_learns(split) -> None:
    train_data, val, _ = split
    first = train(_small_model(), train_data, epochs=3, lr=1e-2, seed=0, batch_size=64)
    second = train(_small_model(), train_data, epochs=3, lr=1e-2, seed=0, batch_size=64)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert not first.training
    assert evaluate(first, val) > 0.5  # chance is 0.1


def test_seed_changes_batch_order(split) -> None:
    train_data = split[0]
    a = train(_small_model(), train_data, epochs=1, seed=0)
    b = train(_small_model(), train_data, epochs=1, seed=1)
    assert not torch.equal(a.fc.weight, b.fc.weight)


def test_fine_tune_on_fx_graph_module(split) -> None:
    train_data, val, _ = split
    torch.manual_seed(0)
    base = DigitsCNN(widths=(8, 16, 16)).eval()
    traced = torch.fx.symbolic_trace(copy.deepcopy(base))
    before = evaluate(traced, val)
    out = fine_tune(traced, train_data, steps=40, lr=3e-3, seed=0)
    assert out is traced and not traced.training
    assert not torch.equal(traced.fc.weight, base.fc.weight)
    assert evaluate(traced, val) > max(before, 0.5)


def test_fine_tune_by_epochs_and_argument_checks(split) -> None:
    train_data = split[0]
    model = fine_tune(_small_model(), train_data, epochs=1)
    assert isinstance(model, DigitsCNN)
    with pytest.raises(ValueError, match="exactly one"):
        fine_tune(_small_model(), train_data)
    with pytest.raises(ValueError, match="exactly one"):
        fine_tune(_small_model(), train_data, steps=1, epochs=1)
    with pytest.raises(ValueError, match="inputs but"):
        fine_tune(_small_model(), (train_data.x, train_data.y[:3]), steps=1)


def test_progress_bar_goes_to_stderr(split, capsys) -> None:
    x, y = split[0]
    train(_small_model(), (x[:64], y[:64]), epochs=2, batch_size=32, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "4/4" in captured.err


# -- measurement -------------------------------------------------------------------------------


def test_evaluate_restores_mode_and_counts(split) -> None:
    model = _small_model().train()
    x, y = split[2]
    with torch.no_grad():
        model.eval()
        pred = model(x).argmax(1)
        model.train()
    expected = float((pred == y).float().mean())
    assert evaluate(model, (x, y), batch_size=50) == pytest.approx(expected)
    assert model.training


def test_latency_is_positive_median() -> None:
    model = _small_model()
    ms = latency_ms(model, example_input(), repeats=5, warmup=1)
    assert ms > 0.0 and model.training
    with pytest.raises(ValueError):
        latency_ms(model, repeats=0)


# -- reports -----------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_accuracy_vs_macs_writes_png_atomically(tmp_path) -> None:
    from secateurs.demo.report import plot_accuracy_vs_macs

    results = {
        "l1": [(1.0, 0.99), (0.5, 0.97), (0.25, 0.90)],
        "random": [(0.25, 0.70), (1.0, 0.99), (0.5, 0.92)],
    }
    path = tmp_path / "plots" / "acc_vs_macs.png"
    written = plot_accuracy_vs_macs(results, path, baseline=0.99)
    assert written == path
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    assert data[12:16] == b"IHDR"
    assert [p.name for p in path.parent.iterdir()] == ["acc_vs_macs.png"]  # no temp left
    # Overwriting replaces the file in one step.
    plot_accuracy_vs_macs({"l2": [(1.0, 0.98)]}, path)
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in path.parent.iterdir()] == ["acc_vs_macs.png"]


def test_plot_with_deployment_panels_and_highlight(tmp_path) -> None:
    from matplotlib.image import imread

    from secateurs.demo.report import plot_accuracy_vs_macs

    names = ["l1", "l2", "bn_scale", "taylor", "fisher", "activation", "lamp", "random"]
    results = {n: [(1.0, 0.99), (0.75, 0.98 - 0.01 * i), (0.5, 0.9 - 0.02 * i)]
               for i, n in enumerate(names)}
    results["l2 + fine-tune"] = [(1.0, 0.99), (0.5, 0.985)]
    rows = [{"name": "dense fp32", "accuracy": 0.99, "bytes": 600_000, "latency_ms": 40.0},
            {"name": "pruned fp32", "accuracy": 0.985, "bytes": 300_000, "latency_ms": 30.0},
            {"name": "pruned + INT8", "accuracy": 0.986, "bytes": 100_000, "latency_ms": 15.0}]
    wide = plot_accuracy_vs_macs(results, tmp_path / "wide.png", baseline=0.99,
                                 highlight="l2 + fine-tune", deployment=rows)
    narrow = plot_accuracy_vs_macs(results, tmp_path / "narrow.png", baseline=0.99)
    wide_px, narrow_px = imread(wide), imread(narrow)
    assert wide_px.shape[1] > 1.4 * narrow_px.shape[1]  # two bar panels beside the curves
    # the legend sits outside the axes: the right part of the narrow plot holds legend text,
    # not white space only
    assert (narrow_px[:, -narrow_px.shape[1] // 5:, :3] < 0.5).any()
    with pytest.raises(ValueError, match="latency_ms"):
        plot_accuracy_vs_macs(results, tmp_path / "bad.png",
                              deployment=[{"name": "x", "accuracy": 1.0, "bytes": 1}])
    assert not (tmp_path / "bad.png").exists()


def test_plot_rejects_empty_or_bad_results(tmp_path) -> None:
    from secateurs.demo.report import plot_accuracy_vs_macs

    with pytest.raises(ValueError, match="at least one criterion"):
        plot_accuracy_vs_macs({}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="'l1' has no"):
        plot_accuracy_vs_macs({"l1": []}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="finite"):
        plot_accuracy_vs_macs({"l1": [(0.5, float("nan"))]}, tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_format_table_aligns_columns() -> None:
    from secateurs.demo.report import format_table

    table = format_table(
        [["l1_norm", 0.5, 0.98125, 12], ["random", 0.25, 0.7, None], ["bn", 1.0, 1.0, 7]],
        ["criterion", "macs", "accuracy", "n"],
    )
    expected = "\n".join(
        [
            "criterion    macs  accuracy   n",
            "---------  ------  --------  --",
            "l1_norm    0.5000    0.9812  12",
            "random     0.2500    0.7000",
            "bn         1.0000    1.0000   7",
        ]
    )
    assert table == expected
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        format_table([["x"]], ["a", "b"])


def test_progress_bar_tty_and_non_tty() -> None:
    import io

    from secateurs.demo.report import ProgressBar

    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    quiet = io.StringIO()
    with ProgressBar(5, "x", stream=quiet) as bar:
        for _ in range(5):
            bar.update()
    assert quiet.getvalue() == "" and bar.count == 5  # not a TTY, not forced

    forced = io.StringIO()
    with ProgressBar(20, "x", stream=forced, force=True) as bar:
        for _ in range(20):
            bar.update(postfix="ok")
    lines = forced.getvalue().splitlines()
    assert len(lines) == 11 and "\r" not in forced.getvalue()
    assert lines[-1] == "x [" + "#" * 30 + "] 20/20 ok"

    tty = FakeTTY()
    with ProgressBar(3, "t", stream=tty, min_interval_s=0.0) as bar:
        for _ in range(3):
            bar.update()
    out = tty.getvalue()
    assert out.startswith("\r") and out.endswith("3/3\x1b[K\n")

    disabled = FakeTTY()
    with ProgressBar(3, stream=disabled, enabled=False) as bar:
        bar.update(3)
    assert disabled.getvalue() == ""
