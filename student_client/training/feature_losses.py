"""Distillation losses on intermediate features (hints), one `nn.Module` per method.

- `HintLoss`: FitNets hints, a learnable adapter from a student layer to a teacher layer, then MSE.
- `AttentionTransferLoss`: distance between the normalised spatial attention maps (see
  `attention_map`) of a student and a teacher feature map.
- `FSPLoss`: distance between the student's and the teacher's FSP (Gram) matrices between two
  of their feature maps (see `fsp_matrix`).

Each returns a 0-dim tensor on the student's device, computed in float32 (float64 when an input
or `HintLoss`'s adapter is float64); batch reductions are means. All detach the teacher's
features, so no gradient reaches them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from student_client.training.losses import compute_dtype


def _check_feature_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """Return `shape` as a tuple if it is (C,) or (C, H, W) of ints >= 1; else `ValueError`."""
    dims = tuple(shape)
    valid = len(dims) in (1, 3) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims
    )
    if not valid:
        raise ValueError(
            f"{name}: expected a per-sample shape (channels,) or (channels, height, width) of "
            f"ints >= 1, without the batch dimension, got {shape!r}"
        )
    return dims


class HintLoss(nn.Module):
    """FitNets hint loss: a learnable regressor maps the student's hint layer onto the teacher's.

    Adriana Romero, Nicolas Ballas, Samira Ebrahimi Kahou, Antoine Chassang, Carlo Gatta,
    Yoshua Bengio (2015), "FitNets: Hints for Thin Deep Nets", arXiv:1412.6550.

    loss = mean over all elements of (adapter(student_features) - teacher_features)^2

    The adapter (the paper's regressor r) depends on the per-sample shapes given to the
    constructor, without the batch dimension:

    - vectors, student (C_s,) -> teacher (C_t,): `nn.Linear(C_s, C_t)`.
    - maps with the same spatial size, (C_s, H, W) -> (C_t, H, W): a 1x1 `nn.Conv2d(C_s, C_t)`.
    - maps with different spatial sizes, (C_s, H_s, W_s) -> (C_t, H_t, W_t): the 1x1 conv followed
      by adaptive average pooling to (H_t, W_t) (`nn.AdaptiveAvgPool2d`; it also upsamples by
      repetition if the student's map is the smaller). Both are affine per position, so the order
      does not change the result.

    Differences from the paper: FitNets' convolutional regressor has a k x k kernel sized so that
    a valid convolution lands on the teacher's spatial size; the 1x1 conv plus pooling used here
    has far fewer parameters and fits any pair of sizes. The paper's loss is 1/2 the sum of squares
    per sample; this one is the mean over batch and elements (`F.mse_loss`), so its scale does not
    depend on the batch or feature size (multiply by C_t * H_t * W_t / 2 for the paper's
    per-sample value). FitNets trains in two stages (hints first, then KD on the whole student);
    this module only supplies the hint term, to be scheduled or weighted by the caller.

    The adapter's parameters belong to this module, not to the student: train them together with
    the student, e.g. `torch.optim.Adam([*student.parameters(), *hint_loss.parameters()])`, and
    move the module to the student's device (`hint_loss.to(device)`). The teacher's features are
    a constant target (detached).
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        """`student_shape` and `teacher_shape`: per-sample shapes (C,) or (C, H, W), no batch dim.

        Both must be vectors or both spatial maps. Raises `ValueError` naming the argument and
        its value otherwise.
        """
        super().__init__()
        student = _check_feature_shape("student_shape", student_shape)
        teacher = _check_feature_shape("teacher_shape", teacher_shape)
        if len(student) != len(teacher):
            raise ValueError(
                f"student_shape {student} and teacher_shape {teacher}: must both be vectors "
                f"(channels,) or both maps (channels, height, width)"
            )
        self.student_shape: tuple[int, ...] = student
        self.teacher_shape: tuple[int, ...] = teacher
        self.adapter: nn.Linear | nn.Conv2d
        self.pool: nn.AdaptiveAvgPool2d | None = None
        if len(student) == 1:
            self.adapter = nn.Linear(student[0], teacher[0])
        else:
            self.adapter = nn.Conv2d(student[0], teacher[0], kernel_size=1)
            if student[1:] != teacher[1:]:
                self.pool = nn.AdaptiveAvgPool2d((teacher[1], teacher[2]))

    def _check_features(self, name: str, features: Tensor, expected: tuple[int, ...]) -> None:
        """Raise `ValueError` unless `features` is floating with shape (batch >= 1, *expected)."""
        if features.dim() != 1 + len(expected) or tuple(features.shape[1:]) != expected:
            side = name.split("_")[0]  # "student" or "teacher"
            dims = ", ".join(str(d) for d in expected)
            raise ValueError(
                f"{name}: got shape {tuple(features.shape)}, per-sample shape "
                f"{tuple(features.shape[1:])}; expected (batch, {dims}) to match the "
                f"{side}_shape {expected} given to HintLoss"
            )
        if features.shape[0] == 0:
            raise ValueError(f"{name}: expected batch >= 1, got shape {tuple(features.shape)}")
        if not features.is_floating_point():
            raise ValueError(f"{name}: expected a floating dtype, got {features.dtype}")

    def _apply_adapter(self, student_features: Tensor, dtype: torch.dtype) -> Tensor:
        """The adapter in `dtype`; gradients still reach the (possibly float32) parameters."""
        x = student_features.to(dtype)  # (batch, *student_shape)
        weight = self.adapter.weight.to(dtype)
        bias = None if self.adapter.bias is None else self.adapter.bias.to(dtype)
        if isinstance(self.adapter, nn.Linear):
            return F.linear(x, weight, bias)  # (batch, C_t)
        out = F.conv2d(x, weight, bias)  # (batch, C_t, H_s, W_s)
        if self.pool is not None:
            out = self.pool(out)  # (batch, C_t, H_t, W_t)
        return out

    def adapt(self, student_features: Tensor) -> Tensor:
        """Map (batch, *student_shape) student features to (batch, *teacher_shape).

        Computed in float32, or float64 if the features or the adapter are float64. Raises
        `ValueError` naming both shapes if `student_features` does not match `student_shape`.
        """
        self._check_features("student_features", student_features, self.student_shape)
        return self._apply_adapter(
            student_features, compute_dtype(student_features, self.adapter.weight)
        )

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """Return the 0-dim MSE between the adapted student features and the teacher's.

        Args:
            student_features: (batch, *student_shape) floating, the student's hint layer.
            teacher_features: (batch, *teacher_shape) any floating dtype, the teacher's hint
                layer; used as a constant.

        Raises `ValueError` naming both shapes if a per-sample shape differs from the one given
        to the constructor or the batch sizes differ.
        """
        self._check_features("student_features", student_features, self.student_shape)
        self._check_features("teacher_features", teacher_features, self.teacher_shape)
        if teacher_features.shape[0] != student_features.shape[0]:
            raise ValueError(
                f"teacher_features: batch size of shape {tuple(teacher_features.shape)} does not "
                f"match student_features shape {tuple(student_features.shape)}"
            )
        dtype = compute_dtype(student_features, teacher_features, self.adapter.weight)
        adapted = self._apply_adapter(student_features, dtype)  # (batch, *teacher_shape)
        target = teacher_features.detach().to(device=adapted.device, dtype=dtype)
        return F.mse_loss(adapted, target)  # ()


def _check_attention_p(p: float) -> None:
    """Raise `ValueError` unless p is a finite number >= 1."""
    if not (isinstance(p, (int, float)) and math.isfinite(p) and p >= 1.0):
        raise ValueError(f"p: must be a finite number >= 1, got {p!r}")


def _check_feature_map(name: str, features: Tensor) -> None:
    """Raise `ValueError` unless `features` is floating (batch >= 1, C >= 1, H >= 1, W >= 1)."""
    if features.dim() != 4 or 0 in features.shape:
        raise ValueError(
            f"{name}: expected shape (batch, channels, height, width), all >= 1, "
            f"got {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {features.dtype}")


def _attention_energy(features: Tensor, p: float) -> Tensor:
    """(B, C, H, W) -> (B, H, W): the mean over channels of |A|^p, not normalised."""
    return features.abs().pow(p).mean(dim=1)


def _unit_rows(energy: Tensor) -> Tensor:
    """Each row of non-negative `energy` (B, N) scaled to L2 norm 1 (all-zero rows stay zero).
    Divided by the row's largest entry first, so that F.normalize's eps (1e-12 on the norm)
    cannot bend maps of tiny activations: the result ignores rescaling of the activations."""
    peak = energy.amax(dim=1, keepdim=True)  # (B, 1)
    energy = energy / torch.where(peak > 0, peak, torch.ones_like(peak))
    return F.normalize(energy, p=2.0, dim=1)


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention map of Zagoruyko & Komodakis (2017), arXiv:1612.03928.

    Q = vec(mean over channels of |A|^p), L2-normalised per sample. The mean differs from the
    paper's sum over channels only by the constant factor C, which the normalisation removes.

    Args:
        features: (B, C, H, W) floating activations.
        p: exponent >= 1 (the paper uses p = 2 for transfer).

    Returns (B, H * W) in the dtype of `features`; each row has L2 norm 1, or is all zeros if
    every activation of the sample is zero. Raises `ValueError` on a bad shape or p.
    """
    _check_attention_p(p)
    _check_feature_map("features", features)
    return _unit_rows(_attention_energy(features, float(p)).flatten(1))  # (B, H * W)


class AttentionTransferLoss(nn.Module):
    """Activation-based attention transfer between one student and one teacher feature map.

    Sergey Zagoruyko, Nikos Komodakis (2017), "Paying More Attention to Attention: Improving the
    Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017,
    arXiv:1612.03928.

    With Q = `attention_map(A, p)` (mean over channels of |A|^p, flattened, L2-normalised):

    loss = beta * mean over batch and the H * W positions of (Q_student - Q_teacher)^2

    This is the form of the authors' released code (github.com/szagoruyko/attention-transfer:
    `(at(x) - at(y)).pow(2).mean()`, multiplied there by beta and summed over layer pairs).
    The paper's eq. 2 writes beta / 2 * sum over layers of || Q_s/||Q_s|| - Q_t/||Q_t|| ||_2, an
    unsquared norm per sample, with beta "10^3 divided by the number of elements in the attention
    map and batch size". The squared, averaged form is used because it is smooth where the maps
    agree (the unsquared norm has an undefined gradient at 0), does not grow with the batch size or
    map size, and is the form the authors train with. `beta` plays the role of that 10^3 (the
    value the authors pass to their code); sum one instance per layer pair for several layers.

    Channel counts may differ. If the spatial sizes differ, the student's (unnormalised) attention
    energy is adaptive-average-pooled to the teacher's (H, W) before normalising (upsampled by
    repetition if the student's map is the smaller), rather than raising. Because of the
    normalisation the loss is invariant to positive rescaling of either feature map, and since
    both maps are non-negative unit vectors, 0 <= loss <= 2 * beta / (H_t * W_t).

    The teacher's features are a constant target (detached).
    """

    def __init__(self, p: float = 2.0, beta: float = 1.0) -> None:
        """`p` >= 1 (finite) is the attention exponent; `beta` >= 0 (finite) scales the loss.

        Raises `ValueError` naming the argument and its value otherwise.
        """
        super().__init__()
        _check_attention_p(p)
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta: must be a finite number >= 0, got {beta!r}")
        self.p = float(p)
        self.beta = float(beta)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """Return the 0-dim loss for one batch.

        Args:
            student_features: (batch, C_s, H_s, W_s) floating student activations.
            teacher_features: (batch, C_t, H_t, W_t) teacher activations, any floating dtype;
                used as a constant.

        Raises `ValueError` naming the shapes if an input is not 4-D or the batch sizes differ.
        """
        _check_feature_map("student_features", student_features)
        _check_feature_map("teacher_features", teacher_features)
        if teacher_features.shape[0] != student_features.shape[0]:
            raise ValueError(
                f"teacher_features: batch size of shape {tuple(teacher_features.shape)} does not "
                f"match student_features shape {tuple(student_features.shape)}"
            )
        dtype = compute_dtype(student_features, teacher_features)
        student = student_features.to(dtype)  # (B, C_s, H_s, W_s)
        teacher = teacher_features.detach().to(device=student.device, dtype=dtype)
        teacher_size = (teacher.shape[2], teacher.shape[3])

        energy_s = _attention_energy(student, self.p)  # (B, H_s, W_s)
        if energy_s.shape[1:] != teacher.shape[2:]:
            energy_s = F.adaptive_avg_pool2d(energy_s.unsqueeze(1), teacher_size).squeeze(1)
        q_s = _unit_rows(energy_s.flatten(1))  # (B, H_t * W_t)
        q_t = _unit_rows(_attention_energy(teacher, self.p).flatten(1))
        return self.beta * (q_s - q_t).pow(2).mean()  # ()


def _as_map(name: str, features: Tensor) -> Tensor:
    """(B, C) -> (B, C, 1, 1); (B, C, H, W) as it is; else `ValueError` naming the shape."""
    if features.dim() == 2 and 0 not in features.shape:
        return features[:, :, None, None]
    _check_feature_map(name, features)
    return features


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """The FSP ("flow of solution procedure") matrix of Yim et al. (2017) between two feature maps
    of one network.

    G[b, i, j] = sum over positions (h, w) of first[b, i, h, w] * second[b, j, h, w] / (H * W)

    Args:
        first: (B, C1, H, W) or (B, C1) floating features; a vector is a 1x1 map.
        second: (B, C2, H', W') or (B, C2), the same batch.

    Returns (B, C1, C2) in the promoted dtype. If the spatial sizes differ, the larger map is
    adaptive-average-pooled to the smaller one's size first (the paper pairs maps of one size; a
    vector hint against a map thus pairs the map's channel means with the vector:
    G = outer(mean over positions of first, second)). Raises `ValueError` on bad shapes.
    """
    a = _as_map("first", first)
    b = _as_map("second", second)
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"second: batch size of shape {tuple(second.shape)} does not match first shape "
            f"{tuple(first.shape)}"
        )
    a_size, b_size = a.shape[2] * a.shape[3], b.shape[2] * b.shape[3]
    if a.shape[2:] != b.shape[2:]:
        if a_size > b_size:
            a = F.adaptive_avg_pool2d(a, (b.shape[2], b.shape[3]))
        else:
            b = F.adaptive_avg_pool2d(b, (a.shape[2], a.shape[3]))
    positions = a.shape[2] * a.shape[3]
    a = a.flatten(2)  # (B, C1, N)
    b = b.flatten(2)  # (B, C2, N)
    return torch.bmm(a, b.transpose(1, 2)) / positions  # (B, C1, C2)


class FSPLoss(nn.Module):
    """FSP matrix transfer: the student learns the teacher's "flow" between two of its layers.

    Junho Yim, Donggyu Joo, Jihoon Bae, Junmo Kim (2017), "A Gift from Knowledge Distillation:
    Fast Optimization, Network Minimization and Transfer Learning", CVPR 2017.

    With G = `fsp_matrix(first, second)` (B, C1, C2) for each network:

    loss = weight * mean over the batch of ||G_student - G_teacher||_2^2 (summed over C1 x C2)

    the paper's eq. 2 for one pair of layers (its lambda_i is `weight`; sum one instance per pair
    for several pairs). The paper trains on this loss first and then on the task (two stages);
    this module only supplies the term, to be scheduled or weighted by the caller.

    Which hints to pair: the teacher serves named intermediate features (`ModelInfo.hints`). The
    default MNIST teacher (`MultiTaskCNN`) has `feature_map` (64, 7, 7) and `features` (256,):
    request both (`TargetOptions(hints=("feature_map", "features"))`) and give them as
    `teacher_first` and `teacher_second`; its G is then (64, 256), the channel means of the map
    against the dense layer. The student gives the two layers at the same places, with the same
    channel counts (64 and 256: the FSP matrices must have one shape; no adapter is learned, as in
    the paper, whose students share the teacher's widths). For students of other widths use
    `HintLoss`, which learns an adapter.

    The teacher's features are a constant target (detached).
    """

    def __init__(self, weight: float = 1.0) -> None:
        """`weight` finite >= 0 scales the loss. Raises `ValueError` naming it otherwise."""
        super().__init__()
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight: must be a finite number >= 0, got {weight!r}")
        self.weight = float(weight)

    def forward(
        self,
        student_first: Tensor,
        student_second: Tensor,
        teacher_first: Tensor,
        teacher_second: Tensor,
    ) -> Tensor:
        """Return the 0-dim loss for one batch.

        Args:
            student_first, student_second: the student's two feature maps, (B, C, H, W) or
                (B, C) floating.
            teacher_first, teacher_second: the teacher's at the same places, any floating dtype;
                used as constants.

        Raises `ValueError` naming both shapes if the two FSP matrices differ in shape.
        """
        dtype = compute_dtype(student_first, student_second, teacher_first, teacher_second)
        g_student = fsp_matrix(student_first.to(dtype), student_second.to(dtype))
        device = g_student.device
        g_teacher = fsp_matrix(
            teacher_first.detach().to(device=device, dtype=dtype),
            teacher_second.detach().to(device=device, dtype=dtype),
        )
        if g_student.shape != g_teacher.shape:
            raise ValueError(
                f"teacher FSP matrix shape {tuple(g_teacher.shape)} (from "
                f"{tuple(teacher_first.shape)} and {tuple(teacher_second.shape)}) does not match "
                f"the student's {tuple(g_student.shape)} (from {tuple(student_first.shape)} and "
                f"{tuple(student_second.shape)}): the paired layers need the same channel counts"
            )
        return self.weight * (g_student - g_teacher).pow(2).sum(dim=(1, 2)).mean()  # ()
