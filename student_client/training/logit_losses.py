"""Distillation losses on logits beyond Hinton's KD, one `nn.Module` each: DKD and DIST.

Both take the same arguments as `HintonKDLoss` (student logits, the teacher's probabilities at the
loss's temperature, optional labels), so `MultiTaskKDLoss(task_losses=...)` can use either for any
task. Each returns a 0-dim tensor computed in float32 (float64 when an input is float64); batch
reductions are means. The teacher's probabilities are a constant target.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from student_client.training.losses import (
    _check_dense,
    _cross_entropy,
    _plogp_minus_plogq,
    compute_dtype,
)


def _check_weight(name: str, value: float) -> float:
    """`value` as a float if it is a finite number >= 0; else `ValueError` naming it."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_temperature(temperature: float) -> float:
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
    return float(temperature)


class DKDLoss(nn.Module):
    """Decoupled knowledge distillation: target-class and non-target-class KD, weighted apart.

    Borui Zhao, Quan Cui, Renjie Song, Yiyu Qiu, Jiajun Liang (2022), "Decoupled Knowledge
    Distillation", CVPR 2022, arXiv:2203.08679.

    With g the target class of a row, p = softmax at temperature T (teacher: `teacher_probs`,
    student: softmax(student_logits / T)):

    - TCKD = KL([p_t(g), 1 - p_t(g)] || [p_s(g), 1 - p_s(g)]), the binary target vs non-target KL;
    - NCKD = KL(p_t(i | i != g) || p_s(i | i != g)), the KL among the non-target classes, each
      side renormalised over them;

    loss = T^2 * (alpha * TCKD + beta * NCKD) + ce_weight * CE(student_logits, labels)

    KLs are summed over classes and averaged over the batch, as in the authors' code
    (github.com/megvii-research/mdistiller, `dkd_loss`: both terms times T^2 / batch), which adds
    the cross entropy with weight 1 (`ce_weight`). Hinton's KD is TCKD + (1 - p_t(g)) * NCKD
    (the paper's eq. 3): DKD frees NCKD from that factor, which is small exactly where the teacher
    is confident. The paper's defaults are alpha = 1, beta = 8 (CIFAR-100), T = 4. Not included:
    the authors' linear warm-up of the DKD term over the first 20 epochs (schedule it outside).

    The target class g is the row's label; with `labels=None` it is the teacher's most probable
    class and the cross entropy is left out (e.g. mixed images, see `training.augment`).
    A task with 2 classes has one non-target class: its NCKD is 0.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        ce_weight: float = 1.0,
    ) -> None:
        """`alpha` (TCKD), `beta` (NCKD) and `ce_weight` finite >= 0; `temperature` finite > 0.

        Raises `ValueError` naming the argument and its value otherwise.
        """
        super().__init__()
        self.alpha = _check_weight("alpha", alpha)
        self.beta = _check_weight("beta", beta)
        self.temperature = _check_temperature(temperature)
        self.ce_weight = _check_weight("ce_weight", ce_weight)

    def parts(
        self, student_logits: Tensor, teacher_probs: Tensor, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(TCKD, NCKD), each 0-dim and batch-averaged, without T^2 or weights (for logging)."""
        _check_dense(student_logits, teacher_probs, labels)
        dtype = compute_dtype(student_logits, teacher_probs)
        logits = student_logits.to(dtype)  # (batch, classes)
        teacher = teacher_probs.to(device=logits.device, dtype=dtype)  # (batch, classes)
        target = (teacher.argmax(1) if labels is None else labels.to(logits.device)).unsqueeze(1)
        is_target = torch.zeros_like(logits, dtype=torch.bool).scatter(1, target, True)

        scaled = logits / self.temperature  # (batch, classes)
        log_z = torch.logsumexp(scaled, dim=1)  # (batch,)
        # Non-target scores at -inf: the log-softmax over the non-target classes.
        others = scaled.masked_fill(is_target, float("-inf"))  # (batch, classes)
        log_z_others = torch.logsumexp(others, dim=1)  # (batch,)
        log_student_binary = torch.stack(
            [scaled.gather(1, target).squeeze(1) - log_z, log_z_others - log_z], dim=1
        )  # (batch, 2)
        teacher_target = teacher.gather(1, target).squeeze(1)  # (batch,)
        teacher_binary = torch.stack([teacher_target, (1.0 - teacher_target).clamp(min=0)], 1)
        tckd = _plogp_minus_plogq(teacher_binary, log_student_binary).sum(1).mean()  # ()

        teacher_others = teacher.masked_fill(is_target, 0.0)  # (batch, classes)
        mass = teacher_others.sum(1, keepdim=True)  # (batch, 1)
        teacher_others = teacher_others / torch.where(mass > 0, mass, torch.ones_like(mass))
        log_student_others = others - log_z_others.unsqueeze(1)  # (batch, classes), -inf at g
        nckd = _plogp_minus_plogq(teacher_others, log_student_others).sum(1).mean()  # ()
        return tckd, nckd

    def forward(
        self, student_logits: Tensor, teacher_probs: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        """Return the 0-dim loss for one batch.

        Args:
            student_logits: (batch, classes) floating raw student logits (T = 1).
            teacher_probs: (batch, classes) the teacher's softmax at this loss's temperature.
            labels: (batch,) int64 class indices, or None (target = the teacher's argmax, no CE).

        Raises `ValueError` naming the shapes if the inputs do not fit, or a dtype is wrong.
        """
        tckd, nckd = self.parts(student_logits, teacher_probs, labels)
        t = self.temperature
        loss = (t * t) * (self.alpha * tckd + self.beta * nckd)  # ()
        if labels is None or self.ce_weight == 0:
            return loss
        logits = student_logits.to(loss.dtype)
        return loss + self.ce_weight * _cross_entropy(logits, labels.to(logits.device))


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """(n, m), (n, m) -> (n,): the Pearson correlation of each row of `a` with the same row of `b`.

    `eps` is added to the product of the norms, as in the DIST authors' code: a constant row
    has correlation 0 instead of NaN.
    """
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DISTLoss(nn.Module):
    """DIST: match the teacher's relations between classes and between samples, not its values.

    Tao Huang, Shan You, Fei Wang, Chen Qian, Chang Xu (2022), "Knowledge Distillation from A
    Stronger Teacher", NeurIPS 2022, arXiv:2205.10536.

    With Y_s = softmax(student_logits / T) and Y_t = `teacher_probs` (batch, classes):

    - inter-class relation: 1 - mean over samples of Pearson(Y_s[i, :], Y_t[i, :]);
    - intra-class relation: 1 - mean over classes of Pearson(Y_s[:, c], Y_t[:, c]) (across the
      batch, so it needs batch >= 2: a batch of one has correlation 0 and a constant term);

    loss = T^2 * (beta * inter + gamma * intra) + ce_weight * CE(student_logits, labels)

    as in the authors' code (github.com/hunto/DIST_KD, `DIST`: both relations times tau^2, added
    to the cross entropy). Pearson correlation ignores a shift and a positive scale of either side,
    so a student need not reproduce a much stronger teacher's exact probabilities. The paper uses
    beta = gamma = 1, T = 1 on ImageNet and beta = gamma = 2, T = 4 on CIFAR-100.
    `labels=None`: no cross entropy.
    """

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
        ce_weight: float = 1.0,
    ) -> None:
        """`beta` (inter-class), `gamma` (intra-class), `ce_weight` finite >= 0; `temperature`
        finite > 0. Raises `ValueError` naming the argument and its value otherwise."""
        super().__init__()
        self.beta = _check_weight("beta", beta)
        self.gamma = _check_weight("gamma", gamma)
        self.temperature = _check_temperature(temperature)
        self.ce_weight = _check_weight("ce_weight", ce_weight)

    def forward(
        self, student_logits: Tensor, teacher_probs: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        """Return the 0-dim loss for one batch; arguments as in `DKDLoss.forward` (labels None:
        no cross entropy). Raises `ValueError` naming the shapes if the inputs do not fit."""
        _check_dense(student_logits, teacher_probs, labels)
        dtype = compute_dtype(student_logits, teacher_probs)
        logits = student_logits.to(dtype)  # (batch, classes)
        teacher = teacher_probs.to(device=logits.device, dtype=dtype)  # (batch, classes)
        student = torch.softmax(logits / self.temperature, dim=1)  # (batch, classes)
        inter = 1.0 - pearson_rows(student, teacher).mean()  # ()
        intra = 1.0 - pearson_rows(student.T, teacher.T).mean()  # ()
        t = self.temperature
        loss = (t * t) * (self.beta * inter + self.gamma * intra)  # ()
        if labels is None or self.ce_weight == 0:
            return loss
        return loss + self.ce_weight * _cross_entropy(logits, labels.to(logits.device))
