"""Request and response bodies of the HTTP API (they are also the OpenAPI schema at /docs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    # Unknown fields are a client mistake worth a 422, not something to ignore silently.
    model_config = ConfigDict(extra="forbid")


class ExpressionOptions(_Strict):
    """Options shared by the multipart form and the JSON body."""

    detect: bool = Field(
        True,
        description="Find faces in each image. false: each image is already one face crop; "
        "landmarks are placed inside the whole image and it is classified as one face.",
    )
    max_faces: int | None = Field(None, ge=1, description="Most faces per image, largest first (server cap).")
    min_face_size: int | None = Field(None, ge=0, description="Smallest face side in pixels to report.")
    return_landmarks: bool = Field(True, description="Include the 68 landmarks of each face.")
    top_k: int | None = Field(None, ge=1, description="Also list the k most likely expressions, best first.")


class ExpressionJSONRequest(ExpressionOptions):
    """JSON alternative to multipart: images as base64 strings (data: URLs accepted)."""

    images: list[str] = Field(
        ..., min_length=1, description="Base64-encoded image files (JPEG, PNG, WebP, BMP)."
    )


class Box(BaseModel):
    x: float = Field(
        description="Left edge, pixels of the upright image; a face cut by the photo's edge may have "
        "a box that extends past it (negative x or y, or beyond the width or height)."
    )
    y: float = Field(description="Top edge, pixels.")
    width: float
    height: float
    score: float = Field(description="Detector confidence (backend-specific scale); 1.0 when detect=false.")


class LabelScore(BaseModel):
    label: str
    score: float


class Pose(BaseModel):
    """Head pose fitted from the 68 landmarks to a generic 3-D face (docs/face-quality.md for limits)."""

    yaw: float = Field(description="Degrees; > 0 when the nose points towards the image's right.")
    pitch: float = Field(description="Degrees; > 0 when the nose points up.")
    roll: float = Field(description="Degrees; > 0 when the face is turned clockwise in the image.")


class Quality(BaseModel):
    """How far to trust the face: ignore blurred, dark or tiny faces (docs/face-quality.md)."""

    sharpness: float = Field(
        description="0..1, variance of the Laplacian of the face at 64 px; sharp photos ~0.7-0.9."
    )
    brightness: float = Field(description="0..1, mean luminance of the face box.")
    size: float = Field(description="Shorter side of the face box, pixels.")


class Face(BaseModel):
    box: Box
    landmarks: list[tuple[float, float]] | None = Field(
        None, description="68 (x, y) points, iBUG/300-W order, in image pixels."
    )
    expression: str = Field(description="The most likely expression.")
    scores: dict[str, float] = Field(description="Probability of every class; they sum to 1.")
    top: list[LabelScore] | None = Field(None, description="The top_k expressions, when top_k was given.")
    pose: Pose | None = Field(None, description="Yaw, pitch and roll in degrees.")
    quality: Quality | None = Field(None, description="Sharpness, brightness and size of the face.")


class ImageFaces(BaseModel):
    index: int = Field(description="Position of the image in the request.")
    width: int
    height: int
    faces: list[Face] = Field(description="Largest first.")
    faces_below_min_size: int = Field(0, description="Faces found but smaller than min_face_size.")
    faces_over_max: int = Field(0, description="Faces found beyond max_faces (not classified).")


class ModelRef(BaseModel):
    name: str
    version: str
    classes: list[str]


class Timings(BaseModel):
    """Milliseconds; queue and compute are the slowest item of each stage."""

    decode_ms: float
    detect_queue_ms: float
    detect_ms: float
    align_ms: float
    classify_queue_ms: float
    classify_ms: float
    total_ms: float


class ExpressionResponse(BaseModel):
    model: ModelRef
    images: list[ImageFaces]
    timings: Timings


class InputContract(BaseModel):
    input_size: int
    colour_mode: str
    mean: list[float]
    std: list[float]


class ModelCard(BaseModel):
    name: str
    version: str
    classes: list[str]
    input: InputContract
    parameters: int
    sha256: str
    dtype: str
    device: str
    face_backend: str
    metadata: dict[str, str | int | float | bool]


class ModelList(BaseModel):
    models: list[ModelCard]


class Health(BaseModel):
    status: str


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable reason, e.g. queue_full, not_an_image.")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
