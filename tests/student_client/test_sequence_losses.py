"""Tests for student_client.training.sequence_losses: values derived by hand, not by the code."""

from __future__ import annotations

import math

import pytest
import torch

from student_client.training.losses import TopKKDLoss
from student_client.training.sequence_losses import (
    NO_NEXT_TOKEN,
    TokenForwardKLLoss,
    TokenJSDLoss,
    TokenReverseKLLoss,
    next_token_labels,
    real_token_logits,
    student_top_ids,
)

F64 = torch.float64


def _softmax(xs: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(x / temperature) for x in xs]
    return [e / sum(exps) for e in exps]


def _case(seed: int, lengths: list[int], vocab: int = 5, temperature: float = 2.0):  # type: ignore[no-untyped-def]
    """float64 padded student logits (batch, L, V) and the teacher's dense log-probs at T for the
    real tokens, (tokens, V)."""
    generator = torch.Generator().manual_seed(seed)
    batch, longest = len(lengths), max(lengths)
    student = torch.randn(batch, longest, vocab, generator=generator, dtype=F64) * 2
    teacher_logits = torch.randn(sum(lengths), vocab, generator=generator, dtype=F64) * 2
    return student, torch.log_softmax(teacher_logits / temperature, dim=1)


# --- rows and labels ------------------------------------------------------------------------------


def test_real_token_logits_keeps_the_teachers_row_order() -> None:
    logits = torch.arange(2 * 3 * 1, dtype=F64).reshape(2, 3, 1)  # value = 3 * sequence + position
    rows = real_token_logits(logits, torch.tensor([2, 3]))
    assert rows.squeeze(1).tolist() == [0.0, 1.0, 3.0, 4.0, 5.0]
    flat = torch.zeros(5, 4)
    assert real_token_logits(flat) is flat
    assert real_token_logits(flat, torch.tensor([2, 3])) is flat


@pytest.mark.parametrize(
    ("logits", "lengths", "match"),
    [
        (torch.zeros(2, 3, 4), None, "lengths: required"),
        (torch.zeros(2, 3, 4), torch.tensor([1, 4]), r"lengths: expected every length in \[1, 3\]"),
        (torch.zeros(2, 3, 4), torch.tensor([0, 2]), "lengths"),
        (torch.zeros(2, 3, 4), torch.tensor([1.0, 2.0]), "lengths: expected"),
        (torch.zeros(5, 4), torch.tensor([2, 2]), "sum 4 does not match the 5 rows"),
        (torch.zeros(4), None, "student_logits: expected"),
    ],
)
def test_real_token_logits_rejects_bad_shapes(logits, lengths, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        real_token_logits(logits, lengths)


def test_next_token_labels_shift_within_each_sequence() -> None:
    padded = torch.tensor([[7, 8, 9, 0], [4, 5, 0, 0], [6, 0, 0, 0]])
    lengths = torch.tensor([3, 2, 1])
    expected = [8, 9, NO_NEXT_TOKEN, 5, NO_NEXT_TOKEN, NO_NEXT_TOKEN]
    assert next_token_labels(padded, lengths).tolist() == expected
    packed = torch.tensor([7, 8, 9, 4, 5, 6])
    assert next_token_labels(packed, lengths).tolist() == expected
    with pytest.raises(ValueError, match="5 ids do not match sum"):
        next_token_labels(packed[:5], lengths)


def test_student_top_ids_are_the_largest_logits_detached() -> None:
    logits = torch.tensor([[[0.0, 3.0, 1.0, 2.0], [5.0, 4.0, 0.0, 9.0]]], requires_grad=True)
    ids = student_top_ids(logits, 2, torch.tensor([2]))
    assert ids.tolist() == [[1, 3], [3, 0]]
    assert ids.dtype == torch.int64 and not ids.requires_grad
    with pytest.raises(ValueError, match="m: expected 1 <= m <= 4"):
        student_top_ids(logits, 5, torch.tensor([2]))


# --- forward KL -----------------------------------------------------------------------------------


def test_forward_kl_top_k_matches_hand_computed_buckets() -> None:
    temperature = 2.0
    student = [1.0, 3.0, -1.0]  # one token, V = 3
    p0, tail_p = 0.7, 0.3  # the teacher's top-1 is id 2; the tail holds ids 0 and 1
    q = _softmax(student, temperature)
    kl = p0 * math.log(p0 / q[2]) + tail_p * math.log(tail_p / (q[0] + q[1]))
    expected = temperature**2 * kl

    loss = TokenForwardKLLoss(temperature=temperature, teacher_output="probs")
    value = loss(
        torch.tensor([student], dtype=F64),
        torch.tensor([[p0]], dtype=F64),
        torch.tensor([[2]]),
        torch.tensor([tail_p], dtype=F64),
    )
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert kl > 0.1
    # log_probs and a tail left to the loss (1 - 0.7) give the same value.
    as_logs = TokenForwardKLLoss(temperature=temperature)(
        torch.tensor([student], dtype=F64),
        torch.tensor([[math.log(p0)]], dtype=F64),
        torch.tensor([[2]]),
    )
    assert as_logs.item() == pytest.approx(expected, rel=1e-12)


def test_forward_kl_dense_matches_hand_computed_and_averages_per_token() -> None:
    temperature = 1.5
    student = [[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]]  # sequence 0: 2 tokens, sequence 1: 1
    teacher = [[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]]
    kls = []
    for z, p in zip(student, teacher, strict=True):
        q = _softmax(z, temperature)
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)))
    expected = temperature**2 * sum(kls) / 3  # per real token, not per sequence

    padded = torch.tensor([[student[0], student[1]], [student[2], [99.0, -99.0]]], dtype=F64)
    loss = TokenForwardKLLoss(temperature=temperature, teacher_output="probs")
    value = loss(padded, torch.tensor(teacher, dtype=F64), lengths=torch.tensor([2, 1]))
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_forward_kl_equals_top_k_kd_loss_on_real_tokens() -> None:
    student, teacher_log_probs = _case(0, [4, 2, 3], vocab=7)
    lengths = torch.tensor([4, 2, 3])
    top = teacher_log_probs.topk(3, dim=1)
    tail = 1 - top.values.exp().sum(1)
    ours = TokenForwardKLLoss(alpha=1.0, temperature=2.0)(
        student, top.values, top.indices, tail, lengths=lengths
    )
    flat = real_token_logits(student, lengths)
    theirs = TopKKDLoss(alpha=1.0, temperature=2.0)(flat, top.values.exp(), top.indices, tail)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10)
    # k = V with a rounding residue in the tail is the dense loss, and finite.
    full = teacher_log_probs.sort(dim=1, descending=True)
    residue = torch.full((9,), 1e-12, dtype=F64)
    sparse = TokenForwardKLLoss(temperature=2.0)(
        student, full.values, full.indices, residue, lengths=lengths
    )
    dense = TokenForwardKLLoss(temperature=2.0)(student, teacher_log_probs, lengths=lengths)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-10)


# --- mixing with the next-token cross entropy -----------------------------------------------------


def test_mix_with_next_token_cross_entropy_skips_each_last_position() -> None:
    alpha, temperature = 0.25, 2.0
    student = [[1.0, 0.0, -1.0], [0.0, 2.0, 0.0], [3.0, 1.0, 1.0]]  # tokens of lengths (2, 1)
    teacher = [_softmax([0.0, 1.0, 0.0], temperature), [0.2, 0.3, 0.5], [1 / 3] * 3]
    ids = torch.tensor([[2, 0], [1, 0]])  # padded inputs: sequence 0 = (2, 0), sequence 1 = (1)
    lengths = torch.tensor([2, 1])
    kl = 0.0
    for z, p in zip(student, teacher, strict=True):
        q = _softmax(z, temperature)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    # Only position 0 of sequence 0 has a next token (id 0), so CE is that one term.
    ce = -math.log(_softmax(student[0])[0])
    expected = alpha * temperature**2 * kl / 3 + (1 - alpha) * ce

    labels = next_token_labels(ids, lengths)
    assert labels.tolist() == [0, NO_NEXT_TOKEN, NO_NEXT_TOKEN]
    loss = TokenForwardKLLoss(alpha=alpha, temperature=temperature, teacher_output="probs")
    value = loss(torch.tensor(student, dtype=F64), torch.tensor(teacher, dtype=F64), labels=labels)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert ce > 0.3 and kl > 0.3
    # No next token anywhere: the CE part is 0, not NaN.
    none = torch.full((3,), NO_NEXT_TOKEN)
    pure = loss(torch.tensor(student, dtype=F64), torch.tensor(teacher, dtype=F64), labels=none)
    assert pure.item() == pytest.approx(alpha * temperature**2 * kl / 3, rel=1e-12)


# --- reverse KL -----------------------------------------------------------------------------------


def test_reverse_kl_over_scored_ids_and_tail_matches_hand_computed() -> None:
    temperature = 1.0
    student = [2.0, 0.0, 1.0, -1.0]  # one token, V = 4
    q = _softmax(student)
    scored = [0, 2]  # the student's top-2
    p = {0: 0.5, 2: 0.1}  # the teacher's probabilities at those ids; its tail is 0.4
    q_tail = q[1] + q[3]
    expected = sum(q[i] * math.log(q[i] / p[i]) for i in scored) + q_tail * math.log(q_tail / 0.4)

    logits = torch.tensor([student], dtype=F64)
    ids = student_top_ids(logits, 2)
    assert ids.tolist() == [scored]
    scored_values = torch.tensor([[math.log(p[0]), math.log(p[2])]], dtype=F64)
    value = TokenReverseKLLoss(temperature=temperature)(logits, scored_values, ids)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert expected > 0.1


def test_reverse_kl_is_the_full_one_dense_and_a_lower_bound_sparse() -> None:
    student, teacher_log_probs = _case(1, [3, 5], vocab=6)
    lengths = torch.tensor([3, 5])
    flat = real_token_logits(student, lengths)
    log_q = torch.log_softmax(flat / 2.0, dim=1)
    full = 4.0 * (log_q.exp() * (log_q - teacher_log_probs)).sum(1).mean()
    loss = TokenReverseKLLoss(alpha=1.0, temperature=2.0)
    assert loss(student, teacher_log_probs, lengths=lengths).item() == pytest.approx(full.item())
    previous = 0.0
    for m in (1, 3, 5, 6):  # finer buckets: the bound rises to the full value
        ids = student_top_ids(student, m, lengths)
        bound = loss(student, teacher_log_probs.gather(1, ids), ids, lengths=lengths).item()
        assert previous - 1e-12 <= bound <= full.item() + 1e-12
        previous = bound
    assert previous == pytest.approx(full.item(), rel=1e-10)


def test_reverse_kl_tail_floor_keeps_a_rounded_away_tail_finite() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0]], dtype=F64)  # the student's tail off id 0 is 2/3
    value = TokenReverseKLLoss(alpha=1.0)(
        logits, torch.tensor([[0.0]], dtype=F64), torch.tensor([[0]])
    )
    q0, q_tail = 1 / 3, 2 / 3
    expected = q0 * math.log(q0 / 1.0) + q_tail * math.log(q_tail / 1e-6)
    assert value.item() == pytest.approx(expected, rel=1e-12)


# --- JSD(beta) ------------------------------------------------------------------------------------


def test_jsd_matches_hand_computed_on_two_buckets() -> None:
    beta = 0.3
    student = [0.0, 1.0]
    q = _softmax(student)
    p = [0.8, 0.2]
    mix = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
    kl_pm = sum(pi * math.log(pi / mi) for pi, mi in zip(p, mix, strict=True))
    kl_qm = sum(qi * math.log(qi / mi) for qi, mi in zip(q, mix, strict=True))
    expected = beta * kl_pm + (1 - beta) * kl_qm
    loss = TokenJSDLoss(temperature=1.0, teacher_output="probs", beta=beta)
    value = loss(torch.tensor([student], dtype=F64), torch.tensor([p], dtype=F64))
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert expected > 0.01


@pytest.mark.parametrize("m", [None, 3])
def test_jsd_approaches_forward_and_reverse_kl_at_the_ends(m: int | None) -> None:
    student, teacher_log_probs = _case(2, [4, 3], vocab=6)
    lengths = torch.tensor([4, 3])
    ids = None if m is None else student_top_ids(student, m, lengths)
    values = teacher_log_probs if ids is None else teacher_log_probs.gather(1, ids)

    def run(loss: torch.nn.Module) -> float:
        return float(loss(student, values, ids, lengths=lengths))

    forward = run(TokenForwardKLLoss(temperature=2.0))
    reverse = run(TokenReverseKLLoss(temperature=2.0))
    assert forward > 0.05 and abs(forward - reverse) > 0.01  # the two limits are told apart
    small = 1e-5
    assert run(TokenJSDLoss(temperature=2.0, beta=small)) / small == pytest.approx(
        forward, rel=1e-3
    )
    large = 1 - small
    assert run(TokenJSDLoss(temperature=2.0, beta=large)) / small == pytest.approx(
        reverse, rel=1e-3
    )


# --- every loss: gradients, padding, bad input ----------------------------------------------------

LOSSES = [
    TokenForwardKLLoss(alpha=0.7, temperature=2.0),
    TokenReverseKLLoss(alpha=0.7, temperature=2.0),
    TokenJSDLoss(alpha=0.7, temperature=2.0, beta=0.4),
]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: type(loss).__name__)
@pytest.mark.parametrize("m", [None, 2, 4])
def test_gradcheck_in_float64(loss: torch.nn.Module, m: int | None) -> None:
    student, teacher_log_probs = _case(3, [3, 1], vocab=4)
    lengths = torch.tensor([3, 1])
    ids = None if m is None else student_top_ids(student, m, lengths)
    values = teacher_log_probs if ids is None else teacher_log_probs.gather(1, ids)
    labels = next_token_labels(torch.tensor([[1, 2, 3], [0, 0, 0]]), lengths)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda logits: loss(logits, values, ids, lengths=lengths, labels=labels), (student,)
    )


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: type(loss).__name__)
def test_padding_content_never_changes_the_loss(loss: torch.nn.Module) -> None:
    student, teacher_log_probs = _case(4, [2, 4, 1], vocab=5)
    lengths = torch.tensor([2, 4, 1])
    ids = student_top_ids(student, 2, lengths)
    values = teacher_log_probs.gather(1, ids)
    labels = next_token_labels(torch.zeros(3, 4, dtype=torch.int64), lengths)
    real = torch.arange(4).unsqueeze(0) < lengths.unsqueeze(1)  # (batch, L)
    noisy = student.clone()
    noisy[~real] = torch.randn(int((~real).sum()), 5, dtype=F64) * 100
    noisy.requires_grad_(True)
    clean = loss(student, values, ids, lengths=lengths, labels=labels)
    value = loss(noisy, values, ids, lengths=lengths, labels=labels)
    assert value.item() == clean.item()
    (grad,) = torch.autograd.grad(value, noisy)
    assert torch.all(grad[~real] == 0) and grad[real].abs().sum() > 0
    flat = loss(real_token_logits(student, lengths), values, ids, labels=labels)
    assert flat.item() == pytest.approx(clean.item(), rel=1e-12)


def test_float32_student_with_float16_teacher_stays_float32() -> None:
    student, teacher_log_probs = _case(5, [3], vocab=5)
    value = TokenForwardKLLoss()(
        student.float(), teacher_log_probs.half(), lengths=torch.tensor([3])
    )
    assert value.dtype == torch.float32 and math.isfinite(value.item())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"teacher_output": "logits"}, "teacher_output"),
    ],
)
def test_bad_settings_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TokenForwardKLLoss(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        TokenJSDLoss(beta=1.0)
    with pytest.raises(ValueError, match="tail_floor"):
        TokenReverseKLLoss(tail_floor=0.0)


def test_mismatched_teacher_rows_raise_naming_shapes() -> None:
    student = torch.zeros(4, 5)
    loss = TokenForwardKLLoss()
    with pytest.raises(ValueError, match=r"teacher_values: shape \(3, 5\)"):
        loss(student, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="teacher_values"):
        loss(student, torch.zeros(4, 2), torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"tail_mass: expected shape \(4,\)"):
        loss(student, torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.int64), torch.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        loss(student, torch.zeros(4, 5), labels=torch.zeros(4, dtype=torch.int32))
