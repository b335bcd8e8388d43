"""fermam-client: the Python client of fermam-service (httpx + websockets; nothing of the server).

from fermam_client import Client

with Client("http://127.0.0.1:8000") as client:
    result = client.expressions(["photo.jpg"], top_k=2)
"""

from fermam_client._client import (
    RETRY_STATUSES,
    TIMEOUT_HEADER,
    AsyncClient,
    AsyncStreamSession,
    Box,
    Client,
    DroppedFrame,
    ExpressionResult,
    Face,
    FermamError,
    FrameError,
    FrameResult,
    ImageFaces,
    ImageInput,
    Pose,
    Quality,
    SessionEnd,
    SessionInfo,
    StreamEvent,
    StreamMessage,
    StreamSession,
    TimelinePoint,
    TrackedFace,
    VideoResult,
    VideoTrack,
    parse_stream_message,
)

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"

__all__ = [
    "RETRY_STATUSES",
    "TIMEOUT_HEADER",
    "AsyncClient",
    "AsyncStreamSession",
    "Box",
    "Client",
    "DroppedFrame",
    "ExpressionResult",
    "Face",
    "FermamError",
    "FrameError",
    "FrameResult",
    "ImageFaces",
    "ImageInput",
    "Pose",
    "Quality",
    "SessionEnd",
    "SessionInfo",
    "StreamEvent",
    "StreamMessage",
    "StreamSession",
    "TimelinePoint",
    "TrackedFace",
    "VideoResult",
    "VideoTrack",
    "__version__",
    "parse_stream_message",
]
