"""to_model_input: the one crop -> tensor conversion shared by training, eval and the service."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import InputContract
from model.data import to_model_input

VAL_NPZ = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "ferplus" / "val.npz"
UNIT = InputContract(input_size=112, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), colour_mode="gray")
# PIL rounds its output to uint8; ours stays float, so they differ by at most about one level.
PIL_TOLERANCE = 1.5 / 255


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    with np.load(VAL_NPZ, allow_pickle=False) as data:
        return data["images"][:6].copy()


def _pil_resize(images: np.ndarray, side: int) -> np.ndarray:
    return np.stack(
        [np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BILINEAR)) for im in images]
    )


def test_gray_faces_upsample_like_pil_and_fill_three_channels(faces: np.ndarray) -> None:
    x = to_model_input(torch.from_numpy(faces), UNIT)
    assert x.shape == (6, 3, 112, 112) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    np.testing.assert_allclose(x[:, 0].numpy(), _pil_resize(faces, 112) / 255.0, atol=PIL_TOLERANCE)


def test_large_crops_are_antialiased_when_shrunk() -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(2, 448, 448), dtype=np.uint8)
    x = to_model_input(noise, UNIT)
    # PIL's bilinear resize widens its kernel when shrinking; plain bilinear sampling would not.
    np.testing.assert_allclose(x[:, 0].numpy(), _pil_resize(noise, 112) / 255.0, atol=PIL_TOLERANCE)


def test_gray_mode_turns_rgb_into_pil_luminance() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)
    x = to_model_input(rgb, UNIT)
    luma = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb]) / 255.0
    np.testing.assert_allclose(x[:, 1].numpy(), luma, atol=PIL_TOLERANCE)


def test_rgb_mode_keeps_channel_order_and_normalises_per_channel() -> None:
    contract = InputContract(input_size=8, mean=(0.5, 0.4, 0.3), std=(0.5, 0.25, 0.2), colour_mode="rgb")
    rgb = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 102, 0
    x = to_model_input(rgb, contract)
    expected = [(1.0 - 0.5) / 0.5, (0.4 - 0.4) / 0.25, (0.0 - 0.3) / 0.2]
    np.testing.assert_allclose(x[0, :, 3, 3].numpy(), expected, atol=1e-6)
    gray = to_model_input(np.full((1, 8, 8), 255, dtype=np.uint8), contract)
    np.testing.assert_allclose(gray[0, :, 0, 0].numpy(), [1.0, 2.4, 3.5], atol=1e-6)


def test_float_input_in_unit_range_matches_uint8(faces: np.ndarray) -> None:
    contract = InputContract()
    from_uint8 = to_model_input(torch.from_numpy(faces), contract)
    from_float = to_model_input(torch.from_numpy(faces).float() / 255.0, contract)
    torch.testing.assert_close(from_float, from_uint8)


def test_rejects_images_without_a_channel_axis_it_understands() -> None:
    with pytest.raises(ValueError):
        to_model_input(np.zeros((2, 8, 8, 4), dtype=np.uint8), UNIT)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(faces: np.ndarray) -> None:
    contract = InputContract()
    on_gpu = to_model_input(torch.from_numpy(faces).cuda(), contract)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), to_model_input(faces, contract), atol=1e-5, rtol=1e-5)
