"""Knowledge-distillation losses on the teacher's outputs (soft targets), one `nn.Module` each.

- `HintonKDLoss`: dense teacher probabilities at temperature T (`output=probs`, `top_k=0`).
- `TopKKDLoss`: sparse teacher probabilities (`output=probs`, `top_k=k`): the k largest classes per
  row plus the tail mass, giving an exact KL over k + 1 buckets.
- `MultiTaskKDLoss`: a weighted sum of `HintonKDLoss` over the tasks of a multi-task teacher
  (per task, any other loss on soft targets instead; fixed or learned task weights).

Decoupled KD and DIST are in `student_client.training.logit_losses`; the losses on intermediate
features (hints) are in `student_client.training.feature_losses`.

Every loss returns a 0-dim tensor on the student's device. It is computed in float32, or in
float64 when an input is float64, whatever the dtype of the teacher's
targets (the server may send float16 / bfloat16). All reductions over the batch are means, so the
value does not grow with the batch size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_alpha_temperature(alpha: float, temperature: float) -> None:
    """Raise `ValueError` unless 0 <= alpha <= 1 and temperature is finite and > 0."""
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha: must be a number in [0, 1], got {alpha!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
    if temperature <= 0:
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 if any of `tensors` is float64."""
    if any(tensor.dtype == torch.float64 for tensor in tensors):
        return torch.float64
    return torch.float32


def _check_student_and_labels(student_logits: Tensor, labels: Tensor | None) -> None:
    """Raise `ValueError` unless logits are (batch >= 1, classes >= 1) floats and labels (batch,)."""
    if student_logits.dim() != 2 or student_logits.shape[0] == 0 or student_logits.shape[1] == 0:
        raise ValueError(
            f"student_logits: expected shape (batch >= 1, classes >= 1), "
            f"got {tuple(student_logits.shape)}"
        )
    if not student_logits.is_floating_point():
        raise ValueError(f"student_logits: expected a floating dtype, got {student_logits.dtype}")
    if labels is None:
        return
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(
            f"labels: expected shape {tuple(student_logits.shape[:1])} to match student_logits "
            f"{tuple(student_logits.shape)}, got {tuple(labels.shape)}"
        )
    if labels.dtype != torch.int64:
        raise ValueError(f"labels: expected dtype torch.int64, got {labels.dtype}")


def _plogp_minus_plogq(p: Tensor, log_q: Tensor) -> Tensor:
    """Elementwise p * (log p - log q), with 0 * log 0 = 0 and 0 * log q = 0 for any q.

    The masked branch never produces a NaN gradient for `log_q`, even where `log_q` is -inf.
    """
    cross = torch.where(p > 0, p * log_q, torch.zeros_like(p))
    return torch.xlogy(p, p) - cross


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """`F.cross_entropy`, with a label out of range named in a `ValueError` (on the CPU; CUDA
    kernels assert on the device instead)."""
    try:
        return F.cross_entropy(logits, labels)
    except (IndexError, RuntimeError) as error:
        bad = labels[(labels < 0) | (labels >= logits.shape[1])]
        if len(bad):
            raise ValueError(
                f"labels: class index {int(bad[0])} is out of range [0, {logits.shape[1]})"
            ) from error
        raise


def _check_dense(student_logits: Tensor, teacher_probs: Tensor, labels: Tensor | None) -> None:
    _check_student_and_labels(student_logits, labels)
    if teacher_probs.shape != student_logits.shape:
        raise ValueError(
            f"teacher_probs: shape {tuple(teacher_probs.shape)} does not match "
            f"student_logits shape {tuple(student_logits.shape)}"
        )


def _fusable(teacher: Tensor) -> bool:
    """The fused path applies: the teacher is a constant (it gets no gradient there)."""
    return not teacher.requires_grad


@functools.lru_cache(maxsize=64)
def _combine(
    weights: tuple[float, ...],
    labelled: tuple[bool, ...],
    alpha: float,
    t: float,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, tuple[float, ...]]:
    """The weights of [every task's KL summed over rows, the labelled tasks' mean cross
    entropies] in the total, and each task's factor on its row-summed KL (alpha T^2 / batch, or
    T^2 / batch without labels)."""
    kd = tuple(t * t * (alpha if has else 1.0) / batch for has in labelled)
    ce = [w * (1.0 - alpha) for w, has in zip(weights, labelled, strict=True) if has]
    vector = torch.tensor([w * k for w, k in zip(weights, kd, strict=True)] + ce, dtype=dtype)
    return vector.to(device), kd


def _fused_dense_kd(
    tasks: Mapping[str, tuple[Tensor, Tensor, Tensor | None, float]],
    alpha: float,
    t: float,
    losses: dict[str, float],
) -> Tensor | None:
    """The weighted sum of `HintonKDLoss` over `tasks` (name -> (logits, teacher probabilities,
    labels or None, weight)) with torch's fused kernels; `losses` receives each task's value.
    None when a value is not finite (a -inf logit against a teacher probability of 0: the
    caller then uses the written-out KL, which counts 0 log 0 as 0).

    Per task: `F.log_softmax` at T, `F.kl_div` summed over rows (the 1 / batch of the mean goes
    into the weights: one op less) and `F.cross_entropy` at T = 1; the tasks' terms are stacked
    and weighted by one dot product, and their values read in one transfer. For a small student
    on the CPU this costs about a third of the ops and autograd nodes of the written-out KL, a
    visible share of a step.
    """
    items = list(tasks.values())
    wide = any(x[0].dtype == torch.float64 or x[1].dtype == torch.float64 for x in items)
    dtype = torch.float64 if wide else torch.float32
    device = items[0][0].device
    kl, ce = [], []
    for logits, teacher, labels, _ in items:
        z = logits if logits.dtype == dtype else logits.to(dtype)
        p = teacher if teacher.dtype == dtype else teacher.to(dtype)
        if p.device != z.device:
            p = p.to(z.device)
        kl.append(F.kl_div(F.log_softmax(z * (1.0 / t), dim=1), p, reduction="sum"))
        if labels is not None:
            ce.append(
                _cross_entropy(z, labels if labels.device == z.device else labels.to(z.device))
            )
    terms = torch.stack(kl + ce)
    weights, kd = _combine(
        tuple(x[3] for x in items),
        tuple(x[2] is not None for x in items),
        alpha,
        t,
        items[0][0].shape[0],
        dtype,
        device,
    )
    values = terms.detach().tolist()
    if not all(map(math.isfinite, values)):
        return None
    labelled = len(items)
    for k, (name, item) in enumerate(tasks.items()):
        value = kd[k] * values[k]
        if item[2] is not None:
            value += (1.0 - alpha) * values[labelled]
            labelled += 1
        losses[name] = value
    return torch.dot(terms, weights)


class HintonKDLoss(nn.Module):
    """Soft-target distillation loss of Hinton et al. with dense teacher probabilities.

    Geoffrey Hinton, Oriol Vinyals, Jeff Dean (2015), "Distilling the Knowledge in a Neural
    Network", arXiv:1503.02531.

    loss = alpha * T^2 * KL(p_teacher || softmax(student_logits / T))
           + (1 - alpha) * CE(student_logits, labels)

    The KL is summed over classes and averaged over the batch ("batchmean"), in nats. The T^2
    factor keeps the soft-target gradient at the same scale as the hard-label gradient when T
    changes (section 2 of the paper). The cross entropy uses the raw logits (T = 1) and is
    averaged over the batch. When `labels` is None the loss is pure distillation: alpha is taken
    to be 1, i.e. `T^2 * KL` with no (1 - alpha) down-weighting.

    The teacher's probabilities are used as a constant target; 0 * log 0 is taken as 0, so
    classes to which the teacher gives probability exactly 0 contribute nothing.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 4.0, fused: bool = True) -> None:
        """`alpha` in [0, 1] weights the KD term; `temperature` T > 0 (finite) softens both sides.

        `fused` (default): when the teacher needs no gradient, use torch's fused kernels
        (`F.kl_div` on `F.log_softmax`, `F.cross_entropy`; for `MultiTaskKDLoss`, all tasks'
        terms weighted in one dot product): fewer ops per step, any device, differentiable
        twice; a non-finite value (a -inf logit) falls back to the written-out KL. `fused=False`
        always writes it out (p (log p - log q), with 0 log 0 = 0). Both give the same values
        and gradients up to rounding. Raises `ValueError` naming the argument and its value
        otherwise.
        """
        super().__init__()
        _check_alpha_temperature(alpha, temperature)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.fused = bool(fused)

    def forward(
        self, student_logits: Tensor, teacher_probs: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        """Return the 0-dim loss for one batch.

        Args:
            student_logits: (batch, classes) floating raw student logits (T = 1).
            teacher_probs: (batch, classes) the teacher's softmax at this loss's temperature;
                each row is a probability distribution. Any floating dtype.
            labels: (batch,) int64 class indices in [0, classes), or None for pure distillation.

        Raises `ValueError` naming the shapes if `teacher_probs` or `labels` does not match
        `student_logits`, or if a dtype is wrong.
        """
        _check_dense(student_logits, teacher_probs, labels)
        if self.fused and _fusable(teacher_probs):
            task = (student_logits, teacher_probs, labels, 1.0)
            fused = _fused_dense_kd({"": task}, self.alpha, self.temperature, {})
            if fused is not None:
                return fused
        dtype = compute_dtype(student_logits, teacher_probs)
        logits = student_logits.to(dtype)  # (batch, classes)
        teacher = teacher_probs.to(device=logits.device, dtype=dtype)  # (batch, classes)
        t = self.temperature

        log_p_student = F.log_softmax(logits / t, dim=1)  # (batch, classes)
        kl_rows = _plogp_minus_plogq(teacher, log_p_student).sum(dim=1)  # (batch,)
        kd = kl_rows.mean() * (t * t)  # ()

        if labels is None:
            return kd
        ce = _cross_entropy(logits, labels.to(logits.device))  # ()
        return self.alpha * kd + (1.0 - self.alpha) * ce


class TopKKDLoss(nn.Module):
    """Hinton et al.'s soft-target loss with sparse (top-k plus tail mass) teacher targets.

    Geoffrey Hinton, Oriol Vinyals, Jeff Dean (2015), "Distilling the Knowledge in a Neural
    Network", arXiv:1503.02531.

    The teacher sends, per row, its k largest probabilities at temperature T, their class indices
    and `tail_mass` = 1 - (sum of those k). The KD term is the exact KL divergence between two
    distributions over k + 1 buckets: the k listed classes, and one tail bucket holding every
    other class. The student's tail probability is 1 - (its probability at T on the k classes),
    computed stably in log space as logsumexp(non-top-k logits / T) - logsumexp(all logits / T).

    loss = alpha * T^2 * KL_{k+1}(p_teacher || p_student) + (1 - alpha) * CE(student_logits, labels)

    As in `HintonKDLoss`, the KL is batchmean in nats, the cross entropy uses the raw logits, and
    `labels=None` means pure distillation (alpha taken to be 1). With k = classes and tail_mass 0
    the result equals `HintonKDLoss` on the dense probabilities scattered back to their classes.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 4.0) -> None:
        """`alpha` in [0, 1] weights the KD term; `temperature` T > 0 (finite) softens both sides.

        Raises `ValueError` naming the argument and its value otherwise.
        """
        super().__init__()
        _check_alpha_temperature(alpha, temperature)
        self.alpha = float(alpha)
        self.temperature = float(temperature)

    def forward(
        self,
        student_logits: Tensor,
        teacher_values: Tensor,
        teacher_indices: Tensor,
        tail_mass: Tensor,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Return the 0-dim loss for one batch.

        Args:
            student_logits: (batch, classes) floating raw student logits (T = 1).
            teacher_values: (batch, k) the teacher's probabilities at this loss's temperature for
                the classes in `teacher_indices`, 1 <= k <= classes. Any floating dtype.
            teacher_indices: (batch, k) int64 class indices; each row's k indices must be
                distinct and in [0, classes) (not checked: it would cost a device sync).
            tail_mass: (batch,) 1 - sum of each row of `teacher_values`. Values below 0 (rounding)
                are clamped to 0.
            labels: (batch,) int64 class indices in [0, classes), or None for pure distillation.

        Raises `ValueError` naming the shapes if the inputs do not fit together, or if a dtype
        is wrong.
        """
        _check_student_and_labels(student_logits, labels)
        batch, classes = student_logits.shape
        if teacher_values.dim() != 2 or teacher_values.shape != teacher_indices.shape:
            raise ValueError(
                f"teacher_values: shape {tuple(teacher_values.shape)} and teacher_indices shape "
                f"{tuple(teacher_indices.shape)} must be the same (batch, k)"
            )
        k = teacher_values.shape[1]
        if teacher_values.shape[0] != batch or not 1 <= k <= classes:
            raise ValueError(
                f"teacher_values: shape {tuple(teacher_values.shape)} does not fit student_logits "
                f"shape {tuple(student_logits.shape)}: expected ({batch}, k) with "
                f"1 <= k <= {classes}"
            )
        if teacher_indices.dtype != torch.int64:
            raise ValueError(
                f"teacher_indices: expected dtype torch.int64, got {teacher_indices.dtype}"
            )
        if tail_mass.shape != (batch,):
            raise ValueError(
                f"tail_mass: shape {tuple(tail_mass.shape)} does not match student_logits shape "
                f"{tuple(student_logits.shape)}: expected ({batch},)"
            )
        dtype = compute_dtype(student_logits, teacher_values, tail_mass)
        logits = student_logits.to(dtype)  # (batch, classes)
        device = logits.device
        top_p_teacher = teacher_values.to(device=device, dtype=dtype)  # (batch, k)
        indices = teacher_indices.to(device)  # (batch, k)
        tail_p_teacher = tail_mass.to(device=device, dtype=dtype).clamp(min=0.0)  # (batch,)
        t = self.temperature

        scaled = logits / t  # (batch, classes)
        log_z = torch.logsumexp(scaled, dim=1)  # (batch,)
        top_log_p_student = scaled.gather(1, indices) - log_z.unsqueeze(1)  # (batch, k)
        in_top_k = torch.zeros_like(scaled, dtype=torch.bool).scatter(1, indices, True)
        tail_scaled = scaled.masked_fill(in_top_k, float("-inf"))  # (batch, classes)
        # -inf when k = classes; _plogp_minus_plogq then gives 0 for a zero teacher tail.
        tail_log_p_student = torch.logsumexp(tail_scaled, dim=1) - log_z  # (batch,)
        # With k = classes there is no tail: a teacher tail of rounding residue (1e-16) must not
        # meet the student's empty tail (log 0) and make the loss infinite.
        no_tail = torch.isneginf(tail_log_p_student)
        tail_p_teacher = torch.where(no_tail, torch.zeros_like(tail_p_teacher), tail_p_teacher)

        kl_top = _plogp_minus_plogq(top_p_teacher, top_log_p_student).sum(dim=1)  # (batch,)
        kl_tail = _plogp_minus_plogq(tail_p_teacher, tail_log_p_student)  # (batch,)
        kd = (kl_top + kl_tail).mean() * (t * t)  # ()

        if labels is None:
            return kd
        ce = F.cross_entropy(logits, labels.to(device))  # ()
        return self.alpha * kd + (1.0 - self.alpha) * ce


class MultiTaskKDLoss(nn.Module):
    """Weighted sum over tasks of Hinton et al.'s soft-target loss, one head per task.

    Geoffrey Hinton, Oriol Vinyals, Jeff Dean (2015), "Distilling the Knowledge in a Neural
    Network", arXiv:1503.02531, applied to each task head of a multi-task teacher separately.

    loss = sum over tasks in student_logits of task_weights[task] * HintonKDLoss(task)

    Every task shares one `alpha` and one `temperature`. A task absent from `task_weights` has
    weight 1.0. After each call, `last_task_losses` maps each task to its unweighted
    `HintonKDLoss` value as a detached Python float, for logging (reading the floats waits for
    the device, once per task per call).

    Two additive options (the defaults keep the loss above):

    - `task_losses`: task -> a loss module called as `loss(logits, teacher_probs, labels)`, used
      for that task instead of `HintonKDLoss` (e.g. `DKDLoss` or `DISTLoss` of
      `student_client.training.logit_losses`; give it the same temperature as the targets).
    - `task_weighting="uncertainty"`: learned task weights of Kendall, Gal & Cipolla (2018),
      "Multi-Task Learning Using Uncertainty to Weigh Losses", CVPR 2018, arXiv:1705.07115.
      One learnable log-variance s_t per task (in `log_variances`, initialised to 0, i.e.
      weight 1) and

          loss = sum over tasks of exp(-s_t) * L_t + s_t

      The paper's classification form (its eq. 10, 1/sigma^2 L + log sigma with s = log sigma^2)
      is exp(-s) L + s / 2; the regulariser s used here (as in common implementations) moves the
      optimum from exp(-s) = 1 / (2 L_t) to 1 / L_t: the tasks' relative weights at the optimum
      are the same (proportional to 1 / L_t), and the weighted sum stays at the scale of fixed
      weights of 1. The classification form fits because every task here is a classifier; it is
      an approximation (the paper's eq. 10) for a softmax head. The s_t are parameters of this
      module, not of the student: give them to the optimizer,
      `torch.optim.Adam([*student.parameters(), *kd.parameters()])`, and move the module to the
      student's device (`kd.to(device)`). The total can be negative (s_t < 0 once L_t < 1).
    """

    def __init__(
        self,
        task_weights: Mapping[str, float] | None = None,
        alpha: float = 0.5,
        temperature: float = 4.0,
        fused: bool = True,
        task_losses: Mapping[str, nn.Module] | None = None,
        task_weighting: Literal["fixed", "uncertainty"] = "fixed",
        tasks: Sequence[str] = (),
    ) -> None:
        """`task_weights` maps task name to a finite weight >= 0 (default 1.0 for every task).

        `alpha`, `temperature` and `fused` are as in `HintonKDLoss` (fused: every task in one
        autograd node; only tasks without a `task_losses` entry, with fixed weights, are fused).
        `task_losses`: see the class docstring. `task_weighting="uncertainty"` learns the weights
        of the `tasks` named (every task the student has; `task_weights` must then be unset).
        Raises `ValueError` naming the argument and its value if any is out of range.
        """
        super().__init__()
        weights = dict(task_weights or {})
        for task, weight in weights.items():
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
                raise ValueError(
                    f"task_weights[{task!r}]: must be a finite number >= 0, got {weight!r}"
                )
        self.task_weights: dict[str, float] = {task: float(w) for task, w in weights.items()}
        self.kd = HintonKDLoss(alpha=alpha, temperature=temperature, fused=fused)
        self.task_losses = nn.ModuleDict(dict(task_losses or {}))
        if task_weighting not in ("fixed", "uncertainty"):
            raise ValueError(
                f"task_weighting: expected 'fixed' or 'uncertainty', got {task_weighting!r}"
            )
        self.task_weighting = task_weighting
        # task -> s_t = log sigma_t^2, () each; empty with fixed weights.
        self.log_variances = nn.ParameterDict()
        if task_weighting == "uncertainty":
            if not tasks or isinstance(tasks, str):
                raise ValueError(
                    f"tasks: task_weighting='uncertainty' needs the task names, got {tasks!r}"
                )
            if weights:
                raise ValueError(
                    "task_weights: fixed weights and task_weighting='uncertainty' exclude each "
                    f"other, got {weights!r}"
                )
            for task in tasks:
                self.log_variances[task] = nn.Parameter(torch.zeros(()))
        self.last_task_losses: dict[str, float] = {}

    def forward(
        self,
        student_logits: Mapping[str, Tensor],
        teacher_probs: Mapping[str, Tensor],
        labels: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Return the 0-dim weighted sum of the per-task losses.

        Args:
            student_logits: task -> (batch, classes_task) raw student logits. The tasks summed
                over are exactly these keys; there must be at least one.
            teacher_probs: task -> (batch, classes_task) teacher softmax at this temperature. Extra
                tasks are ignored.
            labels: task -> (batch,) int64 labels. None, or a task missing from the mapping,
                means pure distillation for that task (see `HintonKDLoss`).

        Raises `KeyError` naming the task if `teacher_probs` has no entry for a task in
        `student_logits`, and `ValueError` if `student_logits` is empty or shapes do not match.
        """
        if not student_logits:
            raise ValueError("student_logits: expected at least one task, got none")
        tasks = {}
        for task, logits in student_logits.items():
            if task not in teacher_probs:
                raise KeyError(
                    f"teacher_probs: no soft targets for task {task!r}; "
                    f"got tasks {sorted(teacher_probs)}"
                )
            task_labels = None if labels is None else labels.get(task)
            _check_dense(logits, teacher_probs[task], task_labels)
            weight = self.task_weights.get(task, 1.0)
            tasks[task] = (logits, teacher_probs[task], task_labels, weight)
        if self.task_weighting == "uncertainty":
            unknown = sorted(set(tasks) - set(self.log_variances))
            if unknown:
                raise KeyError(
                    f"student_logits: no learned weight for task(s) {unknown}; "
                    f"tasks given to MultiTaskKDLoss: {sorted(self.log_variances)}"
                )
        plain = {task: item for task, item in tasks.items() if task not in self.task_losses}
        if (
            self.kd.fused
            and self.task_weighting == "fixed"
            and len(plain) == len(tasks)
            and all(_fusable(task[1]) for task in tasks.values())
        ):
            losses: dict[str, float] = {}
            loss = _fused_dense_kd(tasks, self.kd.alpha, self.kd.temperature, losses)
            if loss is not None:
                self.last_task_losses = losses
                return loss
        total: Tensor | None = None
        task_losses: dict[str, float] = {}
        for task, (logits, teacher, task_labels, weight) in tasks.items():
            loss_fn = self.task_losses[task] if task in self.task_losses else self.kd
            task_loss = loss_fn(logits, teacher, task_labels)  # ()
            task_losses[task] = float(task_loss.detach())
            if self.task_weighting == "uncertainty":
                s = self.log_variances[task].to(task_loss)  # ()
                weighted = torch.exp(-s) * task_loss + s  # ()
            else:
                weighted = weight * task_loss  # ()
            total = weighted if total is None else total + weighted
        self.last_task_losses = task_losses
        assert total is not None  # student_logits is non-empty
        return total
