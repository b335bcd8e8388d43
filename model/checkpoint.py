"""FERMam checkpoints: safetensors weights plus string metadata that carry the config and provenance.

The metadata always hold ``fermam_config`` (the FERMamConfig JSON, with the input contract and the
class names), so a checkpoint alone rebuilds the network and tells callers how to feed it. Values a
caller passes that are not strings are stored JSON-encoded and listed in ``json_keys``, so
:func:`read_metadata` gives back exactly what was saved.

Also here: filters that initialise FERMam from the research checkpoints (face.evoLVe's IR-50
``ir50.pth`` and the MobileFaceNet landmark ``mobilefacenet_model_best.pth.tar``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from model.config import FERMamConfig
from model.fermam import FERMam

FORMAT = "fermam-v1"
CONFIG_KEY = "fermam_config"
JSON_KEYS = "json_keys"
_RESERVED = {"format", CONFIG_KEY, JSON_KEYS, "class_names", "contract"}


def _encode_metadata(
    metadata: Mapping[str, Any] | None, reserved: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """String metadata for safetensors: strings as they are, anything else JSON-encoded and listed."""
    clashes = _RESERVED & set(metadata or {})
    if clashes:
        raise ValueError(f"metadata keys {sorted(clashes)} are reserved")
    encoded: dict[str, str] = {"format": FORMAT}
    json_keys: list[str] = []
    for key, value in {**(metadata or {}), **(reserved or {})}.items():
        if isinstance(value, str):
            encoded[str(key)] = value
        else:
            encoded[str(key)] = json.dumps(value, sort_keys=True)
            json_keys.append(str(key))
    encoded[JSON_KEYS] = json.dumps(sorted(json_keys))
    return encoded


def _tensors_for_saving(module: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.to("cpu").contiguous()
    return tensors


def save_checkpoint(
    path: str | Path,
    model: FERMam,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model``'s weights (floating tensors cast to ``dtype`` if given) and metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config
    # The config JSON is what load_checkpoint rebuilds from; classes and contract are repeated as
    # their own keys for readers that only want those.
    reserved = {
        CONFIG_KEY: config.to_json(),
        "class_names": list(config.class_names),
        "contract": config.to_dict()["contract"],
    }
    encoded = _encode_metadata(metadata, reserved)
    save_file(_tensors_for_saving(model, dtype), str(path), metadata=encoded)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint, JSON-encoded values decoded, plus ``config`` (a FERMamConfig)."""
    with safe_open(str(path), framework="pt") as handle:
        raw = dict(handle.metadata() or {})
    json_keys = set(json.loads(raw.pop(JSON_KEYS, "[]")))
    metadata: dict[str, Any] = {k: json.loads(v) if k in json_keys else v for k, v in raw.items()}
    if CONFIG_KEY in raw:
        metadata["config"] = FERMamConfig.from_json(raw[CONFIG_KEY])
    return metadata


def provenance_of(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What `read_metadata` returned, less what `save_checkpoint` writes from the model itself:
    the part to carry over when a checkpoint is rewritten."""
    return {k: v for k, v in metadata.items() if k not in _RESERVED and k != "config"}


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with one ValueError naming every missing/unexpected/misshapen key."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or misshapen:
        lines = [f"{what} does not match the network:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): " + ", ".join(keys))
        raise ValueError("\n".join(lines))
    # copy_ converts dtypes, so fp16/bf16 checkpoints land in the module's fp32 parameters.
    module.load_state_dict(state, strict=True)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[FERMam, dict[str, Any]]:
    """Rebuild FERMam from a checkpoint (strictly), in eval mode; returns (model, metadata)."""
    metadata = read_metadata(path)
    if "config" not in metadata:
        raise ValueError(f"{path} has no {CONFIG_KEY!r} metadata: not a FERMam checkpoint")
    model = FERMam(metadata["config"])
    state = load_file(str(path), device=str(map_location))
    model.to(map_location)
    _load_strict(model, state, f"checkpoint {path}")
    return model.eval(), metadata


def save_module(path: str | Path, module: nn.Module, metadata: Mapping[str, Any] | None = None) -> Path:
    """Save any module's weights (e.g. a pretrained landmark branch) with metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_tensors_for_saving(module, None), str(path), metadata=_encode_metadata(metadata))
    return path


def load_module_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state dict written by :func:`save_module` (or any safetensors file)."""
    return load_file(str(path), device=str(map_location))


def load_mobilefacenet_weights(module: nn.Module, path: str | Path) -> None:
    """Load a landmark branch saved with :func:`save_module` into a MobileFaceNet, strictly."""
    _load_strict(module, load_module_state(path), f"landmark weights {path}")


# --- research checkpoints -------------------------------------------------------------------------

# face.evoLVe bottleneck_IR: res_layer = (BN, conv3x3, PReLU, conv3x3, BN); shortcut = (conv1x1, BN).
_IR_RESIDUAL_NAMES = {"0": "bn_in", "1": "conv1", "2": "act", "3": "conv2", "4": "bn_out"}
_IR_UNIT = re.compile(r"^body\.(\d+)\.(res_layer|shortcut_layer)\.(\d+)\.(.+)$")


def _strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the `module.` prefix nn.DataParallel adds."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def _unwrap(checkpoint: Any) -> dict[str, torch.Tensor]:
    """A raw state dict from a saved object: {state_dict: ...}, {model: ...} or the dict itself."""
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in checkpoint and isinstance(checkpoint[key], Mapping):
                checkpoint = checkpoint[key]
                break
    return {k: v for k, v in _strip_module_prefix(checkpoint).items() if isinstance(v, torch.Tensor)}


def filter_ir50_checkpoint(
    state: Mapping[str, torch.Tensor], num_units: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map face.evoLVe IR-50 keys onto ``IR50Trunk`` keys; returns (ours, research keys not used).

    `input_layer.{0,1,2}` -> `stem.{0,1,2}`; `body.N.res_layer.i` -> `units.N.<bn_in|conv1|act|conv2|bn_out>`;
    `body.N.shortcut_layer.i` -> `units.N.shortcut.i`. Units past stage 3 and `output_layer` are unused.
    """
    mapped: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in _unwrap(state).items():
        if key.startswith("input_layer."):
            mapped["stem." + key.removeprefix("input_layer.")] = value
            continue
        match = _IR_UNIT.match(key)
        if match is None or int(match.group(1)) >= num_units:
            unused.append(key)
            continue
        unit, part, index, rest = match.groups()
        name = _IR_RESIDUAL_NAMES[index] if part == "res_layer" else f"shortcut.{index}"
        mapped[f"units.{unit}.{name}.{rest}"] = value
    return mapped, sorted(unused)


def filter_mobilefacenet_checkpoint(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a MobileFaceNet landmark checkpoint onto ours; returns (ours, keys not used).

    Module names already agree; keys we do not have (e.g. heatmap weights) or whose shapes differ
    (a head trained for another number of outputs) are left out and reported.
    """
    mapped: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in _unwrap(state).items():
        if key in expected and expected[key].shape == value.shape:
            mapped[key] = value
        else:
            unused.append(key)
    return mapped, sorted(unused)


def filter_research_checkpoint(
    model: FERMam,
    ir50_state: Mapping[str, Any] | None = None,
    mobilefacenet_state: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """FERMam-keyed tensors (`ir50.*`, `landmark_branch.*`) from already-loaded research checkpoints."""
    out: dict[str, torch.Tensor] = {}
    if ir50_state is not None:
        mapped, _ = filter_ir50_checkpoint(ir50_state, len(model.ir50.units))
        out.update({f"ir50.{k}": v for k, v in mapped.items()})
    if mobilefacenet_state is not None:
        mapped, _ = filter_mobilefacenet_checkpoint(mobilefacenet_state, model.landmark_branch.state_dict())
        out.update({f"landmark_branch.{k}": v for k, v in mapped.items()})
    return out


def _load_into(
    module: nn.Module, mapped: dict[str, torch.Tensor], what: str, optional: set[str]
) -> list[str]:
    """Load ``mapped`` into ``module``; every key except those in ``optional`` must be present.

    Returns the optional keys that were absent (left at their initial values).
    """
    expected = module.state_dict()
    missing = sorted(k for k in set(expected) - set(mapped) if k not in optional)
    misshapen = sorted(k for k in set(expected) & set(mapped) if expected[k].shape != mapped[k].shape)
    if missing or misshapen:
        raise ValueError(
            f"{what} cannot initialise the network: missing ({len(missing)}): {', '.join(missing) or '-'}; "
            f"wrong shape ({len(misshapen)}): {', '.join(misshapen) or '-'}"
        )
    module.load_state_dict({**expected, **mapped}, strict=True)
    return sorted(optional - set(mapped))


def _batch_counters(module: nn.Module) -> set[str]:
    """BN `num_batches_tracked` keys: checkpoints from before PyTorch 0.4.1 lack them."""
    return {k for k in module.state_dict() if k.endswith("num_batches_tracked")}


def _torch_load(path: str | Path) -> Any:
    # Research checkpoints are plain tensors in dicts; weights_only refuses anything executable.
    return torch.load(str(path), map_location="cpu", weights_only=True)


def load_research_weights(
    model: FERMam,
    ir50_path: str | Path | None = None,
    mobilefacenet_path: str | Path | None = None,
    ir50_state: Mapping[str, Any] | None = None,
    mobilefacenet_state: Mapping[str, Any] | None = None,
) -> dict[str, list[str]]:
    """Initialise the IR-50 trunk and/or the landmark branch from research checkpoints (file paths or
    already-loaded dicts). Every trunk / branch weight must be covered, except the landmark head,
    which is kept as initialised when the checkpoint's head has another shape. Returns a report:
    {"ir50_unused": [...], "mobilefacenet_unused": [...], "mobilefacenet_head_kept": [...]}.
    """
    report: dict[str, list[str]] = {}
    if ir50_path is not None:
        ir50_state = _torch_load(ir50_path)
    if mobilefacenet_path is not None:
        mobilefacenet_state = _torch_load(mobilefacenet_path)
    if ir50_state is not None:
        mapped, unused = filter_ir50_checkpoint(ir50_state, len(model.ir50.units))
        _load_into(model.ir50, mapped, "IR-50 checkpoint", optional=_batch_counters(model.ir50))
        report["ir50_unused"] = unused
    if mobilefacenet_state is not None:
        branch = model.landmark_branch
        mapped, unused = filter_mobilefacenet_checkpoint(mobilefacenet_state, branch.state_dict())
        head = {k for k in branch.state_dict() if k.startswith("output_layer.")}
        kept = _load_into(branch, mapped, "MobileFaceNet checkpoint", optional=head | _batch_counters(branch))
        report["mobilefacenet_head_kept"] = [k for k in kept if k.startswith("output_layer.")]
        report["mobilefacenet_unused"] = unused
    return report
