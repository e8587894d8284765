"""Train the demo's DigitsCNN from scratch and write ``secateurs/data/digits_cnn.pt``.

Deterministic (seed 0, one CPU thread): rerunning reproduces the shipped weights on the same
torch build. Takes about 15 s on one core. Usage::

    python tools/train_digits.py [--epochs 20] [--lr 3e-3] [--seed 0] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from secateurs.demo.digits import DigitsCNN, evaluate, load_digits_split, train

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "secateurs" / "data" / "digits_cnn.pt"


def _umask() -> int:
    """The process umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_atomically(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``state`` with ``torch.save`` to a temp file beside ``path``, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    """Train, report train/val/test accuracy, save the state_dict; return an exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--min-test-accuracy", type=float, default=0.97)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    train_data, val_data, test_data = load_digits_split(seed=args.seed)
    model = DigitsCNN()
    start = time.perf_counter()
    train(model, train_data, epochs=args.epochs, lr=args.lr, seed=args.seed, progress=True)
    elapsed = time.perf_counter() - start

    accuracy = {
        name: evaluate(model, data)
        for name, data in (("train", train_data), ("val", val_data), ("test", test_data))
    }
    params = sum(p.numel() for p in model.parameters())
    print(f"trained DigitsCNN ({params} parameters) in {elapsed:.1f} s")
    for name, value in accuracy.items():
        print(f"{name:>5} accuracy: {value:.4f}")
    if accuracy["test"] < args.min_test_accuracy:
        print(
            f"error: test accuracy {accuracy['test']:.4f} < {args.min_test_accuracy}; "
            f"not writing {args.out}",
            file=sys.stderr,
        )
        return 1
    save_atomically(model.state_dict(), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
