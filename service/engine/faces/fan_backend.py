"""face-alignment backend: S3FD detection batched over images, FAN-4 landmarks batched over faces.

face_alignment 1.5.0's `get_landmarks_from_batch` loops image by image; here its networks are
driven directly. The maths follow its source (api.py, utils.py, detection/sfd/):
- S3FD: BGR input minus (104, 117, 123); softmax per level; anchors of side 4*stride at
  stride/2 + i*stride; box = decode(loc, variances 0.1/0.2); NMS at IoU 0.3 (inclusive-pixel
  areas); faces kept above `detection_threshold` (0.5). Score = softmax face probability, 0..1.
- FAN: centre = box centre moved up by 0.12 * box height; scale = (w + h) / reference_scale
  (195 for S3FD); the square region of side 200 * scale around it (integer corners) is resized
  bilinearly to 256 x 256, RGB / 255; heatmaps of the flipped crop are added (flip_input);
  each point = heatmap argmax + 0.5, nudged 0.25 towards the larger neighbour, mapped back.
Deliberate differences: crops are cut with grid_sample for all faces at once instead of cv2
(same sample positions, float instead of uint8 rounding); landmarks stay sub-pixel floats where
face_alignment truncates them to int; images larger than `max_detect_side` are downscaled for
detection only (S3FD runs at full resolution otherwise: a 12 MP photo would need gigabytes of
activations); set `max_detect_side=None` for face_alignment's behaviour. Other detectors
("blazeface", "retinaface") use face_alignment's own classes, one image at a time.

Weights are read from `weights_dir` (default `$TORCH_HOME/hub/checkpoints`, where
face_alignment caches them) and downloaded only if `allow_download=True`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from service.engine.faces.base import (
    Box,
    DetectedFace,
    FaceBackend,
    ImageFaces,
    as_rgb_uint8,
    per_image_min_sizes,
    sort_and_filter,
)

FAN_FILE = "2DFAN4-11f355bf06.pth.tar"  # state dict of face_alignment.models.FAN(4)
S3FD_FILE = "s3fd-619a316812.pth"  # state dict of face_alignment.detection.sfd.net_s3fd.s3fd
DETECTOR_FILES: dict[str, tuple[str, ...]] = {
    "sfd": (S3FD_FILE,),
    "blazeface": ("blazeface.pth", "anchors.npy"),
    "retinaface": ("retinaface_mobilenet0.25.pth",),
}
DOWNLOAD_URLS = {
    FAN_FILE: "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar",
    S3FD_FILE: "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth",
    "retinaface_mobilenet0.25.pth": "https://www.adrianbulat.com/downloads/python-fan/retinaface_mobilenet0.25.pth",
    "blazeface.pth": "https://github.com/hollance/BlazeFace-PyTorch/blob/master/blazeface.pth?raw=true",
    "anchors.npy": "https://github.com/hollance/BlazeFace-PyTorch/blob/master/anchors.npy?raw=true",
}

CROP_RESOLUTION = 256
HEATMAP_RESOLUTION = 64
SCALE_FACTOR = 200.0
CENTER_Y_OFFSET = 0.12
S3FD_REFERENCE_SCALE = 195.0
S3FD_MEAN_BGR = (104.0, 117.0, 123.0)
S3FD_CANDIDATE_THRESHOLD = 0.05
S3FD_NMS_IOU = 0.3
S3FD_VARIANCES = (0.1, 0.2)
# Left-right mirror of the 68 iBUG points, to add the heatmaps of the flipped crop.
MIRRORED_POINTS = (
    16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
    26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 27, 28, 29, 30, 35, 34, 33, 32, 31,
    45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,
    54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65,
)  # fmt: skip


def s3fd_level_sizes(side: int) -> tuple[int, ...]:
    """Feature-map sizes of S3FD's six detection levels for an input side (pools floor; fc6
    pads by 3 so it grows by 4; conv6_2 and conv7_2 halve rounding up)."""
    f3 = side // 4
    f4 = f3 // 2
    f5 = f4 // 2
    fc7 = f5 // 2 + 4
    f6 = (fc7 - 1) // 2 + 1
    f7 = (f6 - 1) // 2 + 1
    return (f3, f4, f5, fc7, f6, f7)


def write_untrained_weights(folder: Path, *, seed: int = 0) -> None:
    """Write seeded, untrained S3FD + FAN-4 weight files under their real names into `folder`.

    For speed benchmarks and tests on machines that cannot download the real weights: the
    networks have the real shapes and cost, but their detections and landmarks mean nothing.
    Random heads score every anchor near 0.5, which would yield ~10^4 candidate boxes; the face
    logit is pushed down everywhere except on the coarsest level (stride 128, 512-px anchors),
    so a photo gets about one detection, as a trained network would give a handful.
    """
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    torch.manual_seed(seed)
    torch.save(FAN(4).state_dict(), folder / FAN_FILE)
    detector = s3fd()
    with torch.no_grad():
        for name, module in detector.named_modules():
            if name.endswith("mbox_conf"):
                module.bias.zero_()
                module.bias[-1] = 1.0 if name.startswith("conv7_2") else -6.0
    torch.save(detector.state_dict(), folder / S3FD_FILE)


class FaceAlignmentWeightsMissing(FileNotFoundError):
    """The backend's weight files are absent and downloading is not allowed."""


def default_weights_dir() -> Path:
    """Where face_alignment itself caches its weights: `$TORCH_HOME/hub/checkpoints`."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def required_weight_files(detector: str) -> tuple[str, ...]:
    """File names the backend needs in its weights directory for `detector`."""
    if detector not in DETECTOR_FILES:
        raise ValueError(
            f"unknown face-alignment detector {detector!r}; choose one of {sorted(DETECTOR_FILES)}"
        )
    return (FAN_FILE, *DETECTOR_FILES[detector])


def ensure_weights(weights_dir: Path, detector: str, *, allow_download: bool) -> None:
    """Check the files are present before anything else happens; fetch them only if allowed."""
    missing = [name for name in required_weight_files(detector) if not (weights_dir / name).is_file()]
    if not missing:
        return
    if not allow_download:
        listing = "\n".join(f"  {weights_dir / name}   (from {DOWNLOAD_URLS[name]})" for name in missing)
        raise FaceAlignmentWeightsMissing(
            f"face-alignment backend: weight files missing and downloading is disabled:\n{listing}\n"
            "Copy them there, point weights_dir at a folder holding them, or allow downloading."
        )
    weights_dir.mkdir(parents=True, exist_ok=True)
    for name in missing:
        torch.hub.download_url_to_file(DOWNLOAD_URLS[name], str(weights_dir / name), progress=False)


def nms_keep(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy NMS with face_alignment's inclusive-pixel areas ((x2 - x1 + 1) * (y2 - y1 + 1))."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        overlap = w * h / (areas[best] + areas[rest] - w * h)
        order = rest[overlap <= iou_threshold]
    return keep


class FanFaceBackend(FaceBackend):
    """S3FD (or another face_alignment detector) + FAN 2D 68 points, on CPU or CUDA."""

    name = "face-alignment"

    def __init__(
        self,
        *,
        device: str = "cpu",
        min_face_size: int = 20,
        detector: str = "sfd",
        weights_dir: Path | None = None,
        allow_download: bool = False,
        flip_input: bool = True,
        detection_threshold: float = 0.5,
        max_detect_side: int | None = 1280,
        fan_batch_size: int = 32,
    ) -> None:
        self.weights_dir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
        ensure_weights(self.weights_dir, detector, allow_download=allow_download)
        # Imported only now: face_alignment pulls in cv2, scikit-image and numba (an optional extra).
        try:
            from face_alignment.models import FAN
        except ImportError as error:
            raise RuntimeError(
                "the face-alignment backend needs its extra: pip install 'fermam-service[face-alignment]'"
            ) from error

        self.device = torch.device(device)
        self.min_face_size = int(min_face_size)
        self.detector_name = detector
        self.flip_input = flip_input
        self.detection_threshold = float(detection_threshold)
        self.max_detect_side = max_detect_side
        self.fan_batch_size = int(fan_batch_size)
        self._lock = threading.Lock()

        self._fan = FAN(4)
        self._fan.load_state_dict(self._load_state_dict(FAN_FILE))
        self._fan.to(self.device).eval()

        self._s3fd: torch.nn.Module | None = None
        self._other_detector = None
        if detector == "sfd":
            from face_alignment.detection.sfd.net_s3fd import s3fd

            self._s3fd = s3fd()
            self._s3fd.load_state_dict(self._load_state_dict(S3FD_FILE))
            self._s3fd.to(self.device).eval()
            self.reference_scale = S3FD_REFERENCE_SCALE
        else:
            self._other_detector = self._face_alignment_detector(detector)
            self.reference_scale = float(self._other_detector.reference_scale)

    def _load_state_dict(self, file_name: str) -> dict[str, torch.Tensor]:
        path = self.weights_dir / file_name
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated download or a wrong file: say which
            raise RuntimeError(f"could not load face-alignment weights {path}: {error}") from error

    def _face_alignment_detector(self, detector: str):
        files = [str(self.weights_dir / name) for name in DETECTOR_FILES[detector]]
        device = str(self.device)
        if detector == "blazeface":
            from face_alignment.detection.blazeface import FaceDetector

            return FaceDetector(device=device, path_to_detector=files[0], path_to_anchor=files[1])
        from face_alignment.detection.retinaface import FaceDetector

        return FaceDetector(device=device, path_to_detector=files[0])

    # ---------------------------------------------------------------- public API

    @torch.inference_mode()
    def detect(
        self, images: Sequence[np.ndarray], *, min_face_size: int | Sequence[int] | None = None
    ) -> list[ImageFaces]:
        min_sizes = per_image_min_sizes(len(images), self.min_face_size, min_face_size)
        rgb = [as_rgb_uint8(image) for image in images]
        if not rgb:
            return []
        with self._lock:
            tensors = [self._to_device(image) for image in rgb]
            if self._s3fd is not None:
                boxes = self._detect_s3fd(tensors)
            else:
                boxes = [self._detect_other(image) for image in rgb]
            # Size filter before FAN: landmarks of faces that will be dropped are never computed.
            kept_boxes, skipped = [], []
            for image_boxes, min_size in zip(boxes, min_sizes, strict=True):
                kept = [b for b in image_boxes if min(b[2] - b[0], b[3] - b[1]) >= min_size]
                kept_boxes.append(kept)
                skipped.append(len(image_boxes) - len(kept))
            requests = [(i, b[:4]) for i, image_boxes in enumerate(kept_boxes) for b in image_boxes]
            landmarks = self._landmarks(tensors, requests)
        results: list[ImageFaces] = []
        cursor = 0
        for image_boxes, skipped_small in zip(kept_boxes, skipped, strict=True):
            faces = []
            for x1, y1, x2, y2, score in image_boxes:
                box = (float(x1), float(y1), float(x2 - x1), float(y2 - y1))
                faces.append(DetectedFace(box, float(score), landmarks[cursor]))
                cursor += 1
            image_faces = sort_and_filter(faces, 0)
            image_faces.skipped_small = skipped_small
            results.append(image_faces)
        return results

    @torch.inference_mode()
    def landmarks_for_boxes(self, image: np.ndarray, boxes: Sequence[Box]) -> list[DetectedFace]:
        rgb = as_rgb_uint8(image)
        for box in boxes:
            if box[2] <= 0 or box[3] <= 0:
                raise ValueError(f"box must have positive width and height, got {tuple(box)}")
        with self._lock:
            corners = [(x, y, x + w, y + h) for x, y, w, h in boxes]
            landmarks = self._landmarks([self._to_device(rgb)], [(0, c) for c in corners])
        return [
            DetectedFace(tuple(float(v) for v in box), 1.0, points, detected=False)
            for box, points in zip(boxes, landmarks, strict=True)
        ]

    # ---------------------------------------------------------------- detection

    def _to_device(self, image: np.ndarray) -> torch.Tensor:
        """(3, H, W) float32 RGB in 0..255 on the backend's device."""
        pixels = torch.from_numpy(np.require(image, requirements=["C", "W"]))
        return pixels.to(self.device).permute(2, 0, 1).float()

    def _detect_s3fd(self, images: list[torch.Tensor]) -> list[list[tuple[float, ...]]]:
        """S3FD over all images in one forward pass: resized if too large, padded to one size."""
        ratios, resized = [], []
        for image in images:
            h, w = image.shape[1:]
            ratio = 1.0
            if self.max_detect_side is not None and max(h, w) > self.max_detect_side:
                ratio = self.max_detect_side / max(h, w)
                size = (max(1, round(h * ratio)), max(1, round(w * ratio)))
                image = F.interpolate(
                    image[None], size=size, mode="bilinear", antialias=True, align_corners=False
                )[0]
            ratios.append(ratio)
            resized.append(image)
        height = max(im.shape[1] for im in resized)
        width = max(im.shape[2] for im in resized)
        # Pad with the mean colour so the padding is 0 after normalisation, as conv padding is.
        mean_bgr = torch.tensor(S3FD_MEAN_BGR, device=self.device).view(1, 3, 1, 1)
        batch = torch.zeros((len(resized), 3, height, width), device=self.device)
        for k, image in enumerate(resized):
            batch[k, :, : image.shape[1], : image.shape[2]] = image.flip(0) - mean_bgr[0]
        assert self._s3fd is not None
        outputs = self._s3fd(batch)  # [cls1, reg1, ..., cls6, reg6]
        per_image: list[list[tuple[float, ...]]] = []
        levels = [
            (F.softmax(outputs[2 * i], dim=1)[:, 1], outputs[2 * i + 1], 2 ** (i + 2))
            for i in range(len(outputs) // 2)
        ]
        for k, (image, ratio) in enumerate(zip(resized, ratios, strict=True)):
            boxes, scores = self._decode_s3fd(levels, k, image.shape[1], image.shape[2])
            if len(scores):
                # Boxes under the final threshold can never suppress a stronger one, so dropping
                # them before NMS changes nothing and keeps NMS small.
                strong = scores > self.detection_threshold
                boxes, scores = boxes[strong], scores[strong]
                keep = nms_keep(boxes, scores, S3FD_NMS_IOU)
                boxes, scores = boxes[keep] / ratio, scores[keep]
            per_image.append([(*b, s) for b, s in zip(boxes.tolist(), scores.tolist(), strict=True)])
        return per_image

    @staticmethod
    def _decode_s3fd(levels, k: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidate boxes (x1, y1, x2, y2) and scores of image k, from the cells it has alone.

        Cells that exist only because the batch was padded are ignored, so an image gets the
        anchors face_alignment would give it on its own.
        """
        all_boxes, all_scores = [], []
        for (probability, regression, stride), rows_alone, cols_alone in zip(
            levels, s3fd_level_sizes(height), s3fd_level_sizes(width), strict=True
        ):
            rows, cols = torch.nonzero(
                probability[k, :rows_alone, :cols_alone] > S3FD_CANDIDATE_THRESHOLD, as_tuple=True
            )
            anchor_x = stride / 2 + cols.float() * stride
            anchor_y = stride / 2 + rows.float() * stride
            loc = regression[k][:, rows, cols].double()  # (4, n)
            side = stride * 4.0
            cx = anchor_x.double() + loc[0] * S3FD_VARIANCES[0] * side
            cy = anchor_y.double() + loc[1] * S3FD_VARIANCES[0] * side
            w = side * torch.exp(loc[2] * S3FD_VARIANCES[1])
            h = side * torch.exp(loc[3] * S3FD_VARIANCES[1])
            all_boxes.append(torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1))
            all_scores.append(probability[k][rows, cols].double())
        return torch.cat(all_boxes).cpu().numpy(), torch.cat(all_scores).cpu().numpy()

    def _detect_other(self, image: np.ndarray) -> list[tuple[float, ...]]:
        found = self._other_detector.detect_from_image(image.copy())
        boxes = []
        for d in found:
            score = float(d[4]) if len(d) > 4 else 1.0
            if score > self.detection_threshold:
                boxes.append((float(d[0]), float(d[1]), float(d[2]), float(d[3]), score))
        return boxes

    # ---------------------------------------------------------------- landmarks

    def _landmarks(
        self, images: list[torch.Tensor], requests: list[tuple[int, Sequence[float]]]
    ) -> list[np.ndarray]:
        """68 points for every (image index, (x1, y1, x2, y2)) request, FAN batched over all."""
        if not requests:
            return []
        corners = np.array([c for _, c in requests], dtype=np.float64)
        x1, y1, x2, y2 = corners.T
        centre_x = x2 - (x2 - x1) / 2.0
        centre_y = y2 - (y2 - y1) / 2.0 - (y2 - y1) * CENTER_Y_OFFSET
        side = SCALE_FACTOR * (x2 - x1 + y2 - y1) / self.reference_scale  # 200 * scale
        # face_alignment's crop(): integer corners of the region, which is then resized to 256.
        left = np.trunc((1.0 / CROP_RESOLUTION - 0.5) * side + centre_x)
        top = np.trunc((1.0 / CROP_RESOLUTION - 0.5) * side + centre_y)
        right = np.trunc(0.5 * side + centre_x)
        bottom = np.trunc(0.5 * side + centre_y)

        crops = torch.empty((len(requests), 3, CROP_RESOLUTION, CROP_RESOLUTION), device=self.device)
        steps = (np.arange(CROP_RESOLUTION) + 0.5) / CROP_RESOLUTION
        for image_index in sorted({i for i, _ in requests}):
            faces = [k for k, (i, _) in enumerate(requests) if i == image_index]
            image = images[image_index]
            h, w = image.shape[1:]
            # Sample positions of a bilinear resize (half-pixel centres), in image pixels.
            xs = left[faces, None] + steps[None, :] * (right - left)[faces, None] - 0.5
            ys = top[faces, None] + steps[None, :] * (bottom - top)[faces, None] - 0.5
            grid = np.empty((len(faces), CROP_RESOLUTION, CROP_RESOLUTION, 2), dtype=np.float32)
            grid[..., 0] = ((2.0 * xs + 1.0) / w - 1.0)[:, None, :]
            grid[..., 1] = ((2.0 * ys + 1.0) / h - 1.0)[:, :, None]
            grid_t = (
                torch.from_numpy(grid)
                .to(self.device)
                .view(1, len(faces) * CROP_RESOLUTION, CROP_RESOLUTION, 2)
            )
            sampled = F.grid_sample(
                image[None] / 255.0, grid_t, mode="bilinear", padding_mode="zeros", align_corners=False
            )
            crops[faces] = sampled.view(3, len(faces), CROP_RESOLUTION, CROP_RESOLUTION).transpose(0, 1)

        heatmaps = torch.cat([self._heatmaps(chunk) for chunk in crops.split(self.fan_batch_size)])
        points = self._decode_heatmaps(heatmaps).cpu().numpy().astype(np.float64)  # (F, 68, 2) in 0..64
        points = points * (side / HEATMAP_RESOLUTION)[:, None, None]
        points[..., 0] += (centre_x - side / 2)[:, None]
        points[..., 1] += (centre_y - side / 2)[:, None]
        return [p.astype(np.float32) for p in points]

    def _heatmaps(self, crops: torch.Tensor) -> torch.Tensor:
        """FAN's last-stack heatmaps (B, 68, 64, 64), plus those of the mirrored crop."""
        heatmaps = self._fan(crops)[-1]
        if self.flip_input:
            mirrored = self._fan(crops.flip(-1))[-1]
            heatmaps = heatmaps + mirrored[:, list(MIRRORED_POINTS)].flip(-1)
        return heatmaps.float()

    @staticmethod
    def _decode_heatmaps(heatmaps: torch.Tensor) -> torch.Tensor:
        """Argmax + 0.5, moved 0.25 towards the larger neighbour (inner pixels only): (B, 68, 2)."""
        batch, points, size, _ = heatmaps.shape
        flat = heatmaps.reshape(batch, points, size * size)
        index = flat.argmax(dim=-1)
        px, py = index % size, index // size
        coordinates = torch.stack([px, py], dim=-1).float() + 0.5
        inner = (px > 0) & (px < size - 1) & (py > 0) & (py < size - 1)
        cx, cy = px.clamp(1, size - 2), py.clamp(1, size - 2)

        def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
            return flat.gather(-1, (yy * size + xx).unsqueeze(-1)).squeeze(-1)

        dx = torch.sign(at(cy, cx + 1) - at(cy, cx - 1))
        dy = torch.sign(at(cy + 1, cx) - at(cy - 1, cx))
        coordinates += 0.25 * torch.stack([dx, dy], dim=-1) * inner.unsqueeze(-1)
        return coordinates
