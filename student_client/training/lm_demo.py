"""The language-model quickstart: a sequence teacher comes up, a tiny LM student distils from its
top-k next-token distributions, and a table says how it compares with the same student trained
on the text alone.

Run by `student-client demo-lm`. Everything is real: the default sequence teacher
(`pydoc-causal-lm`, a causal transformer on the Python docs) is trained on first use into the
repository by `teacher-server train-default-sequence` (a subprocess: this package imports nothing
of the server), then served by a separate `teacher-server serve` process over loopback gRPC; the
student reads the teacher's split of the same documents, cut with the teacher's tokenizer
(`training.text_data`), and the distilled student gets the teacher's top-k log-probabilities per
token through `TokenTargetLoader` (tokenizer handshake included).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from student_client.online.client import TeacherClient
from student_client.online.token_loader import TokenTargetLoader
from student_client.teacher_process import TeacherProcess
from student_client.training.lm_models import TinyCausalLM
from student_client.training.models import parameter_count
from student_client.training.sequence_losses import (
    TokenForwardKLLoss,
    TokenReverseKLLoss,
    real_token_logits,
)
from student_client.training.text_data import (
    DEFAULT_SEQUENCE_MODEL_NAME,
    LM_TASK,
    TextSplit,
    Windows,
    pydoc_text_split,
    shuffled_windows,
)
from student_client.types import SoftTargets, TargetOptions, TokenBatch

# One training step's inputs: the batch, its packed next-token targets (tokens,), and the
# teacher's answer for it (None for the hard-label student).
LMBatch = tuple[TokenBatch, np.ndarray, SoftTargets | None]


@dataclass(frozen=True)
class LMDemoSettings:
    """The defaults are the quickstart's settings (docs/results.md)."""

    epochs: int = 4
    seed: int = 0
    temperature: float = 0.5
    top_k: int = 32
    alpha: float = 0.5
    dim: int = 64
    layers: int = 1
    attention_heads: int = 4
    dropout: float = 0.1
    batch_size: int = 16
    lr: float = 3e-3
    max_train_windows: int | None = None  # None: every training window
    depth: int = 8  # batches in flight on the stream
    repository: Path = Path("model_repository")
    model: str = DEFAULT_SEQUENCE_MODEL_NAME
    small_teacher: bool = False  # train the teacher's tiny recipe if it is missing (tests)
    teacher: str | None = None  # an already running teacher's gRPC address; None: start one
    wait_seconds: float = 300.0
    token: str | None = None
    out: Path = Path("runs/quickstart-lm")
    progress: bool = True


@dataclass(frozen=True)
class LMEpochRecord:
    epoch: int
    loss: float  # mean training loss over the epoch's batches
    seconds: float  # wall time of the epoch's training (not evaluation)
    tokens_per_second: float  # real tokens trained on per second
    perplexity: float  # held-out, per real token, after the epoch


@dataclass
class LMDemoResult:
    settings: dict[str, object]
    data: dict[str, object]
    teacher: dict[str, object]
    student_parameters: int = 0
    hard: list[LMEpochRecord] = field(default_factory=list)  # per epoch
    distilled: list[LMEpochRecord] = field(default_factory=list)
    loader_batches: list[dict[str, int]] = field(default_factory=list)  # per distilled epoch
    seconds: dict[str, float] = field(default_factory=dict)


def targets_label(top_k: int) -> str:
    """`top-32`, or `dense rows` for top_k 0."""
    return f"top-{top_k}" if top_k else "dense rows"


def say(message: str = "") -> None:
    print(message, flush=True)


def ensure_sequence_teacher(folder: Path, small: bool) -> None:
    """Train the default sequence teacher into `folder` unless it holds a `config.json`: through
    `teacher-server train-default-sequence` in a subprocess, into a hidden sibling folder renamed
    into place when complete (an interrupted run leaves no half model). The hidden folder keeps
    the model's name: the teacher names the model after the folder it trains into."""
    if (folder / "config.json").is_file():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".training-", dir=folder.parent) as scratch:
        partial = Path(scratch) / folder.name
        command = [sys.executable, "-m", "teacher_server.cli", "train-default-sequence"]
        command += ["--out", str(partial), *(["--small"] if small else [])]
        subprocess.run(command, check=True)
        partial.rename(folder)


@torch.inference_mode()
def perplexity(model: nn.Module, windows: Windows, batch_size: int = 64) -> float:
    """exp(mean next-token cross entropy) over every real target of `windows` (padding
    excluded; a window's first target sees only `<bos>`), as the teacher's held-out figure."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(windows), batch_size):
        batch, targets = windows.batch(np.arange(start, min(start + batch_size, len(windows))))
        logits = model(torch.from_numpy(batch.ids))  # (batch, L, vocab)
        rows = real_token_logits(logits, torch.from_numpy(batch.lengths))  # (tokens, vocab)
        total += float(F.cross_entropy(rows, torch.from_numpy(targets), reduction="sum"))
    model.train(was_training)
    return math.exp(total / windows.predicted_tokens)


def teacher_perplexity(
    client: TeacherClient, windows: Windows, model: str, tokenizer_file: Path
) -> float:
    """The remote teacher's held-out perplexity, measured over the network: each real token's
    true next id is sent as its scored id, so the answer holds log p_teacher(next id) at T = 1."""
    batches = []
    for start in range(0, len(windows), 32):
        batch, targets = windows.batch(np.arange(start, min(start + 32, len(windows))))
        batches.append(TokenBatch(batch.ids, batch.lengths, scored_ids=targets[:, None]))
    options = TargetOptions(
        model=model,
        tasks=(LM_TASK,),
        temperature=1.0,
        output="log_probs",
        top_k=1,
        output_dtype="float32",
    )
    total = 0.0
    for _, _, answer in TokenTargetLoader(batches, client, options, tokenizer_file=tokenizer_file):
        scored = answer.outputs[LM_TASK].scored_values
        assert scored is not None
        total -= float(np.sum(scored, dtype=np.float64))
    return math.exp(total / windows.predicted_tokens)


def fit_lm(
    model: nn.Module,
    epoch_batches: Callable[[int], Iterable[LMBatch]],
    loss_fn: Callable[[torch.Tensor, TokenBatch, np.ndarray, SoftTargets | None], torch.Tensor],
    epochs: int,
    held_out: Windows,
    lr: float,
    description: str,
    progress: bool,
    evaluate_every: int = 1,
) -> list[LMEpochRecord]:
    """Train with AdamW (gradients clipped at 1); one record per epoch. A progress bar only on a
    terminal (in a log every refresh would be written out), a line per epoch otherwise.
    Held-out perplexity after every `evaluate_every`-th epoch and the last (NaN in the others)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        losses, tokens = [], 0
        start = time.perf_counter()
        bar = tqdm(
            epoch_batches(epoch),
            desc=f"{description} epoch {epoch}/{epochs}",
            unit="batch",
            leave=False,
            disable=not progress or not sys.stderr.isatty(),
            dynamic_ncols=True,
        )
        for batch, targets, answer in bar:
            logits = model(torch.from_numpy(batch.ids))  # (batch, L, vocab)
            loss = loss_fn(logits, batch, targets, answer)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            tokens += batch.tokens
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        seconds = time.perf_counter() - start
        record = LMEpochRecord(
            epoch,
            float(np.mean(losses)),
            seconds,
            tokens / max(seconds, 1e-9),
            perplexity(model, held_out)
            if epoch % evaluate_every == 0 or epoch == epochs
            else float("nan"),
        )
        history.append(record)
        if progress:
            tqdm.write(
                f"{description} epoch {epoch}/{epochs}: loss {record.loss:.3f}, "
                f"{record.tokens_per_second:.0f} tokens/s, {seconds:.0f}s, "
                f"held-out perplexity {record.perplexity:.2f}",
                file=sys.stdout,
            )
    return history


def hard_label_loss(
    logits: torch.Tensor, batch: TokenBatch, targets: np.ndarray, _: SoftTargets | None
) -> torch.Tensor:
    """Next-token cross entropy over real tokens."""
    rows = real_token_logits(logits, torch.from_numpy(batch.lengths))  # (tokens, vocab)
    return F.cross_entropy(rows, torch.from_numpy(targets))


def top_k_distillation_loss(
    kd: TokenForwardKLLoss,
) -> Callable[[torch.Tensor, TokenBatch, np.ndarray, SoftTargets | None], torch.Tensor]:
    """`kd` on the teacher's top-k log-probabilities and tail mass (or its dense rows, when the
    answer has no indices), mixed with the CE by alpha."""

    def loss(
        logits: torch.Tensor, batch: TokenBatch, targets: np.ndarray, answer: SoftTargets | None
    ) -> torch.Tensor:
        if answer is None:
            raise ValueError("distillation needs the teacher's answer beside each batch")
        rows = answer.outputs[LM_TASK]
        sparse = rows.indices is not None
        if sparse and rows.tail_mass is None:
            raise ValueError("top-k distillation needs the teacher's tail mass (probs/log_probs)")
        return kd(
            logits,
            answer.tensor(LM_TASK),  # (tokens, k or V) log-probabilities at T
            torch.from_numpy(np.array(rows.indices)) if sparse else None,  # (tokens, k), a copy
            torch.from_numpy(np.array(rows.tail_mass, dtype=np.float32)) if sparse else None,
            lengths=torch.from_numpy(batch.lengths),
            labels=torch.from_numpy(targets),
        )

    return loss


def scored_distillation_loss(
    kd: TokenReverseKLLoss,
) -> Callable[[torch.Tensor, TokenBatch, np.ndarray, SoftTargets | None], torch.Tensor]:
    """`kd` (reverse KL) on the teacher's log-probabilities at the ids the student chose
    (`TokenBatch.scored_ids`, answered as `scored_values`), mixed with the CE by alpha."""

    def loss(
        logits: torch.Tensor, batch: TokenBatch, targets: np.ndarray, answer: SoftTargets | None
    ) -> torch.Tensor:
        if answer is None or batch.scored_ids is None:
            raise ValueError("reverse KL needs the student's scored ids and the teacher's answer")
        scored = answer.outputs[LM_TASK].scored_values
        if scored is None:
            raise ValueError("reverse KL: the teacher's answer has no scored_values")
        return kd(
            logits,
            torch.from_numpy(np.array(scored, dtype=np.float32)),  # (tokens, m), a copy
            torch.from_numpy(np.asarray(batch.scored_ids, dtype=np.int64)),  # (tokens, m)
            lengths=torch.from_numpy(batch.lengths),
            labels=torch.from_numpy(targets),
        )

    return loss


def lm_student(
    split: TextSplit, dim: int, layers: int, attention_heads: int, dropout: float, seed: int
) -> TinyCausalLM:
    """The LM student for `split`'s windows, initialised from `seed`."""
    torch.manual_seed(seed)
    return TinyCausalLM(
        split.vocab_size, int(split.train.ids.shape[1] - 1), dim, layers, attention_heads, dropout
    )


def train_students(
    client: TeacherClient,
    split: TextSplit,
    tokenizer_file: Path,
    settings: LMDemoSettings,
    result: LMDemoResult,
    student_threads: tuple[int, int],
) -> None:
    """The same student (same seed, same batches in the same order) on hard labels, then
    distilled; `student_threads`: torch threads for each (the teacher is idle in the first)."""

    def student() -> TinyCausalLM:
        return lm_student(
            split,
            settings.dim,
            settings.layers,
            settings.attention_heads,
            settings.dropout,
            settings.seed,
        )

    def epoch_rows(epoch: int) -> Iterable[np.ndarray]:
        return shuffled_windows(len(split.train), settings.batch_size, settings.seed * 1000 + epoch)

    def hard_batches(epoch: int) -> Iterable[LMBatch]:
        for rows in epoch_rows(epoch):
            yield (*split.train.batch(rows), None)

    options = TargetOptions(
        model=settings.model,
        tasks=(LM_TASK,),
        temperature=settings.temperature,
        output="log_probs",
        top_k=settings.top_k,
    )

    def distilled_batches(epoch: int) -> Iterable[LMBatch]:
        loader = TokenTargetLoader(
            [split.train.batch(rows) for rows in epoch_rows(epoch)],
            client,
            options,
            tokenizer_file=tokenizer_file,
            depth=settings.depth,
        )
        yield from ((batch, targets, answer) for batch, targets, answer in loader)
        result.loader_batches.append(asdict(loader.stats))

    hard_student, distilled_student = student(), student()
    result.student_parameters = parameter_count(hard_student)
    say(f"\nStudent on hard next-token labels ({result.student_parameters:,} parameters)")
    torch.set_num_threads(student_threads[0])
    started = time.perf_counter()
    hard = fit_lm(
        hard_student,
        hard_batches,
        hard_label_loss,
        settings.epochs,
        split.held_out,
        settings.lr,
        "hard labels",
        settings.progress,
    )
    result.seconds["hard_student"] = round(time.perf_counter() - started, 1)
    say(
        f"The same student distilled from the remote teacher's {targets_label(settings.top_k)} "
        f"(T={settings.temperature:g}, alpha={settings.alpha:g}, forward KL + CE, over gRPC)"
    )
    torch.set_num_threads(student_threads[1])
    started = time.perf_counter()
    kd = TokenForwardKLLoss(settings.alpha, settings.temperature, teacher_output="log_probs")
    distilled = fit_lm(
        distilled_student,
        distilled_batches,
        top_k_distillation_loss(kd),
        settings.epochs,
        split.held_out,
        settings.lr,
        "distilled",
        settings.progress,
    )
    result.seconds["distilled_student"] = round(time.perf_counter() - started, 1)
    result.hard, result.distilled = hard, distilled
    expected = -(-len(split.train) // settings.batch_size)
    for stats in result.loader_batches:
        if not (stats["sent"] == stats["received"] == stats["yielded"] == expected):
            raise RuntimeError(
                f"loader lost or repeated a batch: {stats}, expected {expected} each"
            )


def summary_table(result: LMDemoResult) -> str:
    """Teacher, hard-label student, distilled student: parameters and held-out perplexity."""
    header = ["model", "parameters", "held-out perplexity"]
    rows = [
        [
            "teacher (remote causal LM)",
            f"{result.teacher['parameters']:,}",
            f"{result.teacher['perplexity']:.2f}",
        ]
    ]
    for label, history in (
        ("student, hard labels", result.hard),
        ("student, distilled", result.distilled),
    ):
        rows.append([label, f"{result.student_parameters:,}", f"{history[-1].perplexity:.2f}"])
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in table
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(result: LMDemoResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, history, color in (
        ("hard labels", result.hard, "tab:orange"),
        ("distilled", result.distilled, "tab:blue"),
    ):
        axis.plot(
            [record.epoch for record in history],
            [record.perplexity for record in history],
            marker="o",
            label=f"student, {label}",
            color=color,
        )
    axis.axhline(float(result.teacher["perplexity"]), color="gray", linestyle="--", label="teacher")  # type: ignore[arg-type]
    axis.set_xlabel("epoch")
    axis.set_ylabel("held-out perplexity per token")
    axis.set_yscale("log")
    settings = result.settings
    axis.set_title(
        f"Python docs LM: the same student, hard labels vs distilled "
        f"({targets_label(int(settings['top_k']))}, T={settings['temperature']}, "  # type: ignore[call-overload]
        f"alpha={settings['alpha']})"
    )
    axis.legend()
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_lm_demo(settings: LMDemoSettings) -> LMDemoResult:
    started = time.perf_counter()
    settings.out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 2
    config_file: Path | None = None
    with contextlib.ExitStack() as stack:
        if settings.teacher is None:
            folder = settings.repository / settings.model
            if not (folder / "config.json").is_file():
                say(
                    f"Training the default sequence teacher into {folder} (first use only; "
                    f"about 4 min on 2 cores{', seconds with the small recipe' * settings.small_teacher})..."
                )
            ensure_sequence_teacher(folder, settings.small_teacher)
            config_file = folder / "config.json"
            say(f"Starting the teacher server (repository {settings.repository})...")
            # As `student-client demo`: a CPU teacher runs one forward worker per core and the
            # distilled student keeps half of the cores (docs/performance.md); no training by
            # the server itself (the teacher above is the one served).
            teacher = stack.enter_context(
                TeacherProcess(
                    settings.repository,
                    [
                        "--forward-workers",
                        str(cores),
                        "--train-default-if-missing",
                        "false",
                        "--default-sequence-teacher",
                        "false",
                    ],
                )
            )
            address = teacher.grpc_address
            say(f"Teacher up: gRPC {address}, HTTP {teacher.http_url}")
        else:
            address = settings.teacher
            say(f"Using the teacher at {address} (gRPC)")
        client = stack.enter_context(TeacherClient(address, token=settings.token))
        info = client.wait_ready(settings.wait_seconds, settings.model)
        say(
            f"  model {info.name} {info.model_version[:19]}..., {info.parameter_count:,} parameters, "
            f"vocabulary {info.vocab_size:,}, windows of up to {info.max_length} tokens"
        )
        # The teacher's own tokenizer file (checked against its SHA-256 by the client).
        tokenizer_file = settings.out / "tokenizer.json"
        tokenizer_file.write_bytes(client.tokenizer(settings.model).content)
        split = pydoc_text_split(tokenizer_file, info.max_length, config_file)
        if settings.max_train_windows is not None:
            train = split.train
            count = settings.max_train_windows
            split = TextSplit(
                Windows(train.ids[:count], train.lengths[:count]),
                split.held_out,
                split.train_documents,
                split.held_out_documents,
                split.vocab_size,
            )
        say(
            f"Data: pydoc_data topics, {split.train_documents} training documents "
            f"({len(split.train)} windows, {split.train.predicted_tokens:,} next-token targets) / "
            f"{split.held_out_documents} held out ({split.held_out.predicted_tokens:,} targets)"
        )
        measured = time.perf_counter()
        torch.set_num_threads(max(1, cores // 2))
        result = LMDemoResult(
            settings={k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
            data={
                "train_documents": split.train_documents,
                "held_out_documents": split.held_out_documents,
                "train_windows": len(split.train),
                "train_tokens": split.train.predicted_tokens,
                "held_out_tokens": split.held_out.predicted_tokens,
            },
            teacher={
                "model": info.name,
                "model_version": info.model_version,
                "parameters": info.parameter_count,
                "perplexity": teacher_perplexity(
                    client, split.held_out, settings.model, tokenizer_file
                ),
                "stored_held_out_metrics": dict(info.held_out_metrics),
            },
        )
        result.seconds["teacher_perplexity"] = round(time.perf_counter() - measured, 1)
        say(
            f"  teacher held-out perplexity (measured over gRPC): {result.teacher['perplexity']:.2f}"
        )
        # The teacher is idle while the hard-label student trains: that one gets every core.
        train_students(client, split, tokenizer_file, settings, result, (cores, max(1, cores // 2)))
    result.seconds["total"] = round(time.perf_counter() - started, 1)
    plot_path = settings.out / "perplexity.png"
    plot(result, plot_path)
    (settings.out / "result.json").write_text(json.dumps(asdict(result), indent=2))
    say(
        f"\nHeld-out perplexity after {settings.epochs} epoch(s) (seed {settings.seed}; student "
        f"dim {settings.dim}, {settings.layers} layer(s); {targets_label(settings.top_k)}, "
        f"T={settings.temperature:g}, alpha={settings.alpha:g}):\n"
    )
    say(summary_table(result))
    say(f"\nPlot of both students' perplexity per epoch: {plot_path.resolve()}")
    say(f"Full results: {(settings.out / 'result.json').resolve()}")
    say(f"Done in {result.seconds['total']:.0f}s.")
    return result
