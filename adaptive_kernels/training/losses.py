"""Losses of the ADN self-distillation step (docs/method.md, "Training step").

* ``classification_loss``: cross-entropy of the super-net against hard labels (optionally label-smoothed)
  or soft targets (mixup).
* ``distillation_kl``: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch mean, over the teacher's top-k
  classes — the base-net's only loss; the teacher (super-net) logits are always detached here.
* ``pooled_feature_kl``: the same KL between globally pooled stage outputs (the paper's optional feature
  distillation ablation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy.

    logits: (N, K). targets: (N,) int64 class indices, or (N, K) soft targets (rows sum to 1; mixup).
    ``label_smoothing`` applies to hard targets only; soft targets already carry it (see ``mixup_batch``).
    """
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    if targets.shape != logits.shape:
        raise ValueError(f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(targets.shape)}")
    return -(targets * F.log_softmax(_at_least_fp32(logits), dim=-1)).sum(dim=-1).mean()


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = 500
) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over the batch (``F.kl_div(..., 'batchmean')``).

    student_logits, teacher_logits: (N, K). With ``top_k < K`` both are first restricted to the teacher's
    top-k classes per sample (as the authors' released code does with k=500 on ImageNet); otherwise all
    classes are used. The teacher is detached: no gradient reaches the super-net through this loss.
    Computed in at least float32 whatever the autocast dtype (log-softmax of bf16 logits loses too much).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student and teacher logits must both be (N, K), got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    teacher = _at_least_fp32(teacher_logits.detach())
    student = _at_least_fp32(student_logits)
    if top_k is not None and top_k < teacher.shape[1]:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None for all classes), got {top_k}")
        idx = teacher.topk(top_k, dim=1).indices
        teacher = teacher.gather(1, idx)
        student = student.gather(1, idx)
    log_p_student = F.log_softmax(student / temperature, dim=1)
    p_teacher = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


def pooled_feature_kl(
    student_features: list[torch.Tensor], teacher_features: list[torch.Tensor], temperature: float = 1.0
) -> torch.Tensor:
    """Sum over stages of ``distillation_kl`` between channel distributions of globally pooled stage outputs.

    student_features, teacher_features: lists of (N, C_i, H_i, W_i) stage outputs (or already pooled
    (N, C_i)), one per stage, in the same order. Teacher features are detached.
    """
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(
            f"need one student and one teacher feature per stage, got {len(student_features)} and "
            f"{len(teacher_features)}"
        )
    total = _at_least_fp32(student_features[0].new_zeros(()))
    for s, t in zip(student_features, teacher_features):
        total = total + distillation_kl(_pool(s), _pool(t), temperature, top_k=None)
    return total


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _pool(feature: torch.Tensor) -> torch.Tensor:
    return feature.flatten(2).mean(dim=2) if feature.dim() > 2 else feature


def smooth_one_hot(labels: torch.Tensor, num_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """(N,) class indices -> (N, K) targets with ``label_smoothing`` mass spread uniformly, like
    ``F.cross_entropy(label_smoothing=...)``."""
    off = label_smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1), 1.0 - label_smoothing + off)


def mixup_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    alpha: float,
    rng: np.random.Generator,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018): each image is blended with the batch's reversed order.

    images: (N, C, H, W); labels: (N,). Returns mixed images and (N, K) soft targets. ``lam`` is drawn
    from Beta(alpha, alpha) with ``rng`` (the caller seeds it per step, so runs and resumes repeat).
    """
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    lam = float(rng.beta(alpha, alpha))
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    mixed = images.mul(lam).add_(images.flip(0), alpha=1.0 - lam)
    return mixed, targets.mul(lam).add_(targets.flip(0), alpha=1.0 - lam)
