"""DKD and DIST: values derived by hand in each test, identities from the papers, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from student_client.training.logit_losses import DISTLoss, DKDLoss, pearson_rows
from student_client.training.losses import HintonKDLoss


def _softmax(values: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


# --- DKDLoss --------------------------------------------------------------------------------------


def test_dkd_one_row_matches_hand_computed_terms() -> None:
    """Teacher [0.5, 0.3, 0.2], target class 0: binary [0.5, 0.5], non-target [0.6, 0.4]."""
    temperature, alpha, beta, ce_weight = 2.0, 1.5, 3.0, 0.7
    student = [1.0, 2.0, -1.0]
    q = _softmax(student, temperature)
    tckd = _kl([0.5, 0.5], [q[0], 1 - q[0]])
    nckd = _kl([0.6, 0.4], [q[1] / (q[1] + q[2]), q[2] / (q[1] + q[2])])
    ce = -math.log(_softmax(student, 1.0)[0])
    expected = temperature**2 * (alpha * tckd + beta * nckd) + ce_weight * ce
    assert tckd > 0.05 and nckd > 0.01  # neither term is negligible

    loss_fn = DKDLoss(alpha=alpha, beta=beta, temperature=temperature, ce_weight=ce_weight)
    logits = torch.tensor([student], dtype=torch.float64)
    teacher = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    loss = loss_fn(logits, teacher, torch.tensor([0]))
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    parts = loss_fn.parts(logits, teacher, torch.tensor([0]))
    assert parts[0].item() == pytest.approx(tckd, rel=1e-12)
    assert parts[1].item() == pytest.approx(nckd, rel=1e-12)


def test_dkd_reproduces_hinton_kd_with_beta_one_minus_teacher_target() -> None:
    """The paper's eq. 3: KD = TCKD + (1 - p_t(g)) NCKD, row by row."""
    temperature = 3.0
    generator = torch.Generator().manual_seed(0)
    for row in range(4):
        student = torch.randn(1, 6, generator=generator, dtype=torch.float64) * 2
        teacher = torch.softmax(torch.randn(1, 6, generator=generator, dtype=torch.float64), 1)
        label = torch.tensor([row])
        beta = 1.0 - float(teacher[0, row])
        dkd = DKDLoss(alpha=1.0, beta=beta, temperature=temperature, ce_weight=0.0)
        hinton = HintonKDLoss(alpha=1.0, temperature=temperature)
        torch.testing.assert_close(
            dkd(student, teacher, label), hinton(student, teacher, None), rtol=1e-12, atol=0
        )


def test_dkd_is_zero_when_student_matches_and_labels_none_uses_teacher_argmax() -> None:
    temperature = 4.0
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, 3.0, 1.0, -2.0]], dtype=torch.float64)
    teacher = torch.softmax(logits / temperature, dim=1)
    assert abs(DKDLoss(temperature=temperature)(logits, teacher, None).item()) < 1e-12
    student = torch.randn(2, 4, dtype=torch.float64)
    no_labels = DKDLoss(temperature=temperature, ce_weight=5.0)(student, teacher, None)
    argmax = DKDLoss(temperature=temperature, ce_weight=0.0)(student, teacher, torch.tensor([0, 1]))
    torch.testing.assert_close(no_labels, argmax, rtol=0, atol=0)  # no CE without labels


def test_dkd_two_classes_has_no_nckd_and_a_confident_teacher_stays_finite() -> None:
    logits = torch.tensor([[0.3, -0.4]], dtype=torch.float64)
    teacher = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    _, nckd = DKDLoss().parts(logits, teacher, torch.tensor([0]))
    assert nckd.item() == 0.0
    confident = torch.tensor([[1.0, 0.0, 0.0]])
    student = torch.tensor([[0.1, 0.2, 0.3]], requires_grad=True)
    loss = DKDLoss()(student, confident, torch.tensor([0]))
    loss.backward()
    assert math.isfinite(loss.item()) and student.grad is not None
    assert torch.isfinite(student.grad).all()


def test_dkd_gradient_matches_finite_differences() -> None:
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.softmax(torch.randn(3, 5, generator=generator, dtype=torch.float64), 1)
    labels = torch.tensor([0, 4, 2])
    loss_fn = DKDLoss(alpha=1.0, beta=8.0, temperature=4.0)
    assert torch.autograd.gradcheck(lambda s: loss_fn(s, teacher, labels), (student,))


def test_dkd_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="beta: must be a finite number >= 0, got -1"):
        DKDLoss(beta=-1)
    with pytest.raises(ValueError, match="temperature"):
        DKDLoss(temperature=0)
    with pytest.raises(ValueError, match="teacher_probs: shape"):
        DKDLoss()(torch.zeros(2, 3), torch.zeros(2, 4), None)


# --- DISTLoss -------------------------------------------------------------------------------------


def _pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    vx = math.sqrt(sum((a - mx) ** 2 for a in x))
    vy = math.sqrt(sum((b - my) ** 2 for b in y))
    return cov / (vx * vy + 1e-8)  # the authors' eps, as documented


def test_pearson_rows_by_hand() -> None:
    # [1, 2, 3] vs [2, 4, 7]: centred [-1, 0, 1] and [-7/3, -1/3, 8/3]: cov 5, norms sqrt(2)
    # and sqrt(114) / 3, so r = 15 / sqrt(228).
    value = pearson_rows(
        torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64),
        torch.tensor([[2.0, 4.0, 7.0]], dtype=torch.float64),
    )
    assert value.item() == pytest.approx(15 / (math.sqrt(228) + 3e-8), rel=1e-12)  # eps
    constant = pearson_rows(torch.ones(1, 3), torch.tensor([[1.0, 2.0, 3.0]]))
    assert constant.item() == 0.0  # eps: no NaN


def test_dist_three_rows_three_classes_by_hand() -> None:
    temperature, beta, gamma, ce_weight = 2.0, 1.5, 0.5, 0.3
    student = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [-1.0, 0.5, 1.5]]
    teacher = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.1, 0.6]]
    ys = [_softmax(row, temperature) for row in student]
    inter = 1 - sum(_pearson(ys[i], teacher[i]) for i in range(3)) / 3
    columns = [_pearson([y[c] for y in ys], [t[c] for t in teacher]) for c in range(3)]
    intra = 1 - sum(columns) / 3
    labels = [0, 2, 1]
    ce = -sum(math.log(_softmax(student[i], 1)[labels[i]]) for i in range(3)) / 3
    expected = temperature**2 * (beta * inter + gamma * intra) + ce_weight * ce
    loss = DISTLoss(beta=beta, gamma=gamma, temperature=temperature, ce_weight=ce_weight)(
        torch.tensor(student, dtype=torch.float64),
        torch.tensor(teacher, dtype=torch.float64),
        torch.tensor(labels),
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert inter > 0.01 and intra > 0.01


def test_dist_is_zero_for_a_matching_student_and_ignores_affine_changes() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 5, generator=generator, dtype=torch.float64) * 4
    teacher = torch.softmax(logits / 4.0, 1)
    loss_fn = DISTLoss(temperature=4.0)
    # Not exactly 0: the eps of 1e-8 on norms of ~0.1 leaves ~1e-6 per term, times T^2.
    assert abs(loss_fn(logits, teacher, None).item()) < 1e-4
    # Inter-class only: a per-row affine change of the teacher's row keeps the correlation.
    inter_only = DISTLoss(beta=1.0, gamma=0.0, temperature=4.0)
    assert abs(inter_only(logits, 0.5 * teacher + 0.1, None).item()) < 1e-4
    assert inter_only(logits.flip(1), teacher, None).item() > 0.1


def test_dist_gradient_matches_finite_differences() -> None:
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.softmax(torch.randn(4, 3, generator=generator, dtype=torch.float64), 1)
    loss_fn = DISTLoss(beta=2.0, gamma=2.0, temperature=4.0)
    assert torch.autograd.gradcheck(
        lambda s: loss_fn(s, teacher, torch.tensor([0, 1, 2, 0])), (student,)
    )


def test_dist_float32_matches_float64_and_ce_is_plain_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(6, 4, generator=generator)
    teacher = torch.softmax(torch.randn(6, 4, generator=generator), 1)
    labels = torch.randint(0, 4, (6,), generator=generator)
    only_ce = DISTLoss(beta=0.0, gamma=0.0, ce_weight=1.0)(student, teacher, labels)
    torch.testing.assert_close(only_ce, F.cross_entropy(student, labels))
    loss32 = DISTLoss()(student, teacher, labels)
    loss64 = DISTLoss()(student.double(), teacher.double(), labels)
    assert loss32.dtype == torch.float32
    np.testing.assert_allclose(loss32.item(), loss64.item(), rtol=1e-5)
