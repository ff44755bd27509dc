"""Tests for the feature-based losses of student_client.losses: HintLoss (FitNets),
AttentionTransferLoss (Zagoruyko & Komodakis) and FSPLoss (Yim et al.), checked against
hand-written formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from student_client.training.feature_losses import (
    AttentionTransferLoss,
    FSPLoss,
    HintLoss,
    attention_map,
    fsp_matrix,
)

# --- HintLoss: vectors ----------------------------------------------------------------------------


def test_hint_identity_adapter_gives_plain_mse() -> None:
    hint = HintLoss((5,), (5,))
    with torch.no_grad():
        hint.adapter.weight.copy_(torch.eye(5))
        assert hint.adapter.bias is not None
        hint.adapter.bias.zero_()
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    teacher = torch.randn(3, 5, generator=generator, dtype=torch.float64)

    loss = hint(student, teacher)

    s, t = student.tolist(), teacher.tolist()
    expected = sum((s[i][j] - t[i][j]) ** 2 for i in range(3) for j in range(5)) / 15
    assert loss.shape == ()
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_hint_gradient_reaches_adapter_and_student_but_not_teacher() -> None:
    hint = HintLoss((4,), (6,))
    student = torch.randn(5, 4, requires_grad=True)
    teacher = torch.randn(5, 6, requires_grad=True)

    hint(student, teacher).backward()

    assert student.grad is not None and student.grad.abs().sum() > 0
    assert hint.adapter.weight.grad is not None and hint.adapter.weight.grad.abs().sum() > 0
    assert hint.adapter.bias is not None and hint.adapter.bias.grad is not None
    assert teacher.grad is None


def test_hint_adapter_learns_a_linear_relation() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    relation = torch.randn(4, 6, generator=generator)  # teacher = relation @ student
    student = torch.randn(64, 6, generator=generator)
    teacher = student @ relation.T  # (64, 4)
    hint = HintLoss((6,), (4,))
    optimizer = torch.optim.Adam(hint.parameters(), lr=0.05)

    initial = hint(student, teacher).item()
    for _ in range(200):
        optimizer.zero_grad()
        loss = hint(student, teacher)
        loss.backward()
        optimizer.step()
    final = hint(student, teacher).item()

    assert initial > 0.1
    assert final < 0.1 * initial


# --- HintLoss: spatial maps -----------------------------------------------------------------------


def test_hint_spatial_same_size_uses_1x1_conv_only() -> None:
    hint = HintLoss((8, 4, 4), (16, 4, 4))
    student = torch.randn(2, 8, 4, 4)
    teacher = torch.randn(2, 16, 4, 4)

    assert isinstance(hint.adapter, torch.nn.Conv2d)
    assert hint.adapter.kernel_size == (1, 1)
    assert hint.pool is None
    adapted = hint.adapt(student)
    assert adapted.shape == (2, 16, 4, 4)
    loss = hint(student, teacher)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(F.mse_loss(adapted, teacher).item(), rel=1e-6)


def test_hint_spatial_different_size_pools_to_teacher_size() -> None:
    hint = HintLoss((8, 8, 8), (16, 4, 4))
    student = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    teacher = torch.randn(2, 16, 4, 4, dtype=torch.float64)

    adapted = hint.adapt(student)
    assert adapted.shape == (2, 16, 4, 4)
    # 8 -> 4 adaptive pooling is a 2x2 average pool of the 1x1 conv's output.
    weight = hint.adapter.weight.double()
    assert hint.adapter.bias is not None
    expected = F.avg_pool2d(F.conv2d(student, weight, hint.adapter.bias.double()), 2)
    torch.testing.assert_close(adapted, expected)

    loss = hint(student, teacher)
    assert loss.shape == ()
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(((expected - teacher) ** 2).mean().item(), rel=1e-12)


def test_hint_half_precision_teacher_is_accepted() -> None:
    hint = HintLoss((3,), (2,))
    loss = hint(torch.randn(4, 3), torch.randn(4, 2).half())
    assert loss.dtype == torch.float32
    assert math.isfinite(loss.item())


def test_hint_wrong_input_shape_names_both_shapes() -> None:
    hint = HintLoss((8, 4, 4), (16, 4, 4))
    with pytest.raises(ValueError, match=r"student_features.*\(8, 8, 8\).*\(8, 4, 4\)"):
        hint(torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match=r"teacher_features.*\(16, 2, 2\).*\(16, 4, 4\)"):
        hint(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2))
    with pytest.raises(ValueError, match=r"\(3, 16, 4, 4\).*\(2, 8, 4, 4\)"):
        hint(torch.randn(2, 8, 4, 4), torch.randn(3, 16, 4, 4))
    with pytest.raises(ValueError, match=r"student_features.*\(8,\)"):
        HintLoss((8,), (4,))(torch.randn(8), torch.randn(1, 4))


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "argument"),
    [
        ((8, 4), (16, 4, 4), "student_shape"),
        ((8,), (0,), "teacher_shape"),
        ((8, 4, 4), (16,), "student_shape"),
        ((), (4,), "student_shape"),
    ],
)
def test_hint_invalid_constructor_shapes_raise(
    student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], argument: str
) -> None:
    with pytest.raises(ValueError, match=argument):
        HintLoss(student_shape, teacher_shape)


# --- AttentionTransferLoss ------------------------------------------------------------------------


def test_at_zero_for_identical_maps() -> None:
    features = torch.randn(3, 4, 5, 5)
    loss = AttentionTransferLoss()(features, features.clone())
    assert loss.shape == ()
    assert loss.item() == 0.0


@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e3])
def test_at_invariant_to_positive_scaling(scale: float) -> None:
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
    teacher = torch.randn(2, 6, 4, 4, generator=generator, dtype=torch.float64)
    at = AttentionTransferLoss(beta=10.0)
    base = at(student, teacher).item()
    assert base > 0
    assert at(scale * student, teacher).item() == pytest.approx(base, rel=1e-9)
    assert at(student, scale * teacher).item() == pytest.approx(base, rel=1e-9)
    assert at(-student, teacher).item() == pytest.approx(base, rel=1e-12)


def test_at_tiny_case_matches_hand_computation() -> None:
    beta = 3.0
    # (batch=1, channels=2, 2, 2)
    student = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [0.0, 0.0]]]])
    teacher = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]])

    # Channel means of A^2: student [0.5, 2, 0, 0], teacher [0.5, 0.5, 0.5, 0.5].
    norm_s = math.sqrt(0.5**2 + 2.0**2)
    q_s = [0.5 / norm_s, 2.0 / norm_s, 0.0, 0.0]
    q_t = [0.5, 0.5, 0.5, 0.5]
    expected = beta * sum((a - b) ** 2 for a, b in zip(q_s, q_t, strict=True)) / 4

    loss = AttentionTransferLoss(p=2.0, beta=beta)(student, teacher)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_at_positive_for_different_maps_and_teacher_gets_no_gradient() -> None:
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 5, 4, 4, requires_grad=True)
    loss = AttentionTransferLoss()(student, teacher)
    assert loss.item() > 0
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_at_all_zero_student_map_has_finite_value_and_gradient() -> None:
    student = torch.zeros(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4)
    loss = AttentionTransferLoss(beta=2.0)(student, teacher)
    # Q_s = 0 and ||Q_t|| = 1, so each sample contributes 1 over its 16 positions.
    assert loss.item() == pytest.approx(2.0 * 1.0 / 16, rel=1e-6)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_at_pools_student_to_teacher_spatial_size() -> None:
    generator = torch.Generator().manual_seed(3)
    teacher = torch.randn(2, 5, 4, 4, generator=generator)
    at = AttentionTransferLoss()

    other = torch.randn(2, 3, 8, 8, generator=generator)
    loss = at(other, teacher)
    assert loss.shape == ()
    assert math.isfinite(loss.item()) and loss.item() > 0

    # Each teacher pixel repeated 2x2: pooling the student's energy gives the teacher's back.
    upsampled = teacher.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert at(upsampled, teacher).item() == pytest.approx(0.0, abs=1e-12)
    # A smaller student map is upsampled by repetition, the same way.
    assert math.isfinite(at(torch.randn(2, 3, 2, 2, generator=generator), teacher).item())


def test_attention_map_rows_are_unit_norm_and_match_channel_sum() -> None:
    features = torch.randn(3, 4, 2, 5, dtype=torch.float64)
    q = attention_map(features)
    assert q.shape == (3, 10)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(3, dtype=torch.float64))
    # The paper's F_sum^p (sum over channels) gives the same map once normalised.
    summed = features.abs().pow(2).sum(dim=1).flatten(1)
    torch.testing.assert_close(q, summed / summed.norm(dim=1, keepdim=True))


def test_at_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"p: .*0\.5"):
        AttentionTransferLoss(p=0.5)
    with pytest.raises(ValueError, match=r"beta: .*-1"):
        AttentionTransferLoss(beta=-1.0)
    with pytest.raises(ValueError, match=r"p: .*inf"):
        attention_map(torch.randn(1, 1, 2, 2), p=math.inf)
    at = AttentionTransferLoss()
    with pytest.raises(ValueError, match=r"student_features.*\(2, 3, 4\)"):
        at(torch.randn(2, 3, 4), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(3, 3, 4, 4\).*\(2, 3, 4, 4\)"):
        at(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))


# What the property test checks: Q_s and Q_t are unit vectors (or zero) with non-negative
# entries, so ||Q_s - Q_t||^2 = ||Q_s||^2 + ||Q_t||^2 - 2 Q_s.Q_t <= 2 per sample (<= 4 holds
# for any unit vectors; non-negativity tightens it). The loss averages over batch and the
# H_t * W_t positions, so 0 <= loss <= 2 * beta / (H_t * W_t). With equal spatial sizes the loss
# is symmetric in its two arguments, and it ignores positive rescaling of either input.
@st.composite
def _feature_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, float, float, float]:
    batch = draw(st.integers(1, 3))
    height = draw(st.integers(1, 4))
    width = draw(st.integers(1, 4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape_s = (batch, draw(st.integers(1, 4)), height, width)
    shape_t = (batch, draw(st.integers(1, 4)), height, width)
    student = torch.randn(shape_s, generator=generator, dtype=torch.float64)
    teacher = torch.randn(shape_t, generator=generator, dtype=torch.float64)
    p = draw(st.sampled_from([1.0, 2.0, 3.0, 4.0]))
    beta = draw(st.floats(0.0, 1000.0))
    scale = draw(st.floats(1e-2, 1e2))
    return student, teacher, p, beta, scale


@settings(max_examples=60, deadline=None)
@given(_feature_pairs())
def test_at_bounds_symmetry_and_scale_invariance(
    case: tuple[torch.Tensor, torch.Tensor, float, float, float],
) -> None:
    student, teacher, p, beta, scale = case
    at = AttentionTransferLoss(p=p, beta=beta)
    positions = teacher.shape[2] * teacher.shape[3]

    loss = at(student, teacher).item()
    assert 0.0 <= loss <= 2.0 * beta / positions * (1 + 1e-9) + 1e-12
    assert at(teacher, student).item() == pytest.approx(loss, rel=1e-9, abs=1e-12)
    assert at(scale * student, teacher).item() == pytest.approx(loss, rel=1e-6, abs=1e-12)


def test_at_ignores_the_scale_of_tiny_activations() -> None:
    """Found by the property test: 1x1 maps of activations ~1e-3 at p=4 have energies below
    F.normalize's eps (1e-12), which used to bend them (loss 0.0063 instead of 0)."""
    student = torch.tensor([0.6614, 0.2669, 0.0617], dtype=torch.float64).reshape(3, 1, 1, 1)
    teacher = torch.tensor([0.6213, -0.4519, -0.1661], dtype=torch.float64).reshape(3, 1, 1, 1)
    at = AttentionTransferLoss(p=4.0, beta=1.0)
    assert at(student, teacher).item() == 0.0
    assert at(0.015625 * student, teacher).item() == 0.0
    assert at(1e-6 * student, 1e-6 * teacher).item() == 0.0


# --- FSP matrices (Yim et al. 2017) ---------------------------------------------------------------


def test_fsp_matrix_and_loss_by_hand() -> None:
    # One sample; first map: 2 channels over 2 positions, second map: 1 channel.
    first = torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    second = torch.tensor([[[[4.0, 0.5]]]], dtype=torch.float64)  # (1, 1, 1, 2)
    # G[0, 0] = (1*4 + 2*0.5) / 2 = 2.5; G[1, 0] = (3*4 - 1*0.5) / 2 = 5.75.
    gram = fsp_matrix(first, second)
    assert gram.shape == (1, 2, 1)
    assert gram.flatten().tolist() == [2.5, 5.75]
    teacher_first = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]]], dtype=torch.float64)
    teacher_second = torch.tensor([[[[2.0, 2.0]]]], dtype=torch.float64)
    # Teacher G = [(0 + 4) / 2, (2 + 2) / 2] = [2, 2]; squared differences 0.25 + 14.0625.
    loss = FSPLoss(weight=2.0)(first, second, teacher_first, teacher_second)
    assert loss.item() == pytest.approx(2.0 * (0.25 + 14.0625), rel=1e-12)


def test_fsp_batch_mean_vector_hint_and_pooling() -> None:
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 4, 6, 6, generator=generator, dtype=torch.float64)
    vector = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    # A vector hint (the teacher's `features`) against a map: channel means outer the vector.
    expected = maps.mean(dim=(2, 3))[:, :, None] * vector[:, None, :]
    torch.testing.assert_close(fsp_matrix(maps, vector), expected, rtol=1e-12, atol=1e-12)
    # Different spatial sizes: the larger is average-pooled to the smaller.
    small = torch.randn(3, 2, 3, 3, generator=generator, dtype=torch.float64)
    pooled = torch.nn.functional.avg_pool2d(maps, 2)
    torch.testing.assert_close(fsp_matrix(maps, small), fsp_matrix(pooled, small))
    # The loss is the batch mean of per-sample sums of squares.
    loss_fn = FSPLoss()
    t_first = torch.randn(3, 4, 6, 6, generator=generator, dtype=torch.float64)
    t_second = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    total = loss_fn(maps, vector, t_first, t_second)
    by_hand = (fsp_matrix(maps, vector) - fsp_matrix(t_first, t_second)).pow(2).sum((1, 2))
    assert total.item() == pytest.approx(by_hand.mean().item(), rel=1e-12)
    # FSP of (3, 2, 3, 3) with itself is (3, 2, 2); the student's is (3, 4, 5).
    with pytest.raises(ValueError, match=r"teacher FSP matrix shape \(3, 2, 2\)"):
        loss_fn(maps, vector, small, small)


def test_fsp_gradient_reaches_the_student_only() -> None:
    generator = torch.Generator().manual_seed(1)
    student = [
        torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 2, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True),
    ]
    teacher = [
        torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True),
    ]
    loss_fn = FSPLoss(weight=0.5)
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(a, b, *teacher), tuple(student))
    loss_fn(*student, *teacher).backward()
    assert all(t.grad is None for t in teacher)
    with pytest.raises(ValueError, match="weight"):
        FSPLoss(weight=float("nan"))
