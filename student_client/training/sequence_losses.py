"""Distillation losses on per-token soft targets (language-model students), one `nn.Module` each.

A token-level task's teacher rows are the batch's REAL tokens in sequence order (sequence 0's
positions, then sequence 1's, ...). Row r of a causal LM is the teacher's distribution of the token
that FOLLOWS position r. The student's logits may come padded, `(batch, L, V)` with `lengths
(batch,)`, or already flattened to real tokens, `(tokens, V)`; `real_token_logits` puts both in the
teacher's row order, so padding never reaches a loss.

- `TokenForwardKLLoss`: KL(teacher || student) per token, from dense rows or from top-k + tail
  (off-policy data).
- `TokenReverseKLLoss`: KL(student || teacher) per token, from the teacher's `scored_values` at
  ids the student chose (`student_top_ids`; on-policy data).
- `TokenJSDLoss`: the generalised Jensen-Shannon divergence JSD(beta) of GKD on the same support.

Every loss is averaged over real tokens (each real token weighs the same, whatever its
sequence's length), scaled by T^2, and mixed with the next-token cross entropy by alpha when
`labels` (`next_token_labels`) are given:

    loss = alpha * T^2 * mean_tokens(divergence) + (1 - alpha) * CE(student_logits, labels)

The support. With `teacher_ids` (tokens, m) the divergence is taken between the two
distributions over m + 1 buckets: the m listed ids, and one tail bucket R holding every other id
(the student's tail is logsumexp of its other logits; the teacher's is `tail_mass`, or
1 - sum exp(teacher log-probs at the ids) when not given). The ids of a row must be distinct. By
the chain rule of KL, for either direction (P, Q) this is exact up to the mass inside the tail:

    KL_V(P || Q) = KL_{m+1}(P || Q) + P(R) * KL(P(. | R) || Q(. | R))      >= KL_{m+1}(P || Q)

so it is a lower bound of the full-vocabulary divergence that is tight when P(R) is small: the
teacher's top-k for the forward KL, the student's own top-m for the reverse KL. Without
`teacher_ids` the teacher's rows are dense (tokens, V) and the divergence is the full one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from student_client.training.losses import compute_dtype

NO_NEXT_TOKEN = (
    -100
)  # the label of each sequence's last real position (`F.cross_entropy` ignores it)
TEACHER_OUTPUTS = ("probs", "log_probs")


def _check_lengths(lengths: Tensor, longest: int | None) -> None:
    """Raise `ValueError` unless `lengths` is (batch >= 1,) integers in [1, longest]."""
    if lengths.dim() != 1 or lengths.shape[0] == 0 or lengths.is_floating_point():
        raise ValueError(
            f"lengths: expected (batch >= 1,) integers, got shape {tuple(lengths.shape)} "
            f"dtype {lengths.dtype}"
        )
    low, high = torch.stack([lengths.min(), lengths.max()]).tolist()  # one device sync
    if low < 1 or (longest is not None and high > longest):
        raise ValueError(f"lengths: expected every length in [1, {longest}], got {low}..{high}")


def _real_positions(padded: Tensor, lengths: Tensor) -> Tensor:
    """The rows of `padded` (batch, L, ...) at real positions, in sequence order: (tokens, ...)."""
    _check_lengths(lengths, padded.shape[1])
    positions = torch.arange(padded.shape[1], device=padded.device)  # (L,)
    real = positions.unsqueeze(0) < lengths.to(padded.device).unsqueeze(1)  # (batch, L)
    return padded[real]  # row-major: sequence 0's positions, then sequence 1's


def real_token_logits(student_logits: Tensor, lengths: Tensor | None = None) -> Tensor:
    """The student's logits at real tokens, (tokens, V), in the teacher's row order.

    `student_logits` is either (batch, L, V) padded, with `lengths` (batch,) in [1, L] required
    (what lies past a length is dropped and gets no gradient), or (tokens, V) already flattened,
    returned as is (with `lengths` given, tokens must equal their sum). Raises `ValueError` naming
    the shapes otherwise. Reads the lengths on the host once (a device sync).
    """
    if student_logits.dim() == 3:
        if lengths is None:
            raise ValueError(
                f"lengths: required with padded student_logits {tuple(student_logits.shape)}"
            )
        return _real_positions(student_logits, lengths)
    if student_logits.dim() != 2:
        raise ValueError(
            f"student_logits: expected (batch, L, V) or (tokens, V), "
            f"got {tuple(student_logits.shape)}"
        )
    if lengths is not None:
        _check_lengths(lengths, None)
        if int(lengths.sum()) != student_logits.shape[0]:
            raise ValueError(
                f"lengths: sum {int(lengths.sum())} does not match the {student_logits.shape[0]} "
                f"rows of student_logits {tuple(student_logits.shape)}"
            )
    return student_logits


def next_token_labels(input_ids: Tensor, lengths: Tensor) -> Tensor:
    """(tokens,) int64 next-token labels aligned with the teacher's rows.

    The label of real position t is the id at t + 1 of the same sequence; the last real position
    of each sequence has no next token and gets `NO_NEXT_TOKEN` (-100), which the losses' cross
    entropy skips (the KD term still counts that row: the teacher's distribution there is a
    target like any other). `input_ids` is (batch, L) padded or (tokens,) packed end to end.
    """
    if input_ids.dim() == 2:
        packed = _real_positions(input_ids, lengths)  # (tokens,)
    elif input_ids.dim() == 1:
        _check_lengths(lengths, None)
        packed = input_ids
    else:
        raise ValueError(
            f"input_ids: expected (batch, L) or (tokens,), got {tuple(input_ids.shape)}"
        )
    if packed.shape[0] != int(lengths.sum()):
        raise ValueError(
            f"input_ids: {packed.shape[0]} ids do not match sum(lengths) = {int(lengths.sum())}"
        )
    labels = torch.roll(packed.to(torch.int64), shifts=-1)  # (tokens,)
    last = torch.cumsum(lengths.to(packed.device), dim=0) - 1  # (batch,)
    return labels.index_fill(0, last, NO_NEXT_TOKEN)


@torch.no_grad()
def student_top_ids(student_logits: Tensor, m: int, lengths: Tensor | None = None) -> Tensor:
    """(tokens, m) int64: the student's m most probable ids per real token, detached.

    What to send as `scored_ids` for `TokenReverseKLLoss` / `TokenJSDLoss`: the ids are distinct
    per row, and the ranking is the same at any temperature.
    """
    logits = real_token_logits(student_logits, lengths)  # (tokens, V)
    if not 1 <= m <= logits.shape[1]:
        raise ValueError(f"m: expected 1 <= m <= {logits.shape[1]}, got {m}")
    return logits.topk(m, dim=1).indices


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """(rows,) sum over buckets of p (log p - log q), with 0 log 0 = 0 and 0 log q = 0 for any q.

    Both sides are substituted where p = 0, so a -inf there gives no NaN value nor gradient.
    """
    has_mass = log_p > float("-inf")
    safe_p = torch.where(has_mass, log_p, torch.zeros_like(log_p))
    safe_q = torch.where(has_mass, log_q, torch.zeros_like(log_q))
    return (torch.exp(safe_p) * (safe_p - safe_q) * has_mass).sum(dim=1)


def _bucket_log_probs(
    scaled_logits: Tensor,
    teacher_log_probs: Tensor,
    ids: Tensor | None,
    tail_mass: Tensor | None,
    tail_floor: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """(teacher, student) log-probabilities over the same buckets, each (tokens, buckets).

    Dense (`ids` None): the V ids. Sparse: the m ids, then the tail bucket. Where the ids cover
    the whole vocabulary the student's tail is empty, and the teacher's (rounding residue) is
    taken as empty too, so it cannot make the loss infinite. The teacher's tail is at least
    `tail_floor`.
    """
    log_q = F.log_softmax(scaled_logits, dim=1)  # (tokens, V)
    if ids is None:
        return teacher_log_probs, log_q
    top_q = log_q.gather(1, ids)  # (tokens, m)
    others = torch.ones_like(log_q, dtype=torch.bool).scatter(1, ids, False)
    tail_q = torch.logsumexp(log_q.masked_fill(~others, float("-inf")), dim=1)  # (tokens,)
    if tail_mass is None:
        tail_p = 1.0 - torch.exp(teacher_log_probs).sum(dim=1)  # (tokens,)
    else:
        tail_p = tail_mass
    log_tail_p = torch.log(tail_p.clamp(min=tail_floor))
    log_tail_p = log_tail_p.masked_fill(torch.isneginf(tail_q), float("-inf"))
    teacher = torch.cat([teacher_log_probs, log_tail_p.unsqueeze(1)], dim=1)  # (tokens, m + 1)
    return teacher, torch.cat([top_q, tail_q.unsqueeze(1)], dim=1)


class _TokenDivergenceLoss(nn.Module):
    """What the per-token losses share: rows, support, T^2, averaging and the alpha mix."""

    def __init__(self, alpha: float, temperature: float, teacher_output: str = "log_probs") -> None:
        super().__init__()
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha: must be a number in [0, 1], got {alpha!r}")
        if not (
            isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
        ):
            raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
        if teacher_output not in TEACHER_OUTPUTS:
            raise ValueError(
                f"teacher_output: expected one of {TEACHER_OUTPUTS}, got {teacher_output!r}"
            )
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.teacher_output = teacher_output

    tail_floor = 0.0  # the least teacher tail probability in the sparse support

    def divergence(self, teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
        """(tokens,) the divergence per token between two (tokens, buckets) log-distributions."""
        raise NotImplementedError

    def forward(
        self,
        student_logits: Tensor,
        teacher_values: Tensor,
        teacher_ids: Tensor | None = None,
        tail_mass: Tensor | None = None,
        *,
        lengths: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Return the 0-dim loss for one batch of sequences.

        Args:
            student_logits: (batch, L, V) padded with `lengths`, or (tokens, V) real tokens;
                raw logits (T = 1), floating.
            teacher_values: the teacher's rows at this loss's temperature, as `teacher_output`
                says (probs or log_probs; any floating dtype): (tokens, V) dense, or (tokens, m)
                at `teacher_ids` (top-k `values`, or `scored_values`, which are log_probs).
            teacher_ids: (tokens, m) integer ids, distinct per row (not checked), or None: dense.
            tail_mass: (tokens,) the teacher's probability off `teacher_ids` (top-k
                `tail_mass`); None: 1 - the sum of the probabilities at the ids.
            lengths: (batch,) real lengths, required with padded `student_logits`.
            labels: (tokens,) int64 next-token ids (`next_token_labels`, `NO_NEXT_TOKEN` where
                there is none), or None for pure distillation (alpha taken to be 1).

        Raises `ValueError` naming the shapes when the inputs do not fit together.
        """
        logits = real_token_logits(student_logits, lengths)  # (tokens, V)
        tokens, vocab = logits.shape
        width = vocab if teacher_ids is None else teacher_ids.shape[-1]
        if teacher_values.shape != (tokens, width) or (
            teacher_ids is not None and teacher_ids.shape != teacher_values.shape
        ):
            ids_shape = None if teacher_ids is None else tuple(teacher_ids.shape)
            raise ValueError(
                f"teacher_values: shape {tuple(teacher_values.shape)} (teacher_ids {ids_shape}) "
                f"does not fit the student's {tokens} real tokens of {vocab} ids: expected "
                f"({tokens}, V) dense, or (tokens, m) values and ids with 1 <= m <= {vocab}"
            )
        if teacher_ids is not None and not 1 <= width <= vocab:
            raise ValueError(f"teacher_ids: expected 1 <= m <= {vocab}, got m = {width}")
        if tail_mass is not None and tail_mass.shape != (tokens,):
            raise ValueError(f"tail_mass: expected shape ({tokens},), got {tuple(tail_mass.shape)}")
        if labels is not None and (labels.shape != (tokens,) or labels.dtype != torch.int64):
            raise ValueError(
                f"labels: expected ({tokens},) int64, got {tuple(labels.shape)} {labels.dtype}"
            )
        dtype = compute_dtype(logits, teacher_values)
        device = logits.device
        logits = logits.to(dtype)
        teacher = teacher_values.to(device=device, dtype=dtype)  # (tokens, width)
        if self.teacher_output == "probs":
            teacher = torch.log(teacher.clamp(min=0.0))
        ids = None if teacher_ids is None else teacher_ids.to(device=device, dtype=torch.int64)
        tail = None if tail_mass is None else tail_mass.to(device=device, dtype=dtype)
        t = self.temperature

        log_p, log_q = _bucket_log_probs(
            logits / t, teacher, ids, tail, self.tail_floor
        )  # (tokens, buckets)
        kd = self.divergence(log_p, log_q).mean() * (t * t)  # ()
        if labels is None:
            return kd
        labels = labels.to(device)
        counted = (labels != NO_NEXT_TOKEN).sum().clamp(min=1)  # no sync; CE = 0 if none
        ce = F.cross_entropy(logits, labels, ignore_index=NO_NEXT_TOKEN, reduction="sum")
        return self.alpha * kd + (1.0 - self.alpha) * ce / counted


class TokenForwardKLLoss(_TokenDivergenceLoss):
    """Word-level knowledge distillation: KL(p_teacher || p_student) at every real token.

    Geoffrey Hinton, Oriol Vinyals, Jeff Dean (2015), "Distilling the Knowledge in a Neural
    Network", arXiv:1503.02531; per token for sequence models as the word-level KD of Yoon Kim,
    Alexander M. Rush (2016), "Sequence-Level Knowledge Distillation", EMNLP, arXiv:1606.07947.

    divergence_r = sum_b p_b (log p_b - log q_b)      (0 log 0 = 0)

    over the V ids (dense rows) or the k + 1 buckets of the teacher's top-k ids and the tail
    (exact over those buckets, as `TopKKDLoss`; the tail's content is the only thing lost). The
    teacher's distribution is a constant target: it gets no gradient through `tail_mass`. Fits
    off-policy data (sequences from a corpus or from the teacher). `teacher_output` is "probs" or
    "log_probs" (the default; a float16 probability of a rare token underflows, its log does not).
    """

    def __init__(
        self, alpha: float = 0.5, temperature: float = 1.0, teacher_output: str = "log_probs"
    ) -> None:
        """`alpha` in [0, 1] weights the KD term; `temperature` T > 0 (finite) softens both
        sides (the teacher's rows must be at the same T). Raises `ValueError` otherwise."""
        super().__init__(alpha, temperature, teacher_output)

    def divergence(self, teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
        return _kl_rows(teacher_log_probs, student_log_probs)


class TokenReverseKLLoss(_TokenDivergenceLoss):
    """Reverse KL, KL(p_student || p_teacher), at every real token (mode-seeking).

    Yuxian Gu, Li Dong, Furu Wei, Minlie Huang (2024), "MiniLLM: Knowledge Distillation of Large
    Language Models", ICLR, arXiv:2306.08543; Rishabh Agarwal et al. (2024), "On-Policy
    Distillation of Language Models: Learning from Self-Generated Mistakes" (GKD), ICLR,
    arXiv:2306.13649.

    The estimator. The teacher's `scored_values` are its log-probabilities at T at m ids the
    student chose, `scored_ids` = `student_top_ids(student_logits, m)` (distinct, detached). With
    S those ids, R the rest of the vocabulary, q the student's and p the teacher's distributions
    at T:

        divergence_r = sum_{i in S} q_i (log q_i - log p_i) + q_R (log q_R - log p_R)
        q_R = sum_{j in R} q_j   (logsumexp of the student's other logits, exact)
        p_R = max(1 - sum_{i in S} exp(scored_values_i), tail_floor)

    the exact reverse KL between the two (m + 1)-bucket distributions, no sampling. The full
    reverse KL is this plus q_R * KL(q(. | R) || p(. | R)): the ids the student ranks highest
    carry most of its mass, so the bound is tight where the reverse KL looks (the student's
    mass). The gradient is that of this fixed partition (the ids are constants). `tail_floor`
    keeps p_R > 0 when rounding of the values (float16 most of all) leaves 1 - sum <= 0 while
    the student still has mass in R; a teacher log-probability of -inf at a scored id the
    student likes makes the loss infinite, as the reverse KL is. Dense teacher rows also work
    (no tail). Ids sampled from the student with repeats are not this estimator: send distinct
    ids. `teacher_output` defaults to "log_probs" (what `scored_values` are).
    """

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 1.0,
        teacher_output: str = "log_probs",
        tail_floor: float = 1e-6,
    ) -> None:
        """`alpha`, `temperature`, `teacher_output` as in `TokenForwardKLLoss`; `tail_floor` in
        (0, 1): the least teacher tail probability. Raises `ValueError` otherwise."""
        super().__init__(alpha, temperature, teacher_output)
        if not (isinstance(tail_floor, (int, float)) and 0.0 < tail_floor < 1.0):
            raise ValueError(f"tail_floor: must be a number in (0, 1), got {tail_floor!r}")
        self.tail_floor = float(tail_floor)

    def divergence(self, teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
        return _kl_rows(student_log_probs, teacher_log_probs)


class TokenJSDLoss(_TokenDivergenceLoss):
    """Generalised Jensen-Shannon divergence JSD(beta) at every real token.

    Rishabh Agarwal, Nino Vieillard, Yongchao Zhou, Piotr Stanczyk, Sabela Ramos, Matthieu Geist,
    Olivier Bachem (2024), "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD), ICLR, arXiv:2306.13649, section 3.

    With p the teacher's and q the student's distributions at T over the same buckets (dense, or
    the ids plus the tail as in `TokenReverseKLLoss`) and M = beta p + (1 - beta) q:

        divergence_r = beta KL(p || M) + (1 - beta) KL(q || M)

    It is bounded (by -beta log beta - (1 - beta) log(1 - beta)), so no tail floor is needed.
    Near the ends it interpolates the two KLs, shrinking with the weight: JSD(beta) / beta ->
    KL(p || q) (forward) as beta -> 0 and JSD(beta) / (1 - beta) -> KL(q || p) (reverse) as
    beta -> 1. beta = 0.5 is the symmetric Jensen-Shannon divergence.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 1.0,
        teacher_output: str = "log_probs",
        beta: float = 0.5,
    ) -> None:
        """`alpha`, `temperature`, `teacher_output` as in `TokenForwardKLLoss`; `beta` in (0, 1).
        Raises `ValueError` otherwise."""
        super().__init__(alpha, temperature, teacher_output)
        if not (isinstance(beta, (int, float)) and 0.0 < beta < 1.0):
            raise ValueError(f"beta: must be a number in (0, 1), got {beta!r}")
        self.beta = float(beta)

    def divergence(self, teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
        beta = self.beta
        # A bucket empty on both sides (the tail when the ids cover V) is skipped by both KLs;
        # 0 stands in for its -inf so that logsumexp's gradient there is not NaN.
        empty = torch.isneginf(teacher_log_probs) & torch.isneginf(student_log_probs)
        log_mixture = torch.logsumexp(
            torch.stack(
                [
                    teacher_log_probs.masked_fill(empty, 0.0) + math.log(beta),
                    student_log_probs.masked_fill(empty, 0.0) + math.log1p(-beta),
                ]
            ),
            dim=0,
        )  # (tokens, buckets)
        return beta * _kl_rows(teacher_log_probs, log_mixture) + (1.0 - beta) * _kl_rows(
            student_log_probs, log_mixture
        )
