import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class AudioConv(torch.nn.Module):
    """wav2vec2's feature-encoder idiom: strided convolutions over a raw waveform of any
    length (the first needs at least 10 samples)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv1d(1, 8, 10, stride=5)
        self.conv2 = torch.nn.Conv1d(8, 8, 3, stride=2)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.gelu(self.conv1(wave.unsqueeze(1)))
        return self.head(torch.nn.functional.gelu(self.conv2(x)).mean(-1))


@pytest.fixture
def audio_onnx(tmp_path) -> str:
    """ONNX of :class:`AudioConv` with input ``wave [batch, time]``, both dims symbolic."""
    path = tmp_path / "audio.onnx"
    torch.onnx.export(AudioConv().eval(), (torch.randn(1, 400),), str(path), dynamo=False,
                      input_names=["wave"], dynamic_axes={"wave": {0: "batch", 1: "time"}})
    return str(path)
