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

FERPLUS = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "ferplus"
VAL = FERPLUS / "val.npz"
TRAIN = FERPLUS / "train.npz"
PHOTO = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "photos" / "aflw-test.jpg"
FACES = 16
# int8 against float32 on the first 256 FER+ val faces, calibrated on 64 train faces: measured
# -0.4 points and 98.4% top-1 agreement (the full val split, 300 faces: docs/benchmarks.md); the
# limits leave room for other CPUs' int8 kernels and still fail a broken quantisation (a bad one
# measured here, quantising the wrong graph, fell to 41% agreement).
INT8_FACES = 256
INT8_MAX_ACCURACY_DROP = 0.015
INT8_MIN_AGREEMENT = 0.94
INT8_MAX_PROB_DIFF = 0.1
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
    """The engine's own cached, optimised export for ONNX Runtime (minutes the first time)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")  # CI has OpenVINO but not ONNX Runtime: skip the export too
    model, _ = model_and_faces
    sha = hashlib.sha256(default_weights_path().read_bytes()).hexdigest()
    return cpu_runtime.exported_onnx(model, model.config.contract.input_size, sha)


@pytest.fixture(scope="module")
def raw_onnx_path(model_and_faces) -> Path:
    """The unoptimised export the OpenVINO runtimes read (under a minute the first time)."""
    pytest.importorskip("onnxscript")
    model, _ = model_and_faces
    size = model.config.contract.input_size
    return cpu_runtime.exported_onnx(model, size, weights_sha256(), optimize=False)


def weights_sha256() -> str:
    return hashlib.sha256(default_weights_path().read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def int8_path(model_and_faces, raw_onnx_path: Path, tmp_path_factory) -> Path:
    """`fermam quantize` itself, on 64 FER+ train faces, with its --check on 256 val faces."""
    pytest.importorskip("nncf")
    pytest.importorskip("openvino")
    from service.commands import quantize

    out = tmp_path_factory.mktemp("int8") / "fermam.int8.xml"
    argv = ["--data", str(TRAIN), "--faces", "64", "--out", str(out), "--check", str(VAL)]
    assert quantize.main(argv + ["--check-faces", "64", "--threads", "2"]) == 0
    return out


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
def test_openvino_matches_pytorch(model_and_faces, raw_onnx_path: Path) -> None:
    pytest.importorskip("openvino")
    model, faces = model_and_faces
    assert_matches_reference(model, faces, cpu_runtime.openvino_file_classifier(raw_onnx_path, threads=2))


@pytest.mark.slow
def test_int8_stays_within_its_accuracy_limits(model_and_faces, int8_path: Path) -> None:
    """The int8 file on real FER+ val faces: accuracy and top-1 held to float32's."""
    model, _ = model_and_faces
    data = np.load(VAL)
    faces = to_model_input(data["images"][:INT8_FACES], model.config.contract)
    labels = torch.from_numpy(data["labels"][:INT8_FACES])
    order = [list(model.config.class_names).index(str(n)) for n in data["class_names"]]
    reference = cpu_runtime.torch_classifier(model)(faces)[:, order].argmax(1)
    int8 = cpu_runtime.build_classifier(
        model, "openvino-int8", input_size=112, threads=2, cache_key=weights_sha256(), int8_model=int8_path
    )
    fast = torch.cat([int8(faces[i : i + 32]) for i in range(0, INT8_FACES, 32)])[:, order].argmax(1)
    drop = (reference == labels).float().mean() - (fast == labels).float().mean()
    assert drop.item() <= INT8_MAX_ACCURACY_DROP
    assert (fast == reference).float().mean().item() >= INT8_MIN_AGREEMENT


@pytest.mark.slow
def test_int8_file_of_other_weights_is_refused(int8_path: Path, raw_onnx_path: Path, tmp_path) -> None:
    import openvino as ov

    with pytest.raises(cpu_runtime.Int8ModelMismatch, match="not the loaded"):
        cpu_runtime.read_int8_model(int8_path, "f" * 64)
    unrecorded = tmp_path / "plain.xml"  # an IR with no record of its weights (not from quantize)
    ov.save_model(ov.Core().read_model(str(raw_onnx_path)), str(unrecorded))
    with pytest.raises(cpu_runtime.Int8ModelMismatch, match="unrecorded"):
        cpu_runtime.read_int8_model(unrecorded, weights_sha256())


def test_int8_runtime_without_its_file_fails_at_build(model_and_faces, tmp_path) -> None:
    model, _ = model_and_faces
    with pytest.raises(ValueError, match="cpu_int8_model"):
        cpu_runtime.build_classifier(model, "openvino-int8", input_size=112)
    pytest.importorskip("openvino")
    with pytest.raises(FileNotFoundError, match="fermam quantize"):
        cpu_runtime.build_classifier(
            model, "openvino-int8", input_size=112, int8_model=tmp_path / "absent.xml"
        )


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
    reference, fast = engines_answer(engine_factory, {"cpu_runtime": "torch"}, {"cpu_runtime": "onnx"})
    assert fast[0].expression == reference[0].expression
    for name, score in reference[0].scores.items():
        assert abs(fast[0].scores[name] - score) < MAX_PROB_DIFF


def engines_answer(engine_factory, *settings: dict) -> list:
    """The faces each engine (one per settings dict) finds on aflw-test.jpg; one face each."""
    answers = []
    for overrides in settings:
        engine = engine_factory(**overrides)
        asyncio.run(engine.start())
        try:
            answers.append(asyncio.run(engine.infer([PHOTO.read_bytes()])).images[0].faces)
        finally:
            asyncio.run(engine.stop())
    assert [len(faces) for faces in answers] == [1] * len(settings)
    return answers


@pytest.mark.slow
def test_engine_with_int8_answers_as_the_torch_engine(engine_factory, int8_path: Path) -> None:
    """`cpu_runtime=openvino-int8` behind the whole engine: same face, same expression, scores close."""
    reference, fast = engines_answer(
        engine_factory,
        {"cpu_runtime": "torch"},
        {"cpu_runtime": "openvino-int8", "cpu_int8_model": int8_path, "torch_threads": 2},
    )
    assert fast[0].box == reference[0].box
    assert fast[0].expression == reference[0].expression
    for name, score in reference[0].scores.items():
        assert abs(fast[0].scores[name] - score) < INT8_MAX_PROB_DIFF
