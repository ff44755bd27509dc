"""Tests for student_client.losses: values checked against hand-written formulas, not the code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from student_client.training.losses import HintonKDLoss, MultiTaskKDLoss, TopKKDLoss


def _np_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _random_case(
    batch: int, classes: int, seed: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 student logits, teacher probabilities at `temperature`, and int64 labels."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * 3
    teacher_logits = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * 3
    teacher_probs = torch.softmax(teacher_logits / temperature, dim=1)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return student, teacher_probs, labels


# --- HintonKDLoss ---------------------------------------------------------------------------------


def test_kd_term_is_zero_when_student_matches_teacher() -> None:
    temperature = 3.0
    logits = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0], [10.0, -10.0, 3.0, 2.0]])
    teacher_probs = torch.softmax(logits / temperature, dim=1)
    labels = torch.tensor([3, 0, 1])
    loss = HintonKDLoss(alpha=1.0, temperature=temperature)(logits, teacher_probs, labels)
    assert loss.shape == ()
    assert abs(loss.item()) < 1e-6


def test_tiny_case_matches_hand_computed_formula() -> None:
    alpha, temperature = 0.5, 2.0
    student = [1.0, 3.0]
    teacher_logits = [2.0, 0.0]
    label = 0

    # Literal formula, one sample, two classes.
    t0 = math.exp(teacher_logits[0] / temperature)
    t1 = math.exp(teacher_logits[1] / temperature)
    p = [t0 / (t0 + t1), t1 / (t0 + t1)]
    s0 = math.exp(student[0] / temperature)
    s1 = math.exp(student[1] / temperature)
    q = [s0 / (s0 + s1), s1 / (s0 + s1)]
    kl = p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1])
    ce = -math.log(math.exp(student[label]) / (math.exp(student[0]) + math.exp(student[1])))
    expected = alpha * temperature**2 * kl + (1 - alpha) * ce

    loss = HintonKDLoss(alpha=alpha, temperature=temperature)(
        torch.tensor([student], dtype=torch.float64),
        torch.tensor([p], dtype=torch.float64),
        torch.tensor([label]),
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # The pieces are not trivially small, so a missing T^2 or a wrong weight would show.
    assert kl > 0.1
    assert ce > 1.0


def test_gradient_matches_analytic_t_squared_scaling() -> None:
    temperature = 8.0
    student, teacher_probs, _ = _random_case(batch=5, classes=7, seed=0, temperature=temperature)
    student.requires_grad_(True)
    loss = HintonKDLoss(alpha=1.0, temperature=temperature)(student, teacher_probs, None)
    (grad,) = torch.autograd.grad(loss, student)

    # d/ds [T^2 * KL(p || softmax(s / T))] / batch = T * (softmax(s / T) - p) / batch
    with torch.no_grad():
        expected = temperature * (torch.softmax(student / temperature, dim=1) - teacher_probs) / 5
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    # The T^2 factor keeps the gradient from vanishing like 1/T.
    assert grad.abs().max().item() > 1e-3


def test_alpha_zero_is_exactly_cross_entropy() -> None:
    student, teacher_probs, labels = _random_case(batch=6, classes=5, seed=1, temperature=4.0)
    student = student.float()
    loss = HintonKDLoss(alpha=0.0, temperature=4.0, fused=False)(
        student, teacher_probs.float(), labels
    )
    assert torch.equal(loss, F.cross_entropy(student, labels))
    fused = HintonKDLoss(alpha=0.0, temperature=4.0)(student, teacher_probs.float(), labels)
    torch.testing.assert_close(fused, F.cross_entropy(student, labels))


def test_labels_none_is_pure_kd() -> None:
    temperature = 2.5
    student, teacher_probs, labels = _random_case(
        batch=4, classes=6, seed=2, temperature=temperature
    )
    pure = HintonKDLoss(alpha=0.3, temperature=temperature)(student, teacher_probs, None)
    alpha_one = HintonKDLoss(alpha=1.0, temperature=temperature)(student, teacher_probs, labels)
    torch.testing.assert_close(pure, alpha_one, rtol=0, atol=0)

    p = teacher_probs.numpy()
    q = _np_softmax(student.numpy() / temperature)
    expected = temperature**2 * np.mean(np.sum(p * np.log(p / q), axis=1))
    assert pure.item() == pytest.approx(expected, rel=1e-10)


def test_zero_teacher_probabilities_count_as_zero_log_zero() -> None:
    temperature = 2.0
    student = torch.tensor([[0.5, 1.5, -1.0]], dtype=torch.float64, requires_grad=True)
    one_hot = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    loss = HintonKDLoss(alpha=1.0, temperature=temperature)(student, one_hot)
    # KL(one-hot || q) = -log q_0
    q0 = math.exp(0.25) / (math.exp(0.25) + math.exp(0.75) + math.exp(-0.5))
    assert loss.item() == pytest.approx(-(temperature**2) * math.log(q0), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all()


def test_half_precision_teacher_probs_are_accepted() -> None:
    student, teacher_probs, labels = _random_case(batch=3, classes=4, seed=3, temperature=4.0)
    loss = HintonKDLoss()(student.float(), teacher_probs.half(), labels)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -2.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
@pytest.mark.parametrize("loss_class", [HintonKDLoss, TopKKDLoss, MultiTaskKDLoss])
def test_invalid_alpha_or_temperature_raises(
    loss_class: type, kwargs: dict[str, float], argument: str
) -> None:
    with pytest.raises(ValueError, match=argument) as info:
        loss_class(**kwargs)
    assert repr(kwargs[argument]) in str(info.value)


def test_mismatched_shapes_raise() -> None:
    loss = HintonKDLoss()
    student = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 3\)"):
        loss(student, torch.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="labels"):
        loss(student, torch.full((2, 3), 1 / 3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        loss(student, torch.full((2, 3), 1 / 3), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="student_logits"):
        loss(torch.zeros(3), torch.full((3,), 1 / 3))


# --- TopKKDLoss -----------------------------------------------------------------------------------


def test_topk_with_all_classes_equals_hinton() -> None:
    temperature = 3.0
    student, teacher_probs, labels = _random_case(
        batch=5, classes=6, seed=4, temperature=temperature
    )
    values, indices = torch.topk(teacher_probs, k=6, dim=1)  # sorted, so indices are permuted
    tail = torch.zeros(5, dtype=torch.float64)

    dense = HintonKDLoss(alpha=0.4, temperature=temperature)(student, teacher_probs, labels)
    sparse = TopKKDLoss(alpha=0.4, temperature=temperature)(student, values, indices, tail, labels)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_topk_matches_brute_force_k_plus_one_buckets(k: int) -> None:
    temperature, alpha, batch, classes = 2.0, 0.7, 4, 8
    student, teacher_probs, labels = _random_case(
        batch, classes, seed=5 + k, temperature=temperature
    )
    values, indices = torch.topk(teacher_probs, k=k, dim=1)
    tail = 1.0 - values.sum(dim=1)

    s = student.numpy()
    p = teacher_probs.numpy()
    q = _np_softmax(s / temperature)
    kls = []
    for row in range(batch):
        top = indices[row].numpy()
        p_buckets = np.append(p[row, top], 1.0 - p[row, top].sum())
        q_buckets = np.append(q[row, top], 1.0 - q[row, top].sum())
        kls.append(np.sum(p_buckets * np.log(p_buckets / q_buckets)))
    ce = np.mean(-np.log(_np_softmax(s)[np.arange(batch), labels.numpy()]))
    expected = alpha * temperature**2 * np.mean(kls) + (1 - alpha) * ce

    student.requires_grad_(True)
    loss = TopKKDLoss(alpha=alpha, temperature=temperature)(student, values, indices, tail, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all()


def test_topk_gradients_finite_when_tail_is_empty() -> None:
    student = torch.tensor([[30.0, -40.0, 2.0]], requires_grad=True)
    teacher_probs = torch.tensor([[0.7, 0.0, 0.3]])
    values, indices = torch.topk(teacher_probs, k=3, dim=1)
    loss = TopKKDLoss(alpha=1.0, temperature=1.0)(student, values, indices, torch.zeros(1))
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()


def test_topk_mismatched_shapes_raise() -> None:
    loss = TopKKDLoss()
    student = torch.zeros(2, 5)
    values = torch.full((2, 3), 0.2)
    indices = torch.tensor([[0, 1, 2], [2, 3, 4]])
    tail = torch.full((2,), 0.4)
    with pytest.raises(ValueError, match="teacher_indices"):
        loss(student, values, indices[:, :2], tail)
    with pytest.raises(ValueError, match=r"1 <= k <= 5"):
        loss(student, torch.full((2, 6), 0.1), torch.zeros(2, 6, dtype=torch.int64), tail)
    with pytest.raises(ValueError, match="tail_mass"):
        loss(student, values, indices, torch.full((3,), 0.4))
    with pytest.raises(ValueError, match="int64"):
        loss(student, values, indices.int(), tail)


# --- MultiTaskKDLoss ------------------------------------------------------------------------------


def test_multitask_is_weighted_sum_of_per_task_losses() -> None:
    temperature, alpha = 4.0, 0.6
    s_a, p_a, y_a = _random_case(batch=3, classes=4, seed=10, temperature=temperature)
    s_b, p_b, y_b = _random_case(batch=3, classes=7, seed=11, temperature=temperature)
    loss = MultiTaskKDLoss(task_weights={"a": 0.25}, alpha=alpha, temperature=temperature)
    total = loss({"a": s_a, "b": s_b}, {"a": p_a, "b": p_b, "unused": p_b}, {"a": y_a, "b": y_b})

    single = HintonKDLoss(alpha=alpha, temperature=temperature)
    loss_a = single(s_a, p_a, y_a)
    loss_b = single(s_b, p_b, y_b)
    torch.testing.assert_close(total, 0.25 * loss_a + 1.0 * loss_b, rtol=1e-12, atol=0)
    assert set(loss.last_task_losses) == {"a", "b"}
    assert loss.last_task_losses["a"] == pytest.approx(loss_a.item(), rel=1e-12)
    assert loss.last_task_losses["b"] == pytest.approx(loss_b.item(), rel=1e-12)
    assert all(type(value) is float for value in loss.last_task_losses.values())


def test_multitask_missing_labels_means_pure_kd_for_that_task() -> None:
    s_a, p_a, y_a = _random_case(batch=2, classes=3, seed=12, temperature=2.0)
    s_b, p_b, _ = _random_case(batch=2, classes=3, seed=13, temperature=2.0)
    total = MultiTaskKDLoss(alpha=0.5, temperature=2.0)(
        {"a": s_a, "b": s_b}, {"a": p_a, "b": p_b}, {"a": y_a}
    )
    single = HintonKDLoss(alpha=0.5, temperature=2.0)
    torch.testing.assert_close(total, single(s_a, p_a, y_a) + single(s_b, p_b, None))


def test_multitask_missing_teacher_task_raises_key_error() -> None:
    s_a, p_a, _ = _random_case(batch=2, classes=3, seed=14, temperature=4.0)
    with pytest.raises(KeyError, match="'digit'"):
        MultiTaskKDLoss()({"a": s_a, "digit": s_a}, {"a": p_a})


def test_multitask_invalid_weight_raises() -> None:
    with pytest.raises(ValueError, match=r"task_weights\['a'\].*-1"):
        MultiTaskKDLoss(task_weights={"a": -1.0})


# --- properties -----------------------------------------------------------------------------------


@st.composite
def _logit_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, float]:
    batch = draw(st.integers(1, 4))
    classes = draw(st.integers(2, 6))
    logit = st.floats(-30.0, 30.0, allow_nan=False, allow_infinity=False)
    student = draw(st.lists(logit, min_size=batch * classes, max_size=batch * classes))
    teacher = draw(st.lists(logit, min_size=batch * classes, max_size=batch * classes))
    temperature = draw(st.floats(0.5, 10.0))
    return (
        torch.tensor(student, dtype=torch.float64).reshape(batch, classes),
        torch.tensor(teacher, dtype=torch.float64).reshape(batch, classes),
        temperature,
    )


@settings(max_examples=50, deadline=None)
@given(_logit_pairs())
def test_kd_term_nonnegative_and_topk_full_equals_hinton(
    case: tuple[torch.Tensor, torch.Tensor, float],
) -> None:
    student, teacher_logits, temperature = case
    teacher_probs = torch.softmax(teacher_logits / temperature, dim=1)
    dense = HintonKDLoss(alpha=1.0, temperature=temperature)(student, teacher_probs)
    assert dense.item() >= -1e-9

    values, indices = torch.topk(teacher_probs, k=teacher_probs.shape[1], dim=1)
    tail = torch.zeros(teacher_probs.shape[0], dtype=torch.float64)
    sparse = TopKKDLoss(alpha=1.0, temperature=temperature)(student, values, indices, tail)
    torch.testing.assert_close(sparse, dense, rtol=1e-9, atol=1e-9)


def test_top_k_equal_to_classes_ignores_a_rounding_tail() -> None:
    """k = classes with a teacher tail of rounding residue gives a finite loss equal to the dense
    KD loss (found with real server answers for a 2-class head)."""
    torch.manual_seed(0)
    student = torch.randn(5, 2)
    teacher_probs = torch.softmax(torch.randn(5, 2), dim=1)
    values, indices = torch.sort(teacher_probs, dim=1, descending=True)
    tail = torch.full((5,), 3.3e-16)
    sparse = TopKKDLoss(alpha=1.0, temperature=2.0)(student, values, indices, tail)
    dense = HintonKDLoss(alpha=1.0, temperature=2.0)(student, teacher_probs)
    assert torch.isfinite(sparse)
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-7)


# --- the fused (numpy, closed-form gradient) path --------------------------------------------------


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("teacher_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_matches_the_torch_ops_in_value_and_gradient(
    logits_dtype: torch.dtype, teacher_dtype: torch.dtype
) -> None:
    """Three tasks of different widths, one without labels, unequal weights, a teacher row with
    an exact zero, a backward through a scaled loss: the fused path gives the torch path's value,
    per-task values and gradients."""
    generator = torch.Generator().manual_seed(7)
    widths = {"digit": 10, "parity": 2, "loops": 3}
    logits = {
        task: torch.randn(16, c, generator=generator, dtype=torch.float64).to(logits_dtype) * 3
        for task, c in widths.items()
    }
    teacher = {
        task: torch.softmax(torch.randn(16, c, generator=generator, dtype=torch.float64), 1).to(
            teacher_dtype
        )
        for task, c in widths.items()
    }
    teacher["parity"][0] = torch.tensor([1.0, 0.0])
    labels = {task: torch.randint(0, c, (16,), generator=generator) for task, c in widths.items()}
    del labels["loops"]
    results = {}
    for fused in (True, False):
        inputs = {task: value.clone().requires_grad_() for task, value in logits.items()}
        loss_fn = MultiTaskKDLoss({"digit": 0.5}, alpha=0.7, temperature=3.0, fused=fused)
        loss = loss_fn(inputs, teacher, labels)
        (2.5 * loss).backward()
        grads = {task: value.grad for task, value in inputs.items()}
        results[fused] = (loss.detach(), grads, dict(loss_fn.last_task_losses))
    (loss, grads, per_task), (ref_loss, ref_grads, ref_per_task) = results[True], results[False]
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if logits_dtype == torch.float32 else {}
    assert loss.dtype == ref_loss.dtype
    torch.testing.assert_close(loss, ref_loss, **tolerance)  # type: ignore[arg-type]
    for task in widths:
        assert grads[task].dtype == logits_dtype
        torch.testing.assert_close(grads[task], ref_grads[task], **tolerance)  # type: ignore[arg-type]
        assert per_task[task] == pytest.approx(ref_per_task[task], rel=1e-5)


def test_fused_gradient_matches_finite_differences() -> None:
    student, teacher_probs, labels = _random_case(batch=4, classes=5, seed=21, temperature=2.0)
    student.requires_grad_()
    loss_fn = HintonKDLoss(alpha=0.3, temperature=2.0)
    assert torch.autograd.gradcheck(lambda s: loss_fn(s, teacher_probs, labels), (student,))


def test_fused_label_out_of_range_names_the_value() -> None:
    student, teacher_probs, labels = _random_case(batch=3, classes=4, seed=22, temperature=4.0)
    for bad in (-1, 4):
        wrong = labels.clone()
        wrong[1] = bad
        with pytest.raises(ValueError, match=rf"labels: class index {bad} is out of range"):
            HintonKDLoss()(student, teacher_probs, wrong)


def test_teacher_needing_a_gradient_or_double_backward_use_the_torch_ops() -> None:
    student, teacher_probs, labels = _random_case(batch=3, classes=4, seed=23, temperature=4.0)
    teacher = teacher_probs.clone().requires_grad_()
    loss = HintonKDLoss()(student.clone().requires_grad_(), teacher, labels)
    loss.backward()
    assert teacher.grad is not None  # the torch path: the teacher gets a gradient
    s = student.clone().requires_grad_()
    (grad,) = torch.autograd.grad(
        HintonKDLoss(fused=False)(s, teacher_probs, labels), s, create_graph=True
    )
    grad.sum().backward()  # double backward works with fused=False
    assert s.grad is not None


def test_fused_is_twice_differentiable_and_falls_back_on_an_infinite_logit() -> None:
    """The fused path is torch ops (double backward works); a -inf logit where the teacher gives
    0 makes `F.kl_div` NaN, so the loss falls back to the written-out KL (0 log 0 = 0)."""
    student, teacher_probs, labels = _random_case(batch=3, classes=4, seed=24, temperature=4.0)
    s = student.clone().requires_grad_()
    (grad,) = torch.autograd.grad(HintonKDLoss()(s, teacher_probs, labels), s, create_graph=True)
    grad.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()

    logits = torch.tensor([[0.5, float("-inf"), 1.0], [2.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.4, 0.0, 0.6], [0.7, 0.2, 0.1]])
    loss_fn = MultiTaskKDLoss(alpha=1.0, temperature=2.0)
    fused = loss_fn({"a": logits}, {"a": teacher})
    plain = MultiTaskKDLoss(alpha=1.0, temperature=2.0, fused=False)({"a": logits}, {"a": teacher})
    assert torch.isfinite(fused)
    torch.testing.assert_close(fused, plain)
    assert loss_fn.last_task_losses["a"] == pytest.approx(plain.item())


# --- MultiTaskKDLoss: per-task losses and learned (uncertainty) weights ---------------------------


def test_multitask_uses_a_task_loss_instead_of_hinton_for_that_task_only() -> None:
    from student_client.training.logit_losses import DKDLoss

    temperature = 4.0
    a_student, a_teacher, a_labels = _random_case(4, 5, seed=10, temperature=temperature)
    b_student, b_teacher, b_labels = _random_case(4, 3, seed=11, temperature=temperature)
    dkd = DKDLoss(alpha=1.0, beta=8.0, temperature=temperature)
    kd = MultiTaskKDLoss({"b": 2.0}, alpha=0.9, temperature=temperature, task_losses={"a": dkd})
    logits = {"a": a_student, "b": b_student}
    loss = kd(logits, {"a": a_teacher, "b": b_teacher}, {"a": a_labels, "b": b_labels})
    hinton = HintonKDLoss(alpha=0.9, temperature=temperature)
    expected = dkd(a_student, a_teacher, a_labels) + 2.0 * hinton(b_student, b_teacher, b_labels)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert kd.last_task_losses["a"] == pytest.approx(dkd(a_student, a_teacher, a_labels).item())
    # Defaults unchanged: no task losses, no learned weights, nothing to optimise.
    assert list(MultiTaskKDLoss().parameters()) == []


def test_uncertainty_weighting_by_hand_and_its_gradient() -> None:
    temperature = 2.0
    a_student, a_teacher, a_labels = _random_case(3, 4, seed=12, temperature=temperature)
    b_student, b_teacher, b_labels = _random_case(3, 2, seed=13, temperature=temperature)
    kd = MultiTaskKDLoss(
        alpha=0.5, temperature=temperature, task_weighting="uncertainty", tasks=["a", "b"]
    ).double()
    assert sorted(name for name, _ in kd.named_parameters()) == [
        "log_variances.a",
        "log_variances.b",
    ]
    with torch.no_grad():
        kd.log_variances["a"].fill_(0.5)
        kd.log_variances["b"].fill_(-1.0)
    loss = kd(
        {"a": a_student, "b": b_student},
        {"a": a_teacher, "b": b_teacher},
        {"a": a_labels, "b": b_labels},
    )
    hinton = HintonKDLoss(alpha=0.5, temperature=temperature)
    la = hinton(a_student, a_teacher, a_labels).item()
    lb = hinton(b_student, b_teacher, b_labels).item()
    expected = math.exp(-0.5) * la + 0.5 + math.exp(1.0) * lb - 1.0
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    # d/ds (exp(-s) L + s) = 1 - exp(-s) L
    assert kd.log_variances["a"].grad.item() == pytest.approx(1 - math.exp(-0.5) * la, rel=1e-10)
    assert kd.log_variances["b"].grad.item() == pytest.approx(1 - math.exp(1.0) * lb, rel=1e-10)
    assert kd.last_task_losses == pytest.approx({"a": la, "b": lb})


def test_uncertainty_weighting_learns_weights_that_balance_the_tasks() -> None:
    """With the task losses held fixed, s_t settles at log L_t: weight exp(-s_t) = 1 / L_t."""
    kd = MultiTaskKDLoss(task_weighting="uncertainty", tasks=["a", "b"])
    optimizer = torch.optim.Adam(kd.parameters(), lr=0.05)
    fixed = {"a": 4.0, "b": 0.25}
    for _ in range(600):
        total = sum(
            torch.exp(-kd.log_variances[t]) * value + kd.log_variances[t]
            for t, value in fixed.items()
        )
        optimizer.zero_grad()
        total.backward()  # type: ignore[union-attr]
        optimizer.step()
    assert kd.log_variances["a"].item() == pytest.approx(math.log(4.0), abs=0.02)
    assert kd.log_variances["b"].item() == pytest.approx(math.log(0.25), abs=0.02)


def test_uncertainty_weighting_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="tasks: task_weighting='uncertainty' needs"):
        MultiTaskKDLoss(task_weighting="uncertainty")
    with pytest.raises(ValueError, match="task_weights: fixed weights and"):
        MultiTaskKDLoss({"a": 2.0}, task_weighting="uncertainty", tasks=["a"])
    with pytest.raises(ValueError, match="task_weighting: expected"):
        MultiTaskKDLoss(task_weighting="learned")  # type: ignore[arg-type]
    kd = MultiTaskKDLoss(task_weighting="uncertainty", tasks=["a"])
    logits, probs, _ = _random_case(2, 3, seed=0, temperature=4.0)
    with pytest.raises(KeyError, match=r"no learned weight for task\(s\) \['b'\]"):
        kd({"a": logits, "b": logits}, {"a": probs, "b": probs})
