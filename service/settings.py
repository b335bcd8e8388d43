"""The one settings object of the service: every field an environment variable and a CLI flag.

Precedence: `fermam serve --flag` > `FERMAM_FIELD` environment variable > default.
The flags of `fermam serve` are generated from these fields (see `service/commands/serve.py`), so the two
can never drift apart.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_weights() -> Path:
    # Imported lazily: the model package may resolve its weights folder at import time.
    try:
        from model.weights import default_weights_path

        return Path(default_weights_path())
    except ImportError:
        return Path(__file__).resolve().parents[1] / "model" / "weights" / "fermam-ferplus.safetensors"


# The default connection cap, sized for the machine: per CPU, and never so many that the process
# runs out of file descriptors for what else it opens (weights, thread pools, logs).
CONNECTIONS_PER_CPU = 256
RESERVED_FDS = 64
MIN_CONNECTIONS = 32


def default_max_connections() -> int:
    """`CONNECTIONS_PER_CPU` per CPU this process may run on, within the open-file limit."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    wanted = CONNECTIONS_PER_CPU * cpus
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        wanted = min(wanted, soft - RESERVED_FDS)
    return max(MIN_CONNECTIONS, wanted)


class Settings(BaseSettings):
    """Everything an operator can tune; validated once at start."""

    model_config = SettingsConfigDict(
        env_prefix="FERMAM_", extra="forbid", validate_default=True, frozen=True
    )

    # -- network ---------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface to bind (0.0.0.0 in containers).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="Comma-separated keys; when set, /v1 routes need `Authorization: Bearer <key>` "
        "or `X-API-Key: <key>`.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="File of API keys (one per line or comma-separated; # comments), added to api_keys; "
        "keeps keys out of the process list.",
    )
    docs_access: Literal["public", "api_key", "off"] = Field(
        "public",
        description="/docs, /redoc and /openapi.json: public (the default, even with api_keys: the "
        "schema holds no secret), api_key (they need a key like /v1 routes), or off (404).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")

    # -- models ----------------------------------------------------------------------------------
    device: str = Field(
        "auto", description="Torch device for FERMam: auto (cuda if available), cpu, cuda or cuda:N."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="FERMam compute dtype (autocast): auto is bfloat16 on CUDA and on CPUs with "
        "native bf16 (AVX512-BF16 or AMX), float32 on other CPUs.",
    )
    weights: Path = Field(default_factory=_default_weights, description="FERMam safetensors checkpoint.")
    face_backend: Literal["dlib", "face-alignment"] = Field(
        "dlib", description="Face detection + 68 landmarks: dlib (CPU, offline) or face-alignment (GPU)."
    )
    face_weights_dir: Path | None = Field(
        None, description="Folder with the face backend's weights (default: the backend's own)."
    )
    # The detectors whose weights fan_backend knows (its DETECTOR_FILES); a test keeps them equal.
    detector: Literal["sfd", "blazeface", "retinaface"] = Field(
        "sfd", description="face-alignment's face detector (ignored by the dlib backend)."
    )
    min_face_size: int = Field(20, ge=0, description="Default smallest face side, in pixels, reported.")
    max_faces: int = Field(64, ge=1, description="Most faces classified per image (largest first).")
    detect_max_side: int = Field(
        1280,
        ge=160,
        description="Faces are searched on a copy of each image downscaled to this longest side "
        "(landmarks are fitted on the original), so detection cost is set here, not by the upload.",
    )
    detect_retry_margin: float = Field(
        0.15,
        ge=0,
        le=1,
        description="A photo with no face found is searched again inside a grey margin of this "
        "fraction of its longest side (faces that fill or are cut by the frame); 0 turns it off.",
    )
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads on CPU (0: torch's default).")
    cpu_runtime: Literal["torch", "torch-compile", "onnx", "openvino", "openvino-int8"] = Field(
        "torch",
        description="What runs FERMam on the CPU: torch (eager, the reference), torch-compile, onnx "
        "(ONNX Runtime), openvino, or openvino-int8 (the file of cpu_int8_model); all but torch need "
        "the cpu-runtimes extra. Ignored on CUDA.",
    )
    cpu_int8_model: Path | None = Field(
        None,
        description="cpu_runtime openvino-int8: the IR `fermam quantize` wrote for these weights "
        "(refused if made from other weights).",
    )

    # -- batching --------------------------------------------------------------------------------
    detect_max_batch_size: int = Field(8, ge=1, description="Stage 1 (faces): most images per batch.")
    detect_max_queue_delay_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="Stage 1: longest wait for a batch to fill, from its first image, while other "
        "requests are still decoding (none: it runs at once).",
    )
    classify_max_batch_size: int = Field(64, ge=1, description="Stage 2 (FERMam): most faces per batch.")
    classify_max_queue_delay_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="Stage 2: longest wait for a batch to fill, from its first face, while other "
        "requests are still aligning (none: it runs at once).",
    )
    max_queue_size: int = Field(
        512, ge=1, description="Most items waiting per stage; beyond it requests get 429 + Retry-After."
    )

    # -- requests --------------------------------------------------------------------------------
    max_image_bytes: int = Field(10 * 2**20, ge=1024, description="Largest encoded image, bytes (413).")
    max_image_pixels: int = Field(40_000_000, ge=64 * 64, description="Largest decoded image, pixels (413).")
    max_files: int = Field(16, ge=1, description="Most images in one request (413).")
    default_timeout_ms: int = Field(
        30_000, ge=1, description="Deadline of a request without a deadline header."
    )
    max_timeout_ms: int = Field(120_000, ge=1, description="Cap on the X-Request-Timeout-Ms header.")
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, time allowed for in-flight work.")
    decode_threads: int = Field(2, ge=1, description="Threads decoding images (and aligning faces).")
    detect_threads: int = Field(
        2,
        ge=1,
        description="Threads one detect batch's images run on side by side (dlib; face-alignment "
        "batches on its device instead); 1 runs them one after another on the stage's worker.",
    )

    # -- reliability -----------------------------------------------------------------------------
    shed_early: bool = Field(
        True,
        description="Refuse (429) work that the queue's measured drain rate says cannot finish "
        "before its deadline, instead of queueing it to time out.",
    )
    # 2000, not 5000: after a storm the queue holds up to this much admitted work, so it sets the
    # recovery time (bench/overload.py: first 200 1.0 s after a 3x storm, 2.1 s with 5000).
    max_queue_wait_ms: int = Field(
        2000,
        ge=0,
        description="With shed_early, also refuse (429) work that would wait longer than this behind "
        "the queue, whatever its deadline: bounds latency under overload and recovery after it (0: off).",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="Longest time to receive one request body (408 after it)."
    )
    body_idle_timeout_s: float = Field(
        10.0, gt=0, description="Longest pause between two chunks of a request body (408 after it)."
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="Idle keep-alive connections close after this."
    )
    max_connections: int = Field(
        default_factory=default_max_connections,
        ge=0,
        description="Most open connections; beyond it a new one gets 503 at once (0: no limit). "
        f"Default: {CONNECTIONS_PER_CPU} per CPU, within the open-file limit.",
    )
    max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description="Longest request line and headers together, bytes (431 and close).",
    )
    max_header_count: int = Field(100, ge=1, description="Most request headers (431 and close).")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest time for a request line and its headers to arrive, from their first "
        "byte or from the connection's opening (408 and close; a connection that sent nothing just "
        "closes).",
    )
    shutdown_grace_s: float = Field(
        3.0,
        ge=0,
        description="On SIGTERM the listener stays open at least this long (answering 503 to new "
        "work, /readyz false) so load balancers notice; capped by drain_timeout_s.",
    )
    memory_trim_interval_s: float = Field(
        5.0,
        ge=0,
        description="After large requests, hand freed heap back to the OS (glibc malloc_trim) at most "
        "this often (0: never).",
    )
    # -- streams and videos (docs/streaming.md) -------------------------------------------------
    stream_max_frame_bytes: int = Field(
        2 * 2**20, ge=1024, description="WS /v1/stream: largest frame, bytes (error too_large)."
    )
    stream_max_fps: float = Field(
        30.0, gt=0, description="WS /v1/stream: frames per second a session may send (more are dropped)."
    )
    stream_max_session_s: float = Field(3600.0, gt=0, description="WS /v1/stream: longest session, seconds.")
    stream_queue_frames: int = Field(
        2,
        ge=1,
        le=64,
        description="WS /v1/stream: unprocessed frames held per session; more drop the oldest.",
    )
    stream_send_timeout_s: float = Field(
        10.0,
        gt=0,
        description="WS /v1/stream: longest wait for the client to take a reply; a client that stops "
        "reading is then disconnected.",
    )
    stream_allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="WS /v1/stream: comma-separated browser origins (scheme://host[:port]) allowed "
        "to open a stream besides the server's own; * allows any. Handshakes without an Origin "
        "(non-browser clients) are always allowed.",
    )
    stream_smoothing_tau_ms: float = Field(
        500.0, ge=0, description="Default time constant of the per-track expression smoothing (EMA), ms."
    )
    stream_track_ttl_ms: float = Field(
        1000.0,
        gt=0,
        description="How long a face track stays open without a matching face, ms of frame time.",
    )
    stream_detect_every: int = Field(
        15,
        ge=1,
        description="WS /v1/stream: run the full face detector every N frames (and when a face cannot "
        "be followed); in between, each face is followed from its last box. 1 detects every frame.",
    )
    stream_classify_every: int = Field(
        15,
        ge=1,
        description="WS /v1/stream: classify a followed face at least every K frames; in between, only "
        "when its aligned crop changed by more than --stream-classify-change. 1 classifies every frame.",
    )
    stream_classify_change: float = Field(
        0.05,
        ge=0,
        description="WS /v1/stream: a face is classified again when the mean absolute difference of "
        "its aligned crop (model input, pixels in 0-1) from the last classified one exceeds this.",
    )
    video_max_bytes: int = Field(
        100 * 2**20, ge=1024, description="POST /v1/videos: largest file, bytes (413)."
    )
    video_max_duration_s: float = Field(
        300.0, gt=0, description="POST /v1/videos: longest video, seconds (413)."
    )
    video_max_fps: float = Field(10.0, gt=0, description="POST /v1/videos: highest sampling rate, frames/s.")
    video_track_min_fps: float = Field(
        5.0,
        ge=0,
        description="POST /v1/videos: at this sampling rate and above, faces are followed between "
        "detections and unchanged faces reuse their scores, as in streams (--stream-detect-every, "
        "--stream-classify-every, --stream-classify-change); below it every sampled frame is "
        "detected and classified. 0: never.",
    )
    video_classify_every: int = Field(
        2,
        ge=1,
        description="POST /v1/videos, tracked: classify a followed face at least every K sampled frames "
        "(a stream's --stream-classify-every); in between, only when its aligned crop changed by more "
        "than --stream-classify-change. 1 classifies every face of every frame.",
    )

    @field_validator("api_keys", "stream_allowed_origins", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in {"auto", "cpu", "cuda"}:
            return value
        prefix, _, index = value.partition(":")
        if prefix == "cuda" and index.isdigit():
            return value
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.default_timeout_ms > self.max_timeout_ms:
            raise ValueError(
                f"default_timeout_ms ({self.default_timeout_ms}) exceeds "
                f"max_timeout_ms ({self.max_timeout_ms})"
            )
        if self.api_keys_file is not None:
            try:
                text = Path(self.api_keys_file).read_text()
            except OSError as error:
                raise ValueError(
                    f"api_keys_file: cannot read {self.api_keys_file}: {error.strerror}"
                ) from None
            from_file = [
                key.strip()
                for line in text.splitlines()
                if not line.lstrip().startswith("#")
                for key in line.split(",")
                if key.strip()
            ]
            # Frozen model: extend the validated list in place of reassigning it.
            object.__setattr__(self, "api_keys", [*self.api_keys, *from_file])
        if any(len(key) < 8 for key in self.api_keys):
            raise ValueError("api_keys must be at least 8 characters each")
        return self

    # -- derived ---------------------------------------------------------------------------------

    @property
    def max_request_bytes(self) -> int:
        """Largest request body: every file at its limit with base64's 4/3 growth, or one video."""
        images = self.max_files * self.max_image_bytes * 4 // 3
        return max(images, self.video_max_bytes) + 64 * 1024
