import json
import subprocess
import sys

import torch

from secateurs.cli import main


def test_prune_cli_writes_model_and_plan(tmp_path, capsys):
    out, plan = tmp_path / "r.pt2", tmp_path / "plan.json"
    code = main(["prune", "zoo:resnet", "--ratio", "0.5", "--round-to", "4", "--verify",
                 "-o", str(out), "--plan", str(plan)])
    assert code == 0
    text = capsys.readouterr().out
    assert "MACs" in text and "exact" in text
    loaded = torch.export.load(str(out)).module()
    from secateurs import zoo

    x = zoo.get("resnet").example_inputs()
    assert loaded(*x).shape == (1, 10)
    doc = json.loads(plan.read_text())
    assert doc["format"] == "secateurs-plan" and doc["removed"]


def test_prune_cli_pickled_module(tmp_path):
    out = tmp_path / "r.pt"
    assert main(["prune", "zoo:densenet", "--ratio", "0.3", "-o", str(out)]) == 0
    model = torch.load(str(out), weights_only=False)
    from secateurs import zoo

    assert model(*zoo.get("densenet").example_inputs()).shape == (1, 10)


def test_prune_cli_json(capsys):
    assert main(["prune", "zoo:vgg", "--ratio", "0.3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["macs_after"] < report["macs_before"]


def test_analyze_cli(capsys):
    assert main(["analyze", "zoo:vit"]) == 0
    assert "prunable units" in capsys.readouterr().out


def test_bad_spec_exit_2_and_no_output(tmp_path, capsys):
    out = tmp_path / "x.pt2"
    assert main(["prune", "zoo:nonexistent", "-o", str(out)]) == 2
    assert "nonexistent" in capsys.readouterr().err
    assert not out.exists()
    assert main(["prune", "zoo:resnet", "--ratio", "2", "-o", str(out)]) == 2
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_file_factory_spec(tmp_path, capsys):
    src = tmp_path / "m.py"
    src.write_text("import torch\n"
                   "def make():\n"
                   "    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),"
                   " torch.nn.Linear(16, 4))\n")
    assert main(["prune", f"{src}:make", "--input-shape", "2,8"]) == 0
    assert main(["prune", f"{src}:make"]) == 2
    assert "--input-shape" in capsys.readouterr().err


def test_help_runs():
    res = subprocess.run([sys.executable, "-m", "secateurs", "--help"], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "prune" in res.stdout


def test_prune_cli_onnx_in_onnx_out(tmp_path, capsys):
    import onnx

    from secateurs import zoo
    from secateurs.runtime.onnx_export import export_onnx

    entry = zoo.get("vgg")
    src = tmp_path / "vgg.onnx"
    export_onnx(entry.build(), entry.example_inputs(), str(src))
    out, plan = tmp_path / "pruned.onnx", tmp_path / "plan.json"
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--verify",
                 "--plan", str(plan)]) == 0
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert "exact" in capsys.readouterr().out
    assert json.loads(plan.read_text())["frontend"] == "onnx"
    # a truncated file: clear error, exit 2, nothing written
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(src.read_bytes()[:100])
    out2 = tmp_path / "never.onnx"
    assert main(["prune", str(bad), "-o", str(out2)]) == 2
    assert not out2.exists()


def test_every_command_module_is_registered():
    import pkgutil

    from secateurs import cli, commands

    modules = {m.name for m in pkgutil.iter_modules(commands.__path__)
               if not m.name.startswith("_")}
    assert modules == set(cli.COMMANDS)
    choices = cli.build_parser()._subparsers._group_actions[0].choices
    assert set(choices) == modules


def test_output_checks_run_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    from secateurs.commands import _spec

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the output path was checked")

    monkeypatch.setattr(_spec, "load_torch_spec", never)
    from secateurs.commands import prune as prune_cmd

    monkeypatch.setattr(prune_cmd, "load_torch_spec", never)
    assert main(["prune", "zoo:resnet", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "written as .pt2" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unexpected_error_is_one_line_exit_1(monkeypatch, capsys):
    from secateurs.commands import analyze

    def boom(args):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(analyze, "run", boom)  # registered inside main(): picks up boom
    assert main(["analyze", "zoo:mlp"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert err == ["secateurs analyze: error: internal error: RuntimeError: something inside "
                   "broke (run with --debug for the traceback)"]


def test_calibration_file_shapes_are_checked(tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "c.npz", np.zeros((4, 3, 8, 8), dtype=np.float32))
    assert main(["prune", "zoo:resnet", "--importance", "activation",
                 "--calibration", str(tmp_path / "c.npz")]) == 2
    err = capsys.readouterr().err
    assert "samples of shape (3, 8, 8)" in err and "(3, 32, 32)" in err


def test_file_factory_with_keyword_inputs(tmp_path, capsys):
    """A factory returning ``(module, {"x": ..., "mask": ...})`` (a tokenizer's output) had
    its dict passed as ``forward``'s first argument; it is placed by the signature now, for
    prune and sparsify alike."""
    src = tmp_path / "m.py"
    src.write_text(
        "import torch\n"
        "class Masked(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)\n"
        "    def forward(self, x, scale=None, mask=None):\n"
        "        return self.fc2(torch.relu(self.fc1(x)) * mask)\n"
        "def make():\n"
        "    return Masked(), {'mask': torch.ones(2, 1), 'x': torch.randn(2, 8)}\n")
    out = tmp_path / "p.pt"
    assert main(["prune", f"{src}:make", "--ratio", "0.5", "--round-to", "1", "--verify",
                 "-o", str(out)]) == 0
    assert "exact" in capsys.readouterr().out
    pruned = torch.load(str(out), weights_only=False)
    assert pruned(torch.randn(2, 8), None, torch.ones(2, 1)).shape == (2, 4)
    sparse = tmp_path / "s.pt"
    assert main(["sparsify", f"{src}:make", "--pattern", "2:4", "--method", "wanda",
                 "--min-numel", "1", "-o", str(sparse)]) == 0
    state = torch.load(str(sparse), weights_only=False)["state_dict"]
    assert float((state["fc1.weight"] == 0).float().mean()) == 0.5
