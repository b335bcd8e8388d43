"""The engine: decode -> stage 1 (faces, batched over images) -> align -> stage 2 (FERMam,
batched over faces) -> results. Usable from Python without the web server (benchmarks drive it).

Threads: decoding and alignment run in a small pool (CPU work that releases the GIL in PIL and
numpy); each model stage has one batcher whose worker thread is the only caller of that stage's
model. The asyncio side only awaits futures, so one slow group photo never blocks other requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import load_checkpoint
from model.config import FERMamConfig
from model.device import resolve_device, resolve_dtype
from model.scoring import class_scores
from service.engine.admission import Admission
from service.engine.align_bounded import align_faces_bounded
from service.engine.batcher import (
    Batched,
    DeadlineExceeded,
    DynamicBatcher,
    QueueFull,
    ShuttingDown,
    gather_or_cancel,
)
from service.engine.decode import DecodedImage, ImageDecodeError, declared_size, decode_image
from service.engine.detect_stage import check_crop_size, detect_units, follow, run_detect_batch
from service.engine.face_quality import Pose, Quality, describe_faces
from service.engine.faces import Box, DetectedFace, FaceBackend, ImageFaces, create_face_backend
from service.engine.fair_pool import FairThreadPool
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger("fermam.engine")

DETECT_STAGE = "detect"
CLASSIFY_STAGE = "classify"


class NotReady(Exception):
    """The engine is not started (or is stopping); the request should be retried elsewhere."""


class InvalidRequest(ValueError):
    """A request option the engine cannot honour (e.g. above a server limit)."""


class ImageRejected(Exception):
    """One image of a request could not be used; `cause` is the decoder's typed error."""

    def __init__(self, index: int, cause: ImageDecodeError) -> None:
        super().__init__(f"image {index}: {cause}")
        self.index = index
        self.cause = cause


@dataclass(frozen=True)
class RequestOptions:
    """Per-request choices; None means the server's default."""

    detect: bool = True
    max_faces: int | None = None
    min_face_size: int | None = None
    return_landmarks: bool = True
    top_k: int | None = None


@dataclass(frozen=True)
class FaceResult:
    box: Box
    score: float
    detected: bool
    landmarks: np.ndarray | None  # (68, 2) float32 in image pixels, or None when not requested
    expression: str
    scores: dict[str, float]
    top: list[tuple[str, float]] | None
    pose: Pose | None = None  # fitted from the landmarks (service/engine/face_quality.py)
    quality: Quality | None = None


# A stream session's choice, per face of a frame, given the faces and their aligned crops (the
# model's input, (3, S, S)): the scores to reuse, or None to classify the face now.
ReuseScores = Callable[[Sequence[DetectedFace], Sequence[torch.Tensor]], list[np.ndarray | None]]


@dataclass(frozen=True)
class FramePlan:
    """How one frame of a stream or a tracked video goes through the engine (its FrameFollower
    decides, per frame)."""

    # Follow the faces in these boxes (the previous frame's) instead of running the detector; if
    # any fit fails, the frame is detected in full after all. None: detect.
    follow: tuple[Box, ...] | None = None
    reuse: ReuseScores | None = None
    # Search a frame where the detector found no face again inside a grey margin, as a photo is
    # (`detect_retry_margin`): a stream skips it to keep its latency, a tracked video does not.
    retry: bool = False


@dataclass(frozen=True)
class FrameFaces:
    """A stream frame's faces as the tracker needs them (landmarks even when not returned)."""

    faces: list[DetectedFace]
    fresh: list[bool]  # per face: classified in this frame (False: scores reused)
    followed: bool  # the faces were followed from the plan's boxes, no detector ran


@dataclass(frozen=True)
class ImageResult:
    index: int
    width: int
    height: int
    faces: list[FaceResult]
    # Faces found but not reported: below min_face_size, or beyond max_faces.
    skipped_small: int = 0
    skipped_over_max: int = 0
    frame: FrameFaces | None = None  # with a FramePlan only


@dataclass
class Timings:
    """Seconds per stage for one request; queue/compute are the slowest item of each stage."""

    decode_s: float = 0.0
    detect_queue_s: float = 0.0
    detect_s: float = 0.0
    align_s: float = 0.0
    classify_queue_s: float = 0.0
    classify_s: float = 0.0
    total_s: float = 0.0

    @property
    def queue_s(self) -> float:
        return self.detect_queue_s + self.classify_queue_s

    @property
    def inference_s(self) -> float:
        return self.detect_s + self.classify_s


@dataclass
class InferenceResult:
    images: list[ImageResult]
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    class_names: tuple[str, ...]
    input_size: int
    colour_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    parameters: int
    sha256: str
    weights_path: str
    dtype: str
    device: str
    face_backend: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class _FaceQuery:
    """A stage-1 item: detect faces in `image`, or only place landmarks in the given boxes."""

    image: np.ndarray
    min_face_size: int
    boxes: tuple[Box, ...] | None = None
    deadline: float | None = None
    refit: bool = False
    retry: bool = True


# What following one face costs against detecting the whole frame, for admission: the stage's
# measured seconds per unit must hold for both (dlib at 640x480: ~13 ms a face, crop search and
# landmarks, against ~200 ms for the full search, measured on the shared 2-core CPU).
FOLLOW_COST_SHARE = 0.07


def _start_every_thread(pool: ThreadPoolExecutor, threads: int) -> None:
    """Make `pool` start (and so initialise) all its threads now: each job holds its thread until
    all have started, so no job can run on a thread another one already used."""
    barrier = threading.Barrier(threads)
    for future in [pool.submit(barrier.wait, 120) for _ in range(threads)]:
        future.result()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Engine:
    """Faces and expressions for batches of encoded images; the whole product minus HTTP."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: ServiceMetrics | None = None,
        face_backend: FaceBackend | None = None,
    ) -> None:
        """Load the weights and the face backend (blocking, seconds); `start` makes it serve.

        `face_backend` lets several engines in one process (tests, benchmarks) share a backend.
        """
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        weights = Path(settings.weights)
        if not weights.is_file():
            raise FileNotFoundError(f"FERMam weights not found: {weights}")
        model, metadata = load_checkpoint(weights, map_location="cpu")
        # Weights stay float32; a narrower dtype runs as autocast, as in training, so norms and the
        # selective scan keep float32 where they need it.
        self.model = model.eval().to(device=self.device)
        self.config: FERMamConfig = model.config
        self._sha256 = file_sha256(weights)
        self._run_model = self._classifier(settings)
        if self._run_model is None:
            # Eager PyTorch runs channels-last: same outputs (a test holds them to the contiguous
            # model's), 1.14x the faces/s at batch 8 on the 2-core CPU (docs/benchmarks.md).
            self.model = self.model.to(memory_format=torch.channels_last)
        self.class_names: tuple[str, ...] = tuple(self.config.class_names)
        face_device = "cpu" if settings.face_backend == "dlib" else str(self.device)
        self.face_backend = face_backend or create_face_backend(
            settings.face_backend,
            device=face_device,
            min_face_size=settings.min_face_size,
            detector=settings.detector,
            weights_dir=settings.face_weights_dir,
        )
        meta = dict(metadata or {})
        self.info = ModelInfo(
            name=str(meta.get("name", "fermam")),
            version=str(meta.get("version", "unversioned")),
            class_names=self.class_names,
            input_size=self.config.contract.input_size,
            colour_mode=self.config.contract.colour_mode,
            mean=tuple(self.config.contract.mean),
            std=tuple(self.config.contract.std),
            parameters=sum(p.numel() for p in self.model.parameters()),
            sha256=self._sha256,
            weights_path=str(weights),
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            face_backend=self.face_backend.name,
            metadata={k: v for k, v in meta.items() if isinstance(v, str | int | float | bool)},
        )
        self.metrics.model_info.info(
            {
                "name": self.info.name,
                "version": self.info.version,
                "sha256": self.info.sha256[:16],
                "device": self.info.device,
                "dtype": self.info.dtype,
                "face_backend": self.info.face_backend,
            }
        )
        if self.device.type == "cuda":
            self.metrics.track_device_memory(lambda: float(torch.cuda.memory_allocated(self.device)))
        # Decoding and alignment, taken in turns by request (fair_pool.py).
        self._pool: FairThreadPool | None = None
        self._detect_pool: ThreadPoolExecutor | None = None  # a detect batch's images side by side
        # Requests decoding (on their way to the detect stage) and aligning (on their way to the
        # classify stage): a stage waits for its batch to fill only while some are (batcher.py).
        self._decoding = 0
        self._aligning = 0
        self._detect: DynamicBatcher[_FaceQuery, ImageFaces] | None = None
        self._classify: DynamicBatcher[torch.Tensor, np.ndarray] | None = None
        self._accepting = False
        self._warmed = False
        self.admission = Admission(
            lambda: self._detect.item_seconds if self._detect else 0.0,
            lambda: self._classify.item_seconds if self._classify else 0.0,
            lambda: self._classify.backlog if self._classify else 0,
            enabled=settings.shed_early,
            max_wait_s=settings.max_queue_wait_ms / 1000,
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Run both stages once so the first request pays no lazy initialisation (blocking)."""
        if self._warmed:
            return
        self.face_backend.warmup()
        size = self.config.contract.input_size
        # On CUDA the full batch shape matters too (kernel selection, allocator); on CPU one
        # forward pass initialises everything and a full batch would only cost start-up time.
        sizes = {1, self.settings.classify_max_batch_size} if self.device.type == "cuda" else {1}
        for batch in sorted(sizes):
            self._classify_batch([torch.zeros(3, size, size) for _ in range(batch)])
        self._warmed = True

    @property
    def ready(self) -> bool:
        """Started, not stopping, and both stages' worker threads alive (a dead worker would
        leave every request it gets waiting until its deadline)."""
        return (
            self._accepting
            and self._detect is not None
            and self._classify is not None
            and self._detect.healthy
            and self._classify.healthy
        )

    async def start(self) -> None:
        """Warm up, then start the decode pool and both batchers; `ready` turns true at the end."""
        if self._accepting:
            return
        await asyncio.to_thread(self.warm_up)
        s = self.settings
        # One thread stays free of any one request: a bulky request's 2 s decodes cannot take
        # every thread ahead of a small request's decode and alignment.
        self._pool = FairThreadPool(
            s.decode_threads, max_per_key=max(1, s.decode_threads - 1), thread_name_prefix="fermam-decode"
        )
        if s.detect_threads > 1 and self.face_backend.concurrent:
            # Each thread warms its own detector (dlib's are per thread, ~1 s each to build) before
            # the engine is ready: otherwise the first requests pay it, and the measured rate that
            # admission relies on starts several times too high.
            self._detect_pool = ThreadPoolExecutor(
                s.detect_threads, thread_name_prefix="fermam-detect", initializer=self.face_backend.warmup
            )
            await asyncio.to_thread(_start_every_thread, self._detect_pool, s.detect_threads)
        self._detect = DynamicBatcher(
            self._detect_batch,
            name=DETECT_STAGE,
            max_batch_size=s.detect_max_batch_size,
            max_queue_delay_ms=s.detect_max_queue_delay_ms,
            max_queue_size=s.max_queue_size,
            observer=self.metrics.stage(DETECT_STAGE),
            more_expected=lambda: self._decoding > 0,
            # dlib runs a batch's images `detect_threads` at a time: a batch holds at most that
            # many of one request's images, so a small request waits for one round, not for all
            # of a bulky request's images. A batching backend (face-alignment) keeps whole batches.
            max_items_per_key=s.detect_threads if self.face_backend.name == "dlib" else None,
            thread_init=self.face_backend.warmup,
        )
        self._classify = DynamicBatcher(
            self._classify_batch,
            name=CLASSIFY_STAGE,
            max_batch_size=s.classify_max_batch_size,
            max_queue_delay_ms=s.classify_max_queue_delay_ms,
            max_queue_size=s.max_queue_size,
            observer=self.metrics.stage(CLASSIFY_STAGE),
            more_expected=lambda: self._aligning > 0,
        )
        await asyncio.to_thread(self._detect.start)  # warms the worker thread's detector
        self._classify.start()
        self._accepting = True
        log.info(
            "engine ready: %s on %s (%s), faces by %s",
            self.info.name,
            self.device,
            self.dtype,
            self.info.face_backend,
        )

    def stop_accepting(self) -> None:
        """Refuse new requests (readiness false) while in-flight ones continue."""
        self._accepting = False

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Finish queued work within the drain timeout (both stages together), then release the
        threads."""
        self._accepting = False
        timeout = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        deadline = time.monotonic() + timeout
        # Stage 1 drains first: what it finishes may still need stage 2, which gets what is left.
        if self._detect is not None:
            await self._detect.aclose(max(0.0, deadline - time.monotonic()))
        if self._classify is not None:
            await self._classify.aclose(max(0.0, deadline - time.monotonic()))
        for pool in (self._pool, self._detect_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._detect = self._classify = None
        self._pool = self._detect_pool = None

    @property
    def queue_depths(self) -> dict[str, int]:
        return {
            DETECT_STAGE: self._detect.queue_depth if self._detect else 0,
            CLASSIFY_STAGE: self._classify.queue_depth if self._classify else 0,
        }

    # -- requests --------------------------------------------------------------------------------

    async def infer(
        self,
        images: Sequence[bytes],
        options: RequestOptions | None = None,
        deadline: float | None = None,
        *,
        shed: bool = True,
        plan: FramePlan | None = None,
    ) -> InferenceResult:
        """Faces and expressions of every image, in order.

        `deadline` is a `time.monotonic()` instant; past it the request fails with
        `DeadlineExceeded` and its queued items are dropped. Raises `ImageRejected` (decode
        errors, with the image index), `InvalidRequest`, `QueueFull`, `NotReady`.

        A failed request is counted here, once, in `fermam_rejections_total` (a client that goes
        away is counted by the HTTP layer, which cancels this call). `shed=False` skips the
        overload check, for work that belongs to a request already admitted (a video's frames,
        whose own window bounds them); the deadline still applies. `plan` (one image: a stream
        frame) follows known faces instead of detecting and reuses scores of unchanged faces;
        the image's `frame` then says what was done.
        """
        options = options or RequestOptions()
        if not self.ready or self._pool is None:
            raise NotReady("the engine is not ready")
        self._check_options(images, options)
        timeout = None if deadline is None else deadline - time.monotonic()
        units = [self._detect_units(data) for data in images]
        if plan is not None and plan.follow and self.face_backend.can_refit and self.face_backend.concurrent:
            # Following runs outside the detect stage; a failed follow is detected on top of it.
            units = [u * FOLLOW_COST_SHARE * len(plan.follow) for u in units]
        try:
            ticket = self.admission.admit(units, deadline, check=shed)
        except QueueFull:
            self.metrics.reject("overloaded")
            raise
        try:
            async with asyncio.timeout(timeout):
                return await self._infer(images, options, deadline, units, plan)
        except (TimeoutError, DeadlineExceeded):
            # The batcher may notice the deadline (item expired in its queue) before the timer.
            self.metrics.reject("deadline")
            raise DeadlineExceeded("the request's deadline passed") from None
        except QueueFull:
            self.metrics.reject("queue_full")
            raise
        except ImageRejected as error:
            self.metrics.reject(error.cause.code)
            raise
        except ShuttingDown as error:
            self.metrics.reject("shutdown")
            raise NotReady(str(error)) from None
        finally:
            self.admission.release(ticket)

    def _detect_units(self, data: bytes) -> float:
        """An image's detection cost from its header; one at the search size when unreadable
        (the decoder will refuse it)."""
        side = self.settings.detect_max_side
        width, height = declared_size(data) or (side, side)
        return detect_units(width, height, side)

    def _check_options(self, images: Sequence[bytes], options: RequestOptions) -> None:
        s = self.settings
        if not images:
            raise InvalidRequest("no images in the request")
        if len(images) > s.max_files:
            raise InvalidRequest(f"{len(images)} images in one request; the limit is {s.max_files}")
        if options.max_faces is not None and not 1 <= options.max_faces <= s.max_faces:
            raise InvalidRequest(f"max_faces must be between 1 and {s.max_faces}")
        if options.min_face_size is not None and options.min_face_size < 0:
            raise InvalidRequest("min_face_size must be >= 0")
        if options.top_k is not None and not 1 <= options.top_k <= len(self.class_names):
            raise InvalidRequest(f"top_k must be between 1 and {len(self.class_names)}")

    async def _infer(
        self,
        images: Sequence[bytes],
        options: RequestOptions,
        deadline: float | None,
        units: list[float],
        plan: FramePlan | None = None,
    ) -> InferenceResult:
        assert self._detect is not None and self._classify is not None and self._pool is not None
        pool = self._pool
        request = object()  # this request's turn in the decode pool and the detect queue
        started = time.monotonic()
        timings = Timings()

        # On the first error, the request's other decodes and queued items are cancelled.
        self._decoding += 1
        try:
            decoded = await gather_or_cancel(
                [
                    asyncio.wrap_future(pool.submit(request, self._decode, i, data))
                    for i, data in enumerate(images)
                ]
            )
        finally:
            # Before the submit below (no await between), so the detect worker woken by it sees
            # this request as arrived, not as still on its way.
            self._decoding -= 1
        timings.decode_s = time.monotonic() - started
        self.metrics.images.inc(len(decoded))

        min_size = self.settings.min_face_size if options.min_face_size is None else options.min_face_size
        if not options.detect:
            for index, d in enumerate(decoded):
                try:
                    check_crop_size(d.width, d.height)
                except ImageDecodeError as error:
                    raise ImageRejected(index, error) from None
        followed = None
        if plan is not None and plan.follow and self.face_backend.concurrent:
            # Following costs a few ms a face: it runs in the CPU pool, not in the detect stage's
            # batches, where it would wait for other frames' full searches (~200 ms each).
            follow_started = time.monotonic()
            followed = await asyncio.wrap_future(
                pool.submit(request, follow, self.face_backend, decoded[0].pixels, plan.follow)
            )
            follow_s = time.monotonic() - follow_started
        if followed is not None:
            stage1: list[Batched[ImageFaces]] = [Batched(followed, 0.0, follow_s, 1)]
        else:
            queries = [
                _FaceQuery(
                    d.pixels,
                    min_size,
                    None if options.detect else ((0.0, 0.0, float(d.width), float(d.height)),),
                    deadline,
                    retry=plan is None or plan.retry,
                )
                for d in decoded
            ]
            # A follow that failed is a full search: the stage's seconds per unit stay true.
            costs = (
                [self._detect_units(data) for data in images] if plan is not None and plan.follow else units
            )
            stage1 = await gather_or_cancel(
                self._detect.submit_many(queries, deadline, key=request, costs=costs)
            )
        timings.detect_queue_s = max(r.queue_s for r in stage1)
        timings.detect_s = max(r.compute_s for r in stage1)

        max_faces = options.max_faces or self.settings.max_faces
        kept = [list(r.value)[:max_faces] for r in stage1]
        located = [(i, face) for i, faces in enumerate(kept) for face in faces]
        probabilities: list[np.ndarray] = []
        described: list[tuple[Pose, Quality]] = []
        fresh: set[int] = set()
        if located:
            align_started = time.monotonic()
            self._aligning += 1
            try:
                crops = await asyncio.wrap_future(
                    pool.submit(
                        request,
                        align_faces_bounded,
                        [d.pixels for d in decoded],
                        [(i, face.landmarks) for i, face in located],
                        self.config.contract,
                    )
                )
            finally:
                self._aligning -= 1  # before the submit, as for decoding above
            timings.align_s = time.monotonic() - align_started
            reused: list[np.ndarray | None] = [None] * len(crops)
            if plan is not None and plan.reuse is not None:
                reused = plan.reuse([face for _, face in located], crops)
            todo = [k for k, scores in enumerate(reused) if scores is None]
            pending = self._classify.submit_many([crops[k] for k in todo], deadline) if todo else []
            # Pose and quality (CPU, numpy) run in the pool while stage 2 computes.
            describing = asyncio.wrap_future(
                pool.submit(
                    request,
                    describe_faces,
                    [d.pixels for d in decoded],
                    [(i, f.box, f.landmarks) for i, f in located],
                )
            )
            stage2 = await gather_or_cancel(pending) if todo else []
            described = await describing
            if stage2:
                timings.classify_queue_s = max(r.queue_s for r in stage2)
                timings.classify_s = max(r.compute_s for r in stage2)
            for k, r in zip(todo, stage2, strict=True):
                reused[k] = r.value
            probabilities = [p for p in reused if p is not None]
            fresh = set(todo)

        results = self._assemble(decoded, stage1, kept, located, probabilities, described, options)
        if plan is not None:
            (image,) = results
            faces = [face for _, face in located]
            followed = bool(getattr(stage1[0].value, "refitted", False))
            frame = FrameFaces(faces, [k in fresh for k in range(len(faces))] if located else [], followed)
            results = [dataclasses.replace(image, frame=frame)]
        timings.total_s = time.monotonic() - started
        return InferenceResult(results, timings)

    def _decode(self, index: int, data: bytes) -> DecodedImage:
        s = self.settings
        try:
            return decode_image(data, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)
        except ImageDecodeError as error:  # mapped to 413 / 415 by the HTTP layer
            raise ImageRejected(index, error) from error

    def _assemble(
        self,
        decoded: Sequence[DecodedImage],
        stage1: Sequence[Batched[ImageFaces]],
        kept: Sequence[list[DetectedFace]],
        located: Sequence[tuple[int, DetectedFace]],
        probabilities: Sequence[np.ndarray],
        described: Sequence[tuple[Pose, Quality]],
        options: RequestOptions,
    ) -> list[ImageResult]:
        per_image: list[list[FaceResult]] = [[] for _ in decoded]
        for (index, face), probs, (pose, quality) in zip(located, probabilities, described, strict=True):
            per_image[index].append(self._face_result(face, probs, options, pose, quality))
        results = []
        for index, (image, found, faces) in enumerate(zip(decoded, stage1, per_image, strict=True)):
            self.metrics.faces_per_image.observe(len(faces))
            results.append(
                ImageResult(
                    index=index,
                    width=image.width,
                    height=image.height,
                    faces=faces,
                    skipped_small=found.value.skipped_small,
                    skipped_over_max=len(found.value) - len(kept[index]),
                )
            )
        self.metrics.faces.inc(len(located))
        return results

    def _face_result(
        self,
        face: DetectedFace,
        probs: np.ndarray,
        options: RequestOptions,
        pose: Pose | None = None,
        quality: Quality | None = None,
    ) -> FaceResult:
        scores = {name: float(p) for name, p in zip(self.class_names, probs, strict=True)}
        best = int(np.argmax(probs))
        top = None
        if options.top_k:
            order = np.argsort(-probs, kind="stable")[: options.top_k]
            top = [(self.class_names[i], float(probs[i])) for i in order]
        return FaceResult(
            box=tuple(float(v) for v in face.box),  # type: ignore[arg-type]
            score=float(face.score),
            detected=bool(face.detected),
            landmarks=face.landmarks if options.return_landmarks else None,
            expression=self.class_names[best],
            scores=scores,
            top=top,
            pose=pose,
            quality=quality,
        )

    # -- batch functions (run on the batchers' worker threads) ----------------------------------

    def _detect_batch(self, queries: list[_FaceQuery]) -> list[ImageFaces | BaseException]:
        s = self.settings
        return run_detect_batch(
            self.face_backend, queries, s.detect_max_side, s.detect_retry_margin, self._detect_pool
        )

    def _classifier(self, settings: Settings) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The CPU runtime's classifier (service/engine/cpu_runtime.py); None: plain PyTorch."""
        if self.device.type != "cpu" or settings.cpu_runtime == "torch":
            return None
        from service.engine.cpu_runtime import build_classifier

        return build_classifier(
            self.model,
            settings.cpu_runtime,
            input_size=self.config.contract.input_size,
            dtype=self.dtype,
            threads=settings.torch_threads,
            cache_key=self._sha256,
            int8_model=settings.cpu_int8_model,
        )

    @torch.inference_mode()
    def _classify_batch(self, crops: list[torch.Tensor]) -> list[np.ndarray]:
        batch = torch.stack(crops).to(device=self.device, non_blocking=True)  # (B, 3, S, S)
        if self._run_model is not None:
            logits = self._run_model(batch)
        else:
            narrow = self.dtype != torch.float32
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=narrow):
                logits = self.model(batch)  # (B, classes)
        # The checkpoint's scoring rule (logit adjustment and temperature, model/scoring.py),
        # after whichever runtime made the logits, so no runtime can skip it.
        probs = class_scores(logits, self.config).cpu().numpy()
        return list(probs)
