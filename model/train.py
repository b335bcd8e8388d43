"""`fermam train`: pretrain the landmark branch, then train FERMam, from scratch.

Two stages, as in the paper but without its unobtainable pretrained networks:
1. `fermam train landmarks`: MobileFaceNet regresses 68 points on the training faces, against
   pseudo-labels the face stage placed (`fermam pseudo-landmarks`), weighted by their quality.
   This makes the landmark branch geometry-aware before it is frozen inside FERMam.
2. `fermam train fermam`: the whole network with the landmark branch frozen (eval mode).
(`fermam train recalibrate-bn` re-measures the batch-norm statistics of an existing checkpoint.)

Both keep the whole dataset on the device as uint8 and augment there (`model.augment`), run in
bf16 autocast on CUDA, keep an exponential moving average of the weights, write a JSON-lines
log, save the best validation epoch as safetensors, and resume from `last.pt`. A wall-clock
budget (`--time-budget`) sets the epoch count after the first epoch, so a run fits a lease.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from model.augment import (
    AugmentSettings,
    identity_affines,
    photometric,
    random_affines,
    random_erase,
    warp_images,
    warp_points,
)
from model.batchnorm import recalibrate_batch_norm
from model.config import OUTER_EYE_CORNERS, FERMamConfig, InputContract
from model.data import FaceArrays, load_dataset, to_model_input
from model.device import resolve_device
from model.recipe import Recipe, recipe_from_args

FROM_SCRATCH = "random initialisation (no pretrained backbone)"


# ---------------------------------------------------------------------------------------------
# Shared machinery


def pick_device(name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def autocast(device: torch.device) -> Any:
    # bf16 on CUDA; on the CPU fp32 (CPU autocast is slower than fp32 for these convolutions).
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def images_to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W[, 3]) uint8 -> (N, C, H, W) uint8 on the device."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous().to(device)


def augmented_batch(
    source: torch.Tensor,
    contract: InputContract,
    aug: AugmentSettings | None,
    generator: torch.Generator | None,
    points: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (n, C, H, W) on the device -> the network's normalised input (and warped points)."""
    x = source.float() / 255.0
    n = x.shape[0]
    if aug is None:
        theta = identity_affines(n, x.device)
        flipped = torch.zeros(n, dtype=torch.bool, device=x.device)
    else:
        theta, flipped = random_affines(n, aug, x.device, generator)
    x = warp_images(x, theta, contract.input_size)
    if aug is not None:
        x = random_erase(photometric(x, aug, generator), aug, generator)
    warped = None if points is None else warp_points(points, theta, flipped)
    x = x.permute(0, 2, 3, 1)  # (n, S, S, C) as to_model_input takes it
    return to_model_input(x[..., 0] if x.shape[-1] == 1 else x, contract), warped


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases and the SSM's A/D vectors (1-D parameters)."""
    decay, keep = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def batches(
    n: int,
    batch_size: int,
    generator: torch.Generator | None,
    shuffle: bool,
    drop_last: bool = False,
    take: int | None = None,
) -> Iterator[torch.Tensor]:
    """Index batches over the first `take` of the order (default all n); training drops the
    ragged tail so every step has the same shape (one kernel selection, steady batch statistics),
    unless that would leave no batch at all."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order[:take]  # None keeps all
    n = len(order)
    end = n - n % batch_size if drop_last and n >= batch_size else n
    for i in range(0, end, batch_size):
        yield order[i : i + batch_size]


class JsonLog:
    """Append-only JSON-lines log, one object per line, flushed at once (runs can be cut off)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        record = {"time": datetime.now(UTC).isoformat(timespec="seconds"), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class EpochPlan:
    """With a time budget, fits the epoch count to it after each of the first two epochs."""

    def __init__(self, recipe: Recipe, steps_per_epoch: int) -> None:
        self.recipe = recipe
        self.steps_per_epoch = steps_per_epoch
        self.epochs = recipe.epochs

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def replan(self, done: int, spent: float, last_epoch_seconds: float) -> None:
        """Fit the remaining epochs into the budget at the last epoch's pace.

        Called after the first two epochs only: the first carries one-time costs (kernel
        selection, allocator warm-up), and moving the end of the schedule later would bend it.
        """
        if self.recipe.time_budget_s is not None:
            fits = int((self.recipe.time_budget_s - spent) // max(last_epoch_seconds, 1e-6))
            self.epochs = max(done, min(self.recipe.epochs, done + fits))


def ema_with_warmup(decay: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """EMA update whose decay ramps up as (1 + n) / (10 + n) towards `decay`.

    A fixed 0.998 keeps a quarter of the random initialisation in the average after 700 steps:
    in the first H100 run the EMA scored 37% for seven epochs while the raw model trained at 70%.
    """

    def update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        # Tensor arithmetic: the count lives on the device, and float() would sync every update.
        d = ((1 + num_averaged) / (10 + num_averaged)).clamp(max=decay).to(averaged.dtype)
        return averaged * d + current * (1 - d)

    return update


def save_resume_state(path: Path, **state: Any) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


@dataclass
class Run:
    """What both stages set up the same way from their command line."""

    recipe: Recipe
    device: torch.device
    generator: torch.Generator  # batch order, on the CPU
    device_generator: torch.Generator  # augmentation, on the device
    out_dir: Path
    resume: bool
    progress: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Run:
        recipe = recipe_from_args(args)
        device = pick_device(args.device)
        generator = seed_everything(recipe.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        device_generator = torch.Generator(device=device).manual_seed(recipe.seed)
        return cls(recipe, device, generator, device_generator, args.out, args.resume, args.progress)


def run_epochs(
    run: Run,
    *,
    model: nn.Module,
    n_train: int,
    step_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    validate: Callable[[nn.Module], dict[str, float]],
    score_key: str,
    higher_is_better: bool,
    on_best: Callable[[nn.Module, dict[str, Any]], None],
) -> dict[str, Any]:
    """The training loop both stages share: schedule, EMA, validation, best and resume state."""
    recipe, device, generator, out_dir, progress = (
        run.recipe,
        run.device,
        run.generator,
        run.out_dir,
        run.progress,
    )
    log = JsonLog(out_dir / "log.jsonl")
    # An epoch is the whole training set, or a fresh random sample of `epoch_size` faces (lets a
    # slow device validate and checkpoint more often than once per pass over the data).
    epoch_faces = min(n_train, recipe.epoch_size or n_train)
    steps_per_epoch = max(1, epoch_faces // recipe.batch_size)
    plan = EpochPlan(recipe, steps_per_epoch)
    optimizer = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.999))
    ema = AveragedModel(model, avg_fn=ema_with_warmup(recipe.ema_decay), use_buffers=True)
    warmup = max(1, int(recipe.warmup_epochs * steps_per_epoch))
    start_epoch, step, best_score, best_epoch, spent = 0, 0, None, -1, 0.0
    resume_path = out_dir / "last.pt"
    if run.resume and resume_path.exists():
        state = torch.load(resume_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        best_score, best_epoch, spent = state["best_score"], state["best_epoch"], state["spent"]
        # A budgeted run keeps its plan; otherwise --epochs may extend a finished run.
        plan.epochs = state["epochs"] if recipe.time_budget_s is not None else recipe.epochs
        log.write(event="resume", epoch=start_epoch)

    epoch = start_epoch
    while epoch < plan.epochs:
        model.train()
        started = time.perf_counter()
        seen, loss_sum, stats_sum = 0, 0.0, {}
        quarter_losses: list[torch.Tensor] = []
        epoch_batches = batches(
            n_train, recipe.batch_size, generator, shuffle=True, drop_last=True, take=epoch_faces
        )
        bar = tqdm(
            list(epoch_batches),
            desc=f"epoch {epoch + 1}/{plan.epochs}",
            disable=not progress,
            mininterval=2.0,
            file=sys.stderr,
        )
        for index in bar:
            scale = cosine_with_warmup(step, plan.total_steps, warmup, recipe.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * scale
            loss, stats = step_fn(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            ema.update_parameters(model)
            step += 1
            n = len(index)
            seen += n
            loss_sum += loss.detach() * n
            quarter_losses.append(loss.detach())
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v.detach() * n
            if progress and step % 20 == 0:
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{loss.item():.3f}", faces_s=f"{seen / elapsed:.0f}")
        train_seconds = time.perf_counter() - started
        metrics = validate(ema.module)
        epoch_seconds = time.perf_counter() - started
        spent += epoch_seconds
        if epoch < 2:
            plan.replan(epoch + 1, spent, epoch_seconds)
        score = metrics[score_key]
        improved = best_score is None or (score > best_score if higher_is_better else score < best_score)
        record = {
            "event": "epoch",
            "epoch": epoch + 1,
            "epochs": plan.epochs,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": float(loss_sum) / seen,
            # First and last quarter of the epoch's steps: shows the loss falling within one epoch.
            "train_loss_first_quarter": float(
                torch.stack(quarter_losses[: max(1, len(quarter_losses) // 4)]).mean()
            ),
            "train_loss_last_quarter": float(
                torch.stack(quarter_losses[-max(1, len(quarter_losses) // 4) :]).mean()
            ),
            **{f"train_{k}": float(v) / seen for k, v in stats_sum.items()},
            **{f"val_{k}": v for k, v in metrics.items()},
            "faces": seen,
            "faces_per_s": seen / train_seconds,
            "seconds": epoch_seconds,
            "best": improved,
        }
        log.write(**record)
        print(
            json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), flush=True
        )
        if improved:
            best_score, best_epoch = score, epoch + 1
            on_best(ema.module, {"epoch": epoch + 1, **metrics})
        save_resume_state(
            resume_path,
            model=model.state_dict(),
            ema=ema.state_dict(),
            optimizer=optimizer.state_dict(),
            generator=generator.get_state(),
            torch_rng=torch.get_rng_state(),
            epoch=epoch,
            step=step,
            best_score=best_score,
            best_epoch=best_epoch,
            spent=spent,
            epochs=plan.epochs,
        )
        epoch += 1
    return {"best_score": best_score, "best_epoch": best_epoch, "epochs": plan.epochs, "seconds": spent}


# ---------------------------------------------------------------------------------------------
# Stage 1: the landmark branch


def landmark_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-face mean point distance over the outer-eye-corner distance (NME, inter-ocular)."""
    a, b = OUTER_EYE_CORNERS
    ocular = (target[:, a] - target[:, b]).norm(dim=-1).clamp_min(1e-6)
    return (pred - target).norm(dim=-1).mean(dim=-1) / ocular


def load_pseudo_labels(path: Path, n: int) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        labels = {k: data[k] for k in ("landmarks", "detected", "quality")}
    if len(labels["landmarks"]) < n:
        raise ValueError(f"{path} labels {len(labels['landmarks'])} faces, the data has {n}")
    return {k: v[:n] for k, v in labels.items()}


def train_landmarks(args: argparse.Namespace) -> dict[str, Any]:
    from model.checkpoint import save_module
    from model.mobilefacenet import MobileFaceNet

    run = Run.from_args(args)
    recipe, device, out_dir = run.recipe, run.device, run.out_dir
    contract = InputContract()
    train = load_dataset(str(args.data))
    if recipe.limit:
        train = train.subset(slice(0, recipe.limit))
    labels = load_pseudo_labels(args.labels, len(train))
    val = load_dataset(str(args.val_data))
    val_labels = load_pseudo_labels(args.val_labels, len(val))
    keep = val_labels["detected"]  # score held-out faces on reliable (detected) labels only
    val = val.subset(np.flatnonzero(keep)[: args.val_limit])
    val_points_np = val_labels["landmarks"][np.flatnonzero(keep)[: args.val_limit]]

    x_train = images_to_device(train.images, device)
    p_train = torch.from_numpy(labels["landmarks"]).float().to(device)
    w_train = torch.from_numpy(labels["quality"]).float().to(device)
    x_val = images_to_device(val.images, device)
    p_val = torch.from_numpy(val_points_np).float().to(device)

    model = MobileFaceNet().to(device).to(memory_format=torch.channels_last)
    aug = AugmentSettings(erase_p=0.0)

    def step_fn(index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index = index.to(device)
        x, points = augmented_batch(x_train[index], contract, aug, run.device_generator, p_train[index])
        with autocast(device):
            pred = model(x.contiguous(memory_format=torch.channels_last)).float().view(-1, 68, 2)
        per_face = F.smooth_l1_loss(pred, points, beta=0.01, reduction="none").mean(dim=(1, 2))
        loss = (per_face * w_train[index]).sum() / w_train[index].sum()
        return loss, {}

    @torch.no_grad()
    def validate(net: nn.Module) -> dict[str, float]:
        net.eval()
        errors = []
        for index in batches(len(x_val), 512, None, shuffle=False):
            index = index.to(device)
            x, _ = augmented_batch(x_val[index], contract, None, None)
            with autocast(device):
                pred = net(x.contiguous(memory_format=torch.channels_last)).float().view(-1, 68, 2)
            errors.append(landmark_error(pred, p_val[index]))
        return {"nme": float(torch.cat(errors).mean())}

    def on_best(net: nn.Module, info: dict[str, Any]) -> None:
        save_module(
            out_dir / "landmarks.safetensors",
            net,
            metadata={
                "kind": "mobilefacenet-68-landmarks",
                "pseudo_labels": str(args.labels),
                "train_data": train.source,
                "val_nme": info["nme"],
                "epoch": info["epoch"],
            },
        )

    summary = run_epochs(
        run,
        model=model,
        n_train=len(train),
        step_fn=step_fn,
        validate=validate,
        score_key="nme",
        higher_is_better=False,
        on_best=on_best,
    )
    summary.update(stage="landmarks", val_faces=len(val), weights=str(out_dir / "landmarks.safetensors"))
    return summary


# ---------------------------------------------------------------------------------------------
# Stage 2: FERMam


def template_from_pseudo_labels(path: Path) -> tuple[tuple[float, float], ...]:
    """Mean landmark positions of the reliably labelled training faces, as crop fractions."""
    with np.load(path, allow_pickle=False) as data:
        points = data["landmarks"][data["detected"]]
    mean = points.mean(axis=0)
    return tuple((round(float(x), 5), round(float(y), 5)) for x, y in mean)


def soft_targets(data: FaceArrays, recipe: Recipe) -> np.ndarray:
    if recipe.soft_labels and data.soft_labels is not None:
        return data.soft_labels.astype(np.float32)
    return np.eye(data.num_classes, dtype=np.float32)[data.labels]


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, contract: InputContract, device: torch.device
) -> torch.Tensor:
    model.eval()
    out = []
    for index in batches(len(images), 512, None, shuffle=False):
        x, _ = augmented_batch(images[index.to(images.device)], contract, None, None)
        with autocast(device):
            out.append(model(x.contiguous(memory_format=torch.channels_last)).float().argmax(1))
    return torch.cat(out)


def recalibrate_on_faces(
    model: nn.Module,
    images: torch.Tensor,
    faces: int,
    seed: int,
    contract: InputContract,
    device: torch.device,
    batch_size: int = 256,
) -> int:
    """Re-measure `model`'s batch-norm statistics on `faces` training images drawn with `seed`
    (the same ones every call), unaugmented, as the network sees faces at inference."""
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:faces]
    inputs = (
        augmented_batch(images[index.to(images.device)], contract, None, None)[0].contiguous(
            memory_format=torch.channels_last
        )
        for index in chosen.split(batch_size)
    )
    with autocast(device):
        return recalibrate_batch_norm(model, inputs)


def recalibrate_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """`fermam train recalibrate-bn`: a checkpoint with its BN statistics re-measured.

    For weights trained before `--bn-recalibration` existed: the first shipped model's averaged
    statistics cost it 8 points of validation accuracy (docs/model-card.md).
    """
    from model.checkpoint import load_checkpoint, provenance_of, save_checkpoint

    device = pick_device(args.device)
    model, metadata = load_checkpoint(args.weights)
    model = model.to(device).to(memory_format=torch.channels_last)
    contract = model.config.contract
    train = load_dataset(str(args.data))
    started = time.perf_counter()
    seen = recalibrate_on_faces(
        model, images_to_device(train.images, device), args.faces, args.seed, contract, device
    )
    kept = provenance_of(metadata)
    kept["bn_recalibration"] = f"{seen} unaugmented faces of {train.source} (seed {args.seed})"
    kept.pop("val_accuracy", None)  # measured with the old statistics
    summary: dict[str, Any] = {
        "stage": "recalibrate-bn",
        "faces": seen,
        "seconds": time.perf_counter() - started,
    }
    if args.val:
        val = load_dataset(str(args.val))
        pred = predict(model, images_to_device(val.images, device), contract, device)
        kept["val_accuracy"] = summary["val_accuracy"] = float((pred.cpu().numpy() == val.labels).mean())
    if args.model_version:
        kept["version"] = args.model_version
    save_checkpoint(args.out, model, metadata=kept, dtype=torch.float16)
    summary["weights"] = str(args.out)
    return summary


def train_fermam(args: argparse.Namespace) -> dict[str, Any]:
    from model.checkpoint import load_checkpoint, load_module_state, save_checkpoint
    from model.fermam import FERMam

    run = Run.from_args(args)
    recipe, device, out_dir = run.recipe, run.device, run.out_dir
    train = load_dataset(str(args.train))
    val = load_dataset(str(args.val))
    if recipe.limit:
        train = train.subset(slice(0, recipe.limit))
        val = val.subset(slice(0, recipe.limit))
    if train.class_names != val.class_names:
        raise ValueError(f"train classes {train.class_names} differ from val classes {val.class_names}")
    landmark_source = "random init"
    weights_from = FROM_SCRATCH
    if args.init_from:
        # Continue from earlier weights (e.g. the shipped model) with a fresh schedule: lets runs
        # that each fit one short GPU lease add up.
        model, init_meta = load_checkpoint(args.init_from)
        if model.config.class_names != train.class_names:
            raise ValueError(
                f"{args.init_from} predicts {model.config.class_names}, the data has {train.class_names}"
            )
        contract = model.config.contract
        landmark_source = str(init_meta.get("landmark_branch", args.init_from))
        # The chain of runs stays readable in the file: each continuation names what it started from.
        weights_from = f"continued from {args.init_from.name}"
        if "version" in init_meta:
            weights_from += (
                f" (version {init_meta['version']}, {init_meta.get('weights_from', 'unknown origin')})"
            )
    else:
        contract = InputContract()
        if args.template_from:
            contract = replace(contract, template=template_from_pseudo_labels(args.template_from))
        config = FERMamConfig(class_names=train.class_names, contract=contract)
        if args.ir_units:
            config = replace(config, ir_units=tuple(args.ir_units))
        model = FERMam(config)
    if args.landmark_weights:
        model.landmark_branch.load_state_dict(load_module_state(args.landmark_weights))
        landmark_source = str(args.landmark_weights)
    model = model.to(device).to(memory_format=torch.channels_last)

    x_train = images_to_device(train.images, device)
    y_train = torch.from_numpy(soft_targets(train, recipe)).to(device)
    hard_train = torch.from_numpy(train.labels).to(device)
    x_val = images_to_device(val.images, device)
    y_val = torch.from_numpy(val.labels).to(device)
    aug = AugmentSettings()

    def step_fn(index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index = index.to(device)
        x, _ = augmented_batch(x_train[index], contract, aug, run.device_generator)
        target = y_train[index]
        if recipe.label_smoothing:
            target = target * (1 - recipe.label_smoothing) + recipe.label_smoothing / target.shape[1]
        with autocast(device):
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        loss = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        acc = (logits.argmax(1) == hard_train[index]).float().mean()
        return loss, {"acc": acc}

    def validate(net: nn.Module) -> dict[str, float]:
        if recipe.bn_recalibration:
            recalibrate_on_faces(net, x_train, recipe.bn_recalibration, recipe.seed, contract, device)
        pred = predict(net, x_val, contract, device)
        return {"acc": float((pred == y_val).float().mean())}

    def on_best(net: nn.Module, info: dict[str, Any]) -> None:
        save_checkpoint(
            out_dir / "best.safetensors",
            net,
            metadata=provenance(
                train,
                val,
                recipe,
                landmark_source,
                info,
                weights_from=weights_from,
                model_version=args.model_version,
            ),
            dtype=torch.float16,
        )

    summary = run_epochs(
        run,
        model=model,
        n_train=len(train),
        step_fn=step_fn,
        validate=validate,
        score_key="acc",
        higher_is_better=True,
        on_best=on_best,
    )
    summary.update(stage="fermam", weights=str(out_dir / "best.safetensors"))
    return summary


def provenance(
    train: FaceArrays,
    val: FaceArrays,
    recipe: Recipe,
    landmark_source: str,
    info: dict[str, Any],
    weights_from: str,
    model_version: str | None = None,
) -> dict[str, Any]:
    return {
        "train_data": train.source,
        "train_rows": len(train),
        "val_data": val.source,
        "val_rows": len(val),
        "val_accuracy": info["acc"],
        "epoch": info["epoch"],
        "recipe": asdict(recipe),
        "landmark_branch": landmark_source,
        "weights_from": weights_from,
        "trained_on": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        # What the service reports as the model version.
        "version": model_version or f"{Path(str(train.source)).stem}-{datetime.now(UTC):%Y.%m.%d}",
    }
