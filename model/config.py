"""FERMam's configuration and the preprocessing contract that travels inside every checkpoint.

Callers (the service, evaluation, training) read input size, normalisation, colour mode, the
alignment template and the class names from here, never from constants of their own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

# fmt: off
FERPLUS_CLASSES: tuple[str, ...] = (
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
)
RAFDB_CLASSES: tuple[str, ...] = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
AFFECTNET8_CLASSES: tuple[str, ...] = (
    "neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt",
)

# Median dlib 68-point positions (iBUG / 300-W order) on FER+ training faces, as fractions of the
# crop side. A provisional default for fresh configs; training measures its own and stores it.
PROVISIONAL_TEMPLATE_68: tuple[tuple[float, float], ...] = (
    (0.0964, 0.4062), (0.1042, 0.5104), (0.1146, 0.6094), (0.1354, 0.7083),
    (0.1719, 0.8073), (0.2292, 0.8906), (0.3073, 0.9583), (0.3958, 1.0000),
    (0.5000, 1.0104), (0.6042, 1.0000), (0.6927, 0.9583), (0.7682, 0.8854),
    (0.8281, 0.8021), (0.8672, 0.7083), (0.8906, 0.6042), (0.9010, 0.5052),
    (0.9062, 0.4010), (0.1615, 0.3177), (0.2083, 0.2760), (0.2812, 0.2604),
    (0.3542, 0.2708), (0.4271, 0.2969), (0.5677, 0.2969), (0.6406, 0.2708),
    (0.7135, 0.2604), (0.7865, 0.2708), (0.8385, 0.3125), (0.5000, 0.3854),
    (0.5000, 0.4531), (0.5000, 0.5208), (0.5000, 0.5885), (0.4167, 0.6354),
    (0.4583, 0.6510), (0.5000, 0.6615), (0.5417, 0.6510), (0.5833, 0.6354),
    (0.2396, 0.3958), (0.2865, 0.3698), (0.3411, 0.3698), (0.3906, 0.4062),
    (0.3385, 0.4167), (0.2812, 0.4167), (0.6094, 0.4062), (0.6510, 0.3698),
    (0.7083, 0.3646), (0.7552, 0.3958), (0.7135, 0.4115), (0.6562, 0.4167),
    (0.3438, 0.7708), (0.4010, 0.7396), (0.4583, 0.7292), (0.5000, 0.7344),
    (0.5469, 0.7240), (0.6042, 0.7396), (0.6562, 0.7656), (0.6042, 0.8229),
    (0.5469, 0.8490), (0.5000, 0.8542), (0.4531, 0.8490), (0.3958, 0.8281),
    (0.3646, 0.7708), (0.4583, 0.7604), (0.5052, 0.7656), (0.5469, 0.7604),
    (0.6302, 0.7708), (0.5469, 0.7969), (0.5000, 0.8021), (0.4583, 0.7969),
)
# fmt: on

NUM_LANDMARKS = 68  # iBUG / 300-W points, everywhere in the project
# The outer eye corners: their distance normalises landmark errors (NME).
OUTER_EYE_CORNERS = (36, 45)
# Landmarks that define the similarity transform: eye centres, nose tip, mouth corners.
LEFT_EYE = tuple(range(36, 42))
RIGHT_EYE = tuple(range(42, 48))
NOSE_TIP = 30
MOUTH_LEFT = 48
MOUTH_RIGHT = 54


def five_points(landmarks68: Any) -> Any:
    """Reduce 68 points (array-like (..., 68, 2)) to the 5 alignment points, numpy or torch."""
    import numpy as np

    pts = np.asarray(landmarks68, dtype=np.float64)
    return np.stack(
        [
            pts[..., LEFT_EYE, :].mean(axis=-2),
            pts[..., RIGHT_EYE, :].mean(axis=-2),
            pts[..., NOSE_TIP, :],
            pts[..., MOUTH_LEFT, :],
            pts[..., MOUTH_RIGHT, :],
        ],
        axis=-2,
    )


# What fills the parts of an aligned crop that lie outside the photo (InputContract.padding).
Padding = Literal["zeros", "border"]


@dataclass(frozen=True)
class InputContract:
    """What a face crop must look like before it enters the network."""

    input_size: int = 112
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # "gray": luminance replicated to 3 channels (the FER+ training faces are grayscale).
    colour_mode: Literal["rgb", "gray"] = "gray"
    # 68 (x, y) positions as fractions of the crop side; alignment maps five_points() onto these.
    template: tuple[tuple[float, float], ...] = PROVISIONAL_TEMPLATE_68
    # Alignment scales the template about the crop centre by this factor (> 1: the face fills
    # more of the crop). The template is measured on training faces; the scale that frames real
    # photos like them is measured on photos (docs/model-card.md). 1.0: the template as measured.
    template_scale: float = 1.0
    # What fills the parts of a crop that lie outside the photo: "zeros" (black, what older
    # checkpoints were served with) or "border" (the photo's edge pixels repeated). Training
    # faces never have black corners; a tilted or tightly cropped photo's warp does.
    padding: Padding = "zeros"

    def __post_init__(self) -> None:
        if not 0.5 <= self.template_scale <= 2.0:
            raise ValueError(f"template_scale must be in [0.5, 2], got {self.template_scale}")
        if self.padding not in ("zeros", "border"):
            raise ValueError(f"padding must be 'zeros' or 'border', got {self.padding!r}")

    def template_pixels(self) -> Any:
        """The 68-point template in crop pixels, scaled by `template_scale`, shape (68, 2)."""
        import numpy as np

        template = (np.asarray(self.template, dtype=np.float64) - 0.5) * self.template_scale + 0.5
        return template * self.input_size


@dataclass(frozen=True)
class FERMamConfig:
    """Architecture hyper-parameters plus the contract and class list of a set of weights."""

    class_names: tuple[str, ...] = FERPLUS_CLASSES
    contract: InputContract = field(default_factory=InputContract)
    ir_units: tuple[int, int, int] = (3, 4, 14)  # IR-50 stages 1-3
    embed_dim: int = 512
    d_state: int = 16
    ss2d_expand: int = 2
    dt_rank: int = 16
    asfr_expand: int = 2
    asfr_dt_rank: int = 8
    dropout: float = 0.1
    landmark_frozen: bool = True
    # The scoring rule (model/scoring.py applies it, model/calibration.py fits it): scores are
    # softmax((logits - prior_exponent * log(class_prior)) / temperature). The temperature sets
    # the confidence; 1.0 means uncalibrated (checkpoints from before it existed).
    temperature: float = 1.0
    # The training labels' class frequencies (class_names order) and how much of their lean the
    # decision removes (post-hoc logit adjustment); None / 0.0: none (older checkpoints).
    class_prior: tuple[float, ...] | None = None
    prior_exponent: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.class_prior is not None:
            if len(self.class_prior) != len(self.class_names):
                raise ValueError(
                    f"class_prior has {len(self.class_prior)} values for {len(self.class_names)} classes"
                )
            if not all(p > 0 for p in self.class_prior):
                raise ValueError(f"class_prior must be positive, got {self.class_prior}")
        elif self.prior_exponent != 0.0:
            raise ValueError("prior_exponent needs a class_prior")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FERMamConfig:
        data = dict(data)
        contract = data.pop("contract", {}) or {}
        contract = InputContract(
            **{
                **contract,
                **{k: tuple(contract[k]) for k in ("mean", "std") if k in contract},
                **(
                    {"template": tuple(tuple(p) for p in contract["template"])}
                    if "template" in contract
                    else {}
                ),
            }
        )
        for key in ("class_names", "ir_units"):
            if key in data:
                data[key] = tuple(data[key])
        if data.get("class_prior") is not None:
            data["class_prior"] = tuple(float(p) for p in data["class_prior"])
        return cls(contract=contract, **data)

    @classmethod
    def from_json(cls, text: str) -> FERMamConfig:
        return cls.from_dict(json.loads(text))

    def with_classes(self, class_names: tuple[str, ...]) -> FERMamConfig:
        # A prior belongs to the old class list; new classes start without one.
        return replace(self, class_names=tuple(class_names), class_prior=None, prior_exponent=0.0)
