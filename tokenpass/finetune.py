"""``tokenpass.finetune``: train a model under the passes that change what it computes (SkipDecode).

A layer-skipping schedule destroys a small model's predictions unless the model is trained under it
(docs/benchmarks.md). Fine-tuning here captures the model's training step, applies the caller's passes to
it (SkipDecode masks the skipped layers per position, exactly what decoding under the schedule computes)
plus ``cutcrossentropy`` for the loss, and runs AdamW over random windows of the given token stream. The
weights change in place; ``save`` writes them where ``tokenpass.load`` finds them.

The training step sets each pass's schedule to span one window: the prompt is the window's first
``prompt_tokens`` and the schedule reaches ``min_layers`` at its last token, so every depth the schedule
uses at run time is trained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tokenpass.api import optimize, user_passes
from tokenpass.errors import TokenpassError
from tokenpass.ir.capture_train import TRAIN
from tokenpass.methods.cutcrossentropy import CutCrossEntropy
from tokenpass.models import finetuned_dir
from tokenpass.passes import Pass
from tokenpass.progress import steps as progress

FINETUNE_FILE = "tokenpass_finetune.json"


@dataclass
class FinetuneReport:
    """What a fine-tuning run did: the loss at every step and where the weights went."""

    passes: list[str]
    steps: int
    batch: int
    seq_len: int
    lr: float
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)  # the rate each step used
    seconds: float = 0.0
    saved_to: str | None = None
    evaluations: list[dict] = field(default_factory=list)  # what ``evaluate`` returned, with its step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def finetune(
    model: nn.Module,
    passes: "Sequence[str | Pass | type[Pass]]",
    token_ids: "Sequence[int] | torch.Tensor",
    steps: int = 200,
    batch: int = 4,
    seq_len: int = 256,
    lr: float = 5e-5,
    prompt_tokens: int | None = None,
    seed: int = 0,
    save: str | Path | None = None,
    evaluate: Callable[[int], dict] | None = None,
    evaluate_every: int = 0,
    teacher: nn.Module | None = None,
    lr_end: float | None = None,
) -> FinetuneReport:
    """Train ``model`` (in place) for ``steps`` AdamW steps on windows of ``token_ids`` with ``passes``
    applied to its training step; returns the loss curve. ``save``: a directory, or a bare name kept in
    tokenpass's cache (``tokenpass.load(name)`` loads it). ``evaluate(step)`` runs, in eval mode, before the
    first step and every ``evaluate_every`` steps (a model optimised before fine-tuning shares the weights
    being trained, so it sees them change).

    ``teacher`` (e.g. the unmodified model) turns the loss into distillation: KL(teacher || model) over the
    next-token distributions at every position, which recovers what skipping lost without pulling the
    model towards the fine-tuning text (what quality against the unmodified model measures).

    ``lr_end``: the learning rate falls linearly from ``lr`` to it over the run (``None``: constant). A
    constant rate that repairs quickly at first leaves the late steps noisy (the ratio bounced by 0.03
    between evaluations at 3e-4); decaying it lets the run settle."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    _check(steps, batch, seq_len, lr, len(ids))
    if lr_end is not None and not (isinstance(lr_end, float | int) and 0 <= lr_end <= lr):
        raise TokenpassError(f"finetune: lr_end must be in [0, lr={lr}], got {lr_end!r}")
    prompt_tokens = seq_len // 4 if prompt_tokens is None else prompt_tokens
    if not 0 <= prompt_tokens < seq_len:
        raise TokenpassError(f"finetune: prompt_tokens must be in [0, seq_len={seq_len}), got {prompt_tokens}")
    train_passes = training_passes(user_passes(passes), prompt_tokens, seq_len, fused_loss=teacher is None)
    trained = optimize(model, train_passes, phases=[TRAIN])
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = None if lr_end is None else torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0, end_factor=lr_end / lr, total_iters=steps)
    generator = torch.Generator().manual_seed(seed)
    report = FinetuneReport([repr(p) for p in train_passes], steps, batch, seq_len, lr)
    device = trained.spec.device
    start = time.perf_counter()
    names = ", ".join(p.name for p in train_passes)
    for step in progress(range(steps), f"fine-tuning {trained.spec.name} under {names}"):
        if evaluate is not None and evaluate_every and step % evaluate_every == 0:
            report.evaluations.append({"step": step, **_evaluated(model, evaluate, step)})
        offsets = torch.randint(0, len(ids) - seq_len + 1, (batch,), generator=generator)
        window = torch.stack([ids[o : o + seq_len] for o in offsets.tolist()]).to(device)
        out = trained(window, torch.ones_like(window), labels=window)
        loss = out.loss if teacher is None else distillation_loss(out.logits, teacher, window)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        report.learning_rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if schedule is not None:
            schedule.step()
        report.losses.append(loss.item())
    report.seconds = time.perf_counter() - start
    model.eval()
    if evaluate is not None:
        report.evaluations.append({"step": steps, **_evaluated(model, evaluate, steps)})
    if save is not None:
        report.saved_to = str(save_finetuned(model, report, save))
    return report


def distillation_loss(logits: torch.Tensor, teacher: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) of the next-token distributions over every position of ``window``."""
    with torch.no_grad():
        target = teacher(input_ids=window).logits.float().log_softmax(-1)
    student = logits.float().log_softmax(-1)
    return torch.nn.functional.kl_div(student.flatten(0, 1), target.flatten(0, 1), log_target=True,
                                      reduction="batchmean")


def training_passes(passes: list[Pass], prompt_tokens: int, seq_len: int, fused_loss: bool = True) -> list[Pass]:
    """The caller's passes with schedules spanning one window, plus the fused loss (unless already there,
    or the logits are needed: distillation)."""
    out = []
    for p in passes:
        if TRAIN not in p.phases:
            raise TokenpassError(f"finetune: pass '{p.name}' does not rewrite the training step; fine-tune with the "
                                 f"passes that change what the model computes (e.g. skipdecode)")
        out.append(p.for_training(prompt_tokens, seq_len))
    if fused_loss and not any(isinstance(p, CutCrossEntropy) for p in out):
        out.append(CutCrossEntropy())
    return out


def save_finetuned(model: nn.Module, report: FinetuneReport, save: str | Path) -> Path:
    """Write the weights (``save_pretrained``) and the run's report; a bare name goes to tokenpass's cache."""
    target = Path(save) if (isinstance(save, Path) or "/" in str(save)) else finetuned_dir(str(save))
    if not hasattr(model, "save_pretrained"):
        raise TokenpassError(f"finetune: cannot save a {type(model).__name__} (no save_pretrained); save its "
                             f"state_dict yourself")
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    (target / FINETUNE_FILE).write_text(json.dumps(report.to_dict(), indent=1))
    return target


def _evaluated(model: nn.Module, evaluate: Callable[[int], dict], step: int) -> dict:
    """``evaluate(step)`` without gradients; the training graph sets train mode itself each step."""
    model.eval()
    with torch.no_grad():
        return evaluate(step)


def _check(steps: int, batch: int, seq_len: int, lr: float, available: int) -> None:
    for name, value in (("steps", steps), ("batch", batch), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise TokenpassError(f"finetune: {name} must be a positive integer, got {value!r}")
    if not (isinstance(lr, float | int) and lr > 0 and math.isfinite(lr)):
        raise TokenpassError(f"finetune: lr must be a positive number, got {lr!r}")
    if available < seq_len + 1:
        raise TokenpassError(f"finetune: {available} tokens of text is fewer than one window of seq_len={seq_len}")
