"""The fast CPU runtimes hold to the plain PyTorch reference on real faces (FER+ val crops)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint
from model.data.transforms import to_model_input
from model.weights import default_weights_path
from service.engine import cpu_runtime

VAL = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "ferplus" / "val.npz"
FACES = 16
# Probabilities agree to ~1e-5 in float32 (measured max 4e-6 on logits); the bound leaves room for
# other instruction sets' summation orders, and top-1 must agree on every face.
MAX_PROB_DIFF = 1e-3


@pytest.fixture(scope="module")
def model_and_faces():
    model, _ = load_checkpoint(default_weights_path(), map_location="cpu")
    faces = to_model_input(np.load(VAL)["images"][:FACES], model.config.contract)
    return model.eval(), faces


@pytest.fixture(scope="module")
def onnx_path(model_and_faces) -> Path:
    """The engine's own cached export of the shipped weights (minutes the first time)."""
    pytest.importorskip("onnxscript")
    model, _ = model_and_faces
    sha = hashlib.sha256(default_weights_path().read_bytes()).hexdigest()
    return cpu_runtime.exported_onnx(model, model.config.contract.input_size, sha)


def assert_matches_reference(model, faces: torch.Tensor, run) -> None:
    reference = torch.softmax(cpu_runtime.torch_classifier(model)(faces), -1)
    # An odd batch size, not the export's example size, through the dynamic batch dimension.
    fast = torch.softmax(torch.cat([run(faces[:5]), run(faces[5:])]), -1)
    assert fast.shape == reference.shape
    assert (fast - reference).abs().max().item() < MAX_PROB_DIFF
    assert torch.equal(fast.argmax(1), reference.argmax(1))


@pytest.mark.slow
def test_onnx_runtime_matches_pytorch(model_and_faces, onnx_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model, faces = model_and_faces
    assert_matches_reference(model, faces, cpu_runtime.onnx_session_classifier(onnx_path, threads=2))


@pytest.mark.slow
def test_openvino_matches_pytorch(model_and_faces, onnx_path: Path) -> None:
    pytest.importorskip("openvino")
    model, faces = model_and_faces
    assert_matches_reference(model, faces, cpu_runtime.openvino_file_classifier(onnx_path, threads=2))


def test_unknown_runtime_is_refused_at_build(model_and_faces) -> None:
    model, _ = model_and_faces
    with pytest.raises(ValueError, match="unknown cpu_runtime"):
        cpu_runtime.build_classifier(model, "tensorrt", input_size=112)


def test_settings_runtimes_are_the_engines() -> None:
    from service.settings import Settings

    field = Settings.model_fields["cpu_runtime"]
    assert set(field.annotation.__args__) == set(cpu_runtime.CPU_RUNTIMES)


@pytest.mark.slow
def test_engine_with_onnx_runtime_answers_as_the_torch_engine(engine_factory) -> None:
    """The whole engine behind `cpu_runtime=onnx`: same faces, same expression, same scores."""
    pytest.importorskip("onnxruntime")
    photo = (
        Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "photos" / "aflw-test.jpg"
    ).read_bytes()
    answers = []
    for runtime in ("torch", "onnx"):
        engine = engine_factory(cpu_runtime=runtime)
        asyncio.run(engine.start())
        try:
            answers.append(asyncio.run(engine.infer([photo])).images[0].faces)
        finally:
            asyncio.run(engine.stop())
    reference, fast = answers
    assert len(reference) == len(fast) == 1
    assert fast[0].expression == reference[0].expression
    for name, score in reference[0].scores.items():
        assert abs(fast[0].scores[name] - score) < MAX_PROB_DIFF
