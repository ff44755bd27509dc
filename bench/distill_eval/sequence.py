"""The sequence rows of the distillation evaluation: LM students from the served sequence teacher.

    python -m bench.distill_eval --sequence [--seeds 3] [--epochs 8] [--json out.json]
    python -m bench.distill_eval --sequence --sweep [--epochs 4]     # T and student size, seed 0
    python -m bench.distill_eval --sequence --quick                  # CI: small teacher, seconds
    python -m bench.distill_eval --sequence --sweep-kd --epochs 8 --rows hard,top32,dense
        --sweep-temperatures 1,0.5,0.75 --sweep-alphas 0.5,1      # T, then alpha, one seed
    python -m bench.distill_eval --sequence --seeds 3 --first-seed 1 --epochs 12
        --temperature 0.5 --rows hard,top32,dense --no-offline    # chosen settings, fresh seeds
    python -m bench.distill_eval --sequence --from-json out.json --temperature 0.5 --at-epoch 8

The teacher is the default sequence teacher (`pydoc-causal-lm` in `--repository`, trained there
first if missing), served by a real teacher server process on loopback gRPC (`--torch-threads 1`).
The data and the student are the LM quickstart's (`student-client demo-lm`): the teacher's split
of the Python docs by document, windows of its tokenizer's ids, `TinyCausalLM` (AdamW lr 3e-3,
batch 16 windows, the quickstart's seeded order per seed and epoch, the same initialisation per
seed), trained here on one torch thread; the score is held-out perplexity per real token.

Targets (`RunConfig.targets`):

- `hard`: next-token cross entropy only;
- `forward`: `TokenForwardKLLoss` (alpha = 0.5 with the CE) on the teacher's top-k log-probs and
  tail mass (k = 0: the dense rows over the whole vocabulary) at T. The teacher's answers for the
  whole training text are fetched once per (T, k) through `TokenTargetLoader` (tokenizer
  handshake, version pinned, each batch once) and kept in memory, float16 as sent (the teacher is
  deterministic, so an epoch's answers are the same whether fetched once or per epoch; the
  `online` source, `TokenTargetLoader` every epoch as the quickstart does, checks that);
- `reverse`: `TokenReverseKLLoss` (MiniLLM / GKD, alpha = 0.5) on the teacher's log-probs at the
  student's own top-m ids: every batch goes through `TokenTargetLoader` with `scored_ids` from
  the student as it is at that step (`depth=1`, strictly on-policy).

Full mode: hard, forward at k in {8, 32, 128} and dense, reverse at m = 32, over `--seeds`
seeds; then the offline check: the training text's top-32 targets exported by the real
`student-client export --tokens` command, the teacher process stopped, and the seed-0 student
trained from the export with `OfflineTokenTargetLoader`: its perplexity against the online run's
with no teacher running. Each run's record goes to `--json` as soon as it finishes (a rerun
with the same `--json` keeps the runs it holds). `--sweep`: one seed and a shorter schedule over
T in {1, 2, 4} (top-32) and the student's width (hard vs top-32 at T = 1), to choose the
recommended T and size; k is compared by the full mode's rows, 3 seeds. `--sweep-kd`: one seed,
the `--rows` at each of `--sweep-temperatures` (alpha fixed at `--alpha`), then at each of
`--sweep-alphas` (T fixed at `--temperature`); the teacher's top-k share of probability on the
training tokens is recorded per (T, k) (`teacher_top_mass`). `--rows`, `--alpha`, `--first-seed`
and `--no-offline` narrow the full mode (seeds first..first+seeds-1). `--from-json` reports a
saved run; with `--at-epoch` it scores every run after that epoch (the learning rate is constant,
so that is the shorter schedule's row), and the checks (unpaired 2 std, paired per seed, top-32
vs dense) are taken at `--temperature` and `--alpha`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import machine_summary, teacher_process, write_json
from bench.distill_eval.data import say, torch_threads
from student_client.offline.token_reader import OfflineTokenTargetLoader
from student_client.online.client import TeacherClient
from student_client.online.token_loader import TokenTargetLoader
from student_client.training.lm_demo import (
    LMBatch,
    fit_lm,
    hard_label_loss,
    lm_student,
    scored_distillation_loss,
    teacher_perplexity,
    top_k_distillation_loss,
)
from student_client.training.models import parameter_count
from student_client.training.sequence_losses import (
    TokenForwardKLLoss,
    TokenReverseKLLoss,
    student_top_ids,
)
from student_client.training.text_data import (
    DEFAULT_SEQUENCE_MODEL_NAME,
    LM_TASK,
    TextSplit,
    Windows,
    pydoc_text_split,
    shuffled_windows,
)
from student_client.types import SoftTargets, TargetOptions, TaskTargets, TokenBatch

BATCH_SIZE = 16  # windows per training step, as the quickstart
LR = 3e-3
ALPHA = 0.5
FETCH_BATCH = 16  # windows per request when fetching a whole setting's targets
SERVE_ARGS = ("--torch-threads", "1", "--device", "cpu", "--train-default-if-missing", "false")
FULL_TOP_K = (32, 0, 8, 128)  # 0: dense; the two the checks need first
SWEEP_TEMPERATURES = (1.0, 2.0, 4.0)
SWEEP_DIMS = (32, 64, 128)
OFFLINE_TOP_K = 32
QUICK_WINDOWS = 48  # --quick: the first training windows only


@dataclass(frozen=True)
class RunConfig:
    """One student: `targets` hard / forward / reverse; `top_k`: the teacher's top-k for forward
    (0: dense), the student's scored ids m for reverse; `source` (forward): `memory` (fetched
    once), `online` (TokenTargetLoader every epoch) or `offline` (an export, no teacher)."""

    targets: str
    top_k: int = 32
    temperature: float = 1.0
    alpha: float = ALPHA
    dim: int = 64
    layers: int = 1
    epochs: int = 8
    source: str = "memory"

    @property
    def key(self) -> str:
        if self.targets == "hard":
            name = "hard"
        elif self.targets == "forward":
            support = "dense" if self.top_k == 0 else f"top{self.top_k}"
            name = f"fwd-{support}/T{self.temperature:g}"
        else:
            name = f"rev-m{self.top_k}/T{self.temperature:g}"
        if self.targets != "hard" and self.alpha != ALPHA:
            name += f"/a{self.alpha:g}"
        suffix = "" if self.source == "memory" else f"/{self.source}"
        return f"d{self.dim}/{name}{suffix}"


class TargetStore:
    """A forward setting's answers for every training window, in window order (token rows)."""

    def __init__(self, windows: Windows, answers: list[SoftTargets], fetch_s: float) -> None:
        rows = [a.outputs[LM_TASK] for a in answers]
        self.values = np.concatenate([r.values for r in rows])  # (tokens, k or V) float16
        first = rows[0]
        self.indices = (
            None if first.indices is None else np.concatenate([r.indices for r in rows])  # type: ignore[misc]
        )
        self.tail = (
            None if first.tail_mass is None else np.concatenate([r.tail_mass for r in rows])  # type: ignore[misc]
        )
        self.model, self.version, self.temperature = (
            answers[0].model,
            answers[0].model_version,
            answers[0].temperature,
        )
        predicted = windows.lengths - 1
        if len(self.values) != int(predicted.sum()):
            raise RuntimeError(f"fetched {len(self.values)} token rows, expected {predicted.sum()}")
        self.starts = np.concatenate([[0], np.cumsum(predicted)[:-1]])
        self.predicted = predicted
        self.fetch_s = fetch_s

    def top_mass(self) -> dict[str, float] | None:
        """How much of the teacher's probability (at the store's T) the top-k rows hold per
        training token: mean, quartiles, share of tokens under 0.9; None for dense rows."""
        if self.tail is None:
            return None
        mass = 1.0 - self.tail.astype(np.float64)  # (tokens,)
        low, median, high = np.quantile(mass, [0.25, 0.5, 0.75])
        return {
            "mean": float(mass.mean()),
            "p25": float(low),
            "median": float(median),
            "p75": float(high),
            "share_below_0.9": float((mass < 0.9).mean()),
        }

    def answer(self, rows: np.ndarray) -> SoftTargets:
        """The answer the teacher gave for windows `rows`, assembled in that order."""
        where = np.concatenate(
            [
                np.arange(s, s + n)
                for s, n in zip(self.starts[rows], self.predicted[rows], strict=True)
            ]
        )
        task = TaskTargets(
            LM_TASK,
            "log_probs",
            self.values[where],
            None if self.indices is None else self.indices[where],
            None if self.tail is None else self.tail[where],
            level="token",
        )
        return SoftTargets(
            self.model,
            self.version,
            "",
            self.temperature,
            {LM_TASK: task},
            lengths=self.predicted[rows],
        )


def options_for(model: str, config: RunConfig) -> TargetOptions:
    return TargetOptions(
        model=model,
        tasks=(LM_TASK,),
        temperature=config.temperature,
        output="log_probs",
        top_k=1 if config.targets == "reverse" else config.top_k,
        output_dtype="float16",
    )


def fetch_store(
    client: TeacherClient, split: TextSplit, tokenizer: Path, model: str, config: RunConfig
) -> TargetStore:
    started = time.perf_counter()
    order = np.arange(len(split.train))
    batches = [
        split.train.batch(order[s : s + FETCH_BATCH]) for s in range(0, len(order), FETCH_BATCH)
    ]
    loader = TokenTargetLoader(
        batches, client, options_for(model, config), tokenizer_file=tokenizer, depth=4
    )
    answers = [answer for _, _, answer in loader]
    stats = loader.stats
    if not (stats.sent == stats.received == stats.yielded == len(batches)):
        raise RuntimeError(f"loader lost or repeated a batch: {stats}, expected {len(batches)}")
    return TargetStore(split.train, answers, time.perf_counter() - started)


def train_run(
    config: RunConfig,
    seed: int,
    split: TextSplit,
    *,
    store: TargetStore | None = None,
    client: TeacherClient | None = None,
    model: str = DEFAULT_SEQUENCE_MODEL_NAME,
    tokenizer: Path | None = None,
    export: Path | None = None,
) -> dict[str, Any]:
    """Train one student; its record (per-epoch held-out perplexity, loss, seconds, loader counts)."""
    student = lm_student(split, config.dim, config.layers, 4, 0.1, seed)
    loader_stats: list[dict[str, int]] = []
    expected = -(-len(split.train) // BATCH_SIZE)

    def epoch_rows(epoch: int) -> list[np.ndarray]:
        return list(shuffled_windows(len(split.train), BATCH_SIZE, seed * 1000 + epoch))

    def hard_batches(epoch: int) -> Iterator[LMBatch]:
        for rows in epoch_rows(epoch):
            yield (*split.train.batch(rows), None)

    def memory_batches(epoch: int) -> Iterator[LMBatch]:
        assert store is not None
        for rows in epoch_rows(epoch):
            yield (*split.train.batch(rows), store.answer(rows))

    def choose(batch: TokenBatch) -> np.ndarray:
        was_training = student.training
        student.eval()
        ids = student_top_ids(
            student(torch.from_numpy(batch.ids)), config.top_k, torch.from_numpy(batch.lengths)
        )
        student.train(was_training)
        return ids.numpy()

    def loader_batches(epoch: int) -> Iterator[LMBatch]:
        batches = [split.train.batch(rows) for rows in epoch_rows(epoch)]
        loader: Iterable[tuple[TokenBatch, Any, SoftTargets]]
        if config.source == "offline":
            assert export is not None
            loader = OfflineTokenTargetLoader(batches, export)
        else:
            assert client is not None and tokenizer is not None
            reverse = config.targets == "reverse"
            loader = TokenTargetLoader(
                batches,
                client,
                options_for(model, config),
                tokenizer_file=tokenizer,
                scored_ids=choose if reverse else None,
                depth=1 if reverse else 8,
            )
        yield from loader
        stats = asdict(loader.stats)  # type: ignore[attr-defined]
        loader_stats.append(stats)
        if stats["yielded"] != expected:
            raise RuntimeError(f"loader yielded {stats['yielded']} batches, expected {expected}")

    loss: Callable[[torch.Tensor, TokenBatch, np.ndarray, SoftTargets | None], torch.Tensor]
    if config.targets == "hard":
        batches, loss = hard_batches, hard_label_loss
    elif config.targets == "forward":
        kd = TokenForwardKLLoss(config.alpha, config.temperature, teacher_output="log_probs")
        batches = memory_batches if config.source == "memory" else loader_batches
        loss = top_k_distillation_loss(kd)
    else:
        batches = loader_batches
        loss = scored_distillation_loss(TokenReverseKLLoss(config.alpha, config.temperature))
    started = time.perf_counter()
    history = fit_lm(
        student, batches, loss, config.epochs, split.held_out, LR, config.key, False,
        evaluate_every=max(1, min(4, config.epochs // 2)),
    )  # fmt: skip
    return {
        "config": asdict(config),
        "seed": seed,
        "parameters": parameter_count(student),
        "perplexity": history[-1].perplexity,
        "perplexity_per_epoch": [
            r.perplexity if math.isfinite(r.perplexity) else None for r in history
        ],
        "loss_per_epoch": [r.loss for r in history],
        "train_seconds": [round(r.seconds, 2) for r in history],
        "seconds": round(time.perf_counter() - started, 1),
        "loader": loader_stats,
        "fetch_seconds": None if store is None else round(store.fetch_s, 1),
    }


ROWS = ("hard", "top32", "dense", "top8", "top128", "reverse")  # the full plan's order


def row_config(row: str, base: RunConfig) -> RunConfig:
    """`row` (one of ROWS) at `base`'s epochs, T, alpha and width."""
    if row == "hard":
        return replace(base, targets="hard")
    if row == "reverse":
        return replace(base, targets="reverse", top_k=32)
    if row == "dense":
        return replace(base, targets="forward", top_k=0)
    if row.startswith("top") and row[3:].isdigit():
        return replace(base, targets="forward", top_k=int(row[3:]))
    raise ValueError(f"--rows: expected names from {', '.join(ROWS)}, got {row!r}")


def full_plan(
    seeds: Sequence[int],
    epochs: int,
    temperature: float,
    dim: int,
    alpha: float = ALPHA,
    rows: Sequence[str] = ROWS,
) -> list[RunConfig]:
    base = RunConfig("hard", epochs=epochs, temperature=temperature, dim=dim, alpha=alpha)
    return [row_config(row, base) for row in rows]


def kd_sweep_plan(
    epochs: int,
    temperature: float,
    alpha: float,
    dim: int,
    temperatures: Sequence[float],
    alphas: Sequence[float],
    rows: Sequence[str],
) -> list[RunConfig]:
    """One factor at a time around (T, alpha): hard once, then each forward row of `rows` at
    every T of `temperatures` (alpha fixed), then at every alpha of `alphas` (T fixed)."""
    base = RunConfig("hard", epochs=epochs, temperature=temperature, dim=dim, alpha=alpha)
    plan = [base] if "hard" in rows else []
    forward = [row for row in rows if row not in ("hard", "reverse")]
    points = [(t, alpha) for t in temperatures] + [(temperature, a) for a in alphas]
    for t, a in dict.fromkeys(points):  # in order, each point once
        plan += [row_config(row, replace(base, temperature=t, alpha=a)) for row in forward]
    return plan


def sweep_plan(epochs: int) -> list[RunConfig]:
    base = RunConfig("forward", top_k=32, epochs=epochs)
    plan = [replace(base, targets="hard")]
    plan += [replace(base, temperature=t) for t in SWEEP_TEMPERATURES]
    for dim in SWEEP_DIMS:
        if dim != base.dim:
            plan += [replace(base, targets="hard", dim=dim), replace(base, dim=dim)]
    return plan


def summarize(
    runs: dict[str, dict[str, Any]], epoch: int | None = None
) -> dict[str, dict[str, Any]]:
    """Per configuration (over seeds): mean and sample std of the final perplexity, or of the
    perplexity after `epoch` (runs that did not evaluate then are left out). With a constant
    learning rate, a run's perplexity after epoch e is that of an e-epoch run of the same seed."""

    def score(run: dict[str, Any]) -> float | None:
        if epoch is None:
            return float(run["perplexity"])
        curve = run.get("perplexity_per_epoch", [])
        return curve[epoch - 1] if 0 < epoch <= len(curve) else None

    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs.values():
        if score(run) is not None:
            groups.setdefault(RunConfig(**run["config"]).key, []).append(run)
    out = {}
    for key, group in groups.items():
        values = [float(score(r)) for r in sorted(group, key=lambda r: r["seed"])]  # type: ignore[arg-type]
        out[key] = {
            "epoch": epoch or group[0]["config"]["epochs"],
            "seeds": [r["seed"] for r in sorted(group, key=lambda r: r["seed"])],
            "perplexity": values,
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "parameters": group[0]["parameters"],
            "seconds_mean": statistics.fmean(r["seconds"] for r in group),
        }
    return out


def paired(hard: dict[str, Any], distilled: dict[str, Any]) -> dict[str, Any] | None:
    """Per seed (same initialisation and data order): hard minus distilled perplexity; the mean
    difference against two sample standard deviations of the differences."""
    by_seed = dict(zip(hard["seeds"], hard["perplexity"], strict=True))
    differences = [
        by_seed[s] - p
        for s, p in zip(distilled["seeds"], distilled["perplexity"], strict=True)
        if s in by_seed
    ]
    if len(differences) < 2:
        return None
    mean, std = statistics.fmean(differences), statistics.stdev(differences)
    return {
        "differences": differences,
        "mean": mean,
        "std": std,
        "holds": bool(mean > 2 * std and len(differences) >= 3),
    }


def checks(
    summary: dict[str, dict[str, Any]], dim: int, temperature: float, alpha: float = ALPHA
) -> dict[str, Any]:
    """The issue's two checks at the recommended settings (top-32 forward KL), and the paired
    (per seed) form of the first beside the issue's unpaired one."""
    out: dict[str, Any] = {}
    setting = RunConfig("forward", 32, temperature, alpha, dim)
    hard = summary.get(f"d{dim}/hard")
    top32 = summary.get(setting.key)
    dense = summary.get(replace(setting, top_k=0).key)
    if hard and top32:
        margin = hard["mean"] - top32["mean"]
        two_std = 2 * max(hard["std"], top32["std"])
        out["distilled_beats_hard"] = {
            "hard": hard,
            "distilled_top32": top32,
            "margin": margin,
            "two_std": two_std,
            "holds": bool(margin > two_std and len(hard["seeds"]) >= 3),
        }
        pairs = paired(hard, top32)
        if pairs is not None:
            out["distilled_beats_hard_paired"] = pairs
    if top32 and dense:
        relative = (top32["mean"] - dense["mean"]) / dense["mean"]
        out["top32_within_1pct_of_dense"] = {
            "top32": top32["mean"],
            "dense": dense["mean"],
            "relative": relative,
            "holds": bool(abs(relative) <= 0.01),
        }
    return out


def token_dataset(windows: Windows, path: Path) -> Path:
    """The windows' model inputs (all but each window's last id) as the export's .npz."""
    lengths = windows.lengths - 1
    ids = np.concatenate([windows.ids[i, :n] for i, n in enumerate(lengths)])
    np.savez(path, ids=ids, lengths=lengths)
    return path


def export_targets(
    address: str,
    model: str,
    tokens: Path,
    tokenizer: Path,
    out: Path,
    temperature: float,
    top_k: int,
) -> float:
    """`student-client export --tokens` as a user runs it; returns its wall seconds."""
    command = [
        sys.executable, "-m", "student_client.cli", "export", "--teacher", address, "--model", model,
        "--tokens", str(tokens), "--task", LM_TASK, "--tokenizer", str(tokenizer), "--out", str(out),
        "--output", "log_probs", "--temperature", f"{temperature:g}", "--top-k", str(top_k),
        "--output-dtype", "float16", "--batch-size", str(FETCH_BATCH),
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass
class Session:
    """What every run of a mode shares: the teacher's data split, its tokenizer file, its client."""

    split: TextSplit
    tokenizer: Path
    model: str
    address: str
    client: TeacherClient
    teacher: dict[str, Any]


def open_session(
    client: TeacherClient, address: str, model: str, work: Path, max_windows: int | None
) -> Session:
    info = client.wait_ready(300, model)
    tokenizer = work / "tokenizer.json"
    tokenizer.write_bytes(client.tokenizer(model).content)
    split = pydoc_text_split(tokenizer, info.max_length)
    if max_windows is not None:
        split = replace(
            split, train=Windows(split.train.ids[:max_windows], split.train.lengths[:max_windows])
        )
    teacher = {
        "model": info.name,
        "model_version": info.model_version,
        "parameters": info.parameter_count,
        "perplexity": teacher_perplexity(client, split.held_out, model, tokenizer),
    }
    say(
        f"[sequence] teacher {info.name} ({info.parameter_count:,} parameters), held-out perplexity "
        f"{teacher['perplexity']:.2f}; {len(split.train)} training windows "
        f"({split.train.predicted_tokens:,} targets), held out {split.held_out.predicted_tokens:,}"
    )
    return Session(split, tokenizer, model, address, client, teacher)


def run_plan(
    session: Session,
    plan: Sequence[RunConfig],
    seeds: Sequence[int],
    out: dict[str, Any],
    checkpoint: Path | None,
) -> None:
    """Every config of `plan` for every seed, skipping runs `out["runs"]` already holds; targets
    fetched once per forward setting."""
    runs = out.setdefault("runs", {})
    stores: dict[tuple[float, int], TargetStore] = {}
    for config in plan:
        for seed in seeds:
            name = f"{config.key}/s{seed}"
            if name in runs:
                continue
            store = None
            if config.targets == "forward" and config.source == "memory":
                setting = (config.temperature, config.top_k)
                if setting not in stores:
                    if setting[1] == 0:  # one dense setting in memory at a time (about 0.7 GB)
                        stores = {key: s for key, s in stores.items() if key[1] != 0}
                    stores[setting] = fetch_store(
                        session.client, session.split, session.tokenizer, session.model, config
                    )
                    say(
                        f"[sequence] fetched T={setting[0]:g} k={setting[1]} in {stores[setting].fetch_s:.1f} s"
                    )
                    mass = stores[setting].top_mass()
                    if mass is not None:
                        out.setdefault("teacher_top_mass", {})[
                            f"T{setting[0]:g}/top{setting[1]}"
                        ] = mass
                        say(
                            f"[sequence] teacher's top-{setting[1]} mass at T={setting[0]:g}: {mass}"
                        )
                store = stores[setting]
            run = train_run(
                config, seed, session.split, store=store, client=session.client,
                model=session.model, tokenizer=session.tokenizer,
            )  # fmt: skip
            runs[name] = run
            say(
                f"[sequence] {name}: held-out perplexity {run['perplexity']:.2f} "
                f"(per epoch {', '.join('-' if p is None else f'{p:.1f}' for p in run['perplexity_per_epoch'])}) in {run['seconds']:.0f} s"
            )
            if checkpoint is not None:
                write_json(checkpoint, out)


def offline_check(
    session: Session,
    teacher_stop: Callable[[], bool],
    config: RunConfig,
    out: dict[str, Any],
    work: Path,
) -> dict[str, Any]:
    """Export the training text's top-k, stop the teacher, train seed 0 from the export; compare
    with the online (per-epoch TokenTargetLoader) and in-memory runs of the same seed."""
    tokens = token_dataset(session.split.train, work / "train-tokens.npz")
    folder = work / f"export-top{config.top_k}"
    export_s = export_targets(
        session.address,
        session.model,
        tokens,
        session.tokenizer,
        folder,
        config.temperature,
        config.top_k,
    )
    size = folder_bytes(folder)
    stopped = teacher_stop()
    started = time.perf_counter()
    offline = train_run(replace(config, source="offline"), 0, session.split, export=folder)
    online = out["runs"].get(f"{replace(config, source='online').key}/s0")
    memory = out["runs"].get(f"{config.key}/s0")
    result = {
        "export_seconds": round(export_s, 1),
        "export_bytes": size,
        "bytes_per_token": size / session.split.train.predicted_tokens,
        "teacher_process_running": not stopped,
        "offline": offline,
        "offline_seconds": round(time.perf_counter() - started, 1),
        "online_perplexity": None if online is None else online["perplexity"],
        "memory_perplexity": None if memory is None else memory["perplexity"],
    }
    reference = online or memory
    if reference is not None:
        relative = abs(offline["perplexity"] - reference["perplexity"]) / reference["perplexity"]
        result["relative_difference"] = relative
        result["holds"] = bool(relative <= 1e-3 and stopped)
    return result


def markdown(out: dict[str, Any]) -> str:
    """The rows as a Markdown table: mean +- sample std of held-out perplexity over seeds."""
    lines = [
        "| student | targets | parameters | held-out perplexity (mean ± std) | per seed | s / run |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in sorted(out["summary"].items(), key=lambda item: item[1]["mean"]):
        dim, *rest = key.split("/")
        per_seed = ", ".join(f"{p:.1f}" for p in row["perplexity"])
        lines.append(
            f"| {dim} | {'/'.join(rest)} | {row['parameters']:,} | {row['mean']:.1f} ± "
            f"{row['std']:.1f} | {per_seed} | {row['seconds_mean']:.0f} |"
        )
    lines += check_lines(out.get("checks", {}))
    return "\n".join(lines) + "\n"


def check_lines(found: dict[str, Any]) -> list[str]:
    """The issue's checks as a Markdown table (empty when there are none)."""
    rows = []
    if "distilled_beats_hard" in found and len(found["distilled_beats_hard"]["hard"]["seeds"]) > 1:
        c = found["distilled_beats_hard"]
        rows.append(
            f"| top-32 beats hard by > 2 std (unpaired) | {c['distilled_top32']['mean']:.1f} vs "
            f"{c['hard']['mean']:.1f}: margin {c['margin']:.1f}, 2 std {c['two_std']:.1f} | "
            f"{'yes' if c['holds'] else 'no'} |"
        )
    if "distilled_beats_hard_paired" in found:
        c = found["distilled_beats_hard_paired"]
        differences = ", ".join(f"{d:.1f}" for d in c["differences"])
        rows.append(
            f"| the same, paired per seed | hard - top-32: {differences}; mean {c['mean']:.1f}, "
            f"2 std {2 * c['std']:.1f} | {'yes' if c['holds'] else 'no'} |"
        )
    if "top32_within_1pct_of_dense" in found:
        c = found["top32_within_1pct_of_dense"]
        rows.append(
            f"| top-32 within 1 % of dense | {c['top32']:.1f} vs {c['dense']:.1f}: "
            f"{100 * c['relative']:+.2f} % | {'yes' if c['holds'] else 'no'} |"
        )
    if not rows:
        return []
    return ["", "| check | figures | met? |", "|---|---|---|", *rows]


def report(out: dict[str, Any], markdown_path: Path | None) -> None:
    print_table(out)
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(markdown(out))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The sequence evaluation in the mode `args` asks for (full, `--sweep` or `--quick`)."""
    if args.from_json:  # no training: the tables of a saved run
        saved: dict[str, Any] = json.loads(args.from_json.read_text())
        # An interrupted run's checkpoint has no summary; --at-epoch reads the curves.
        saved["summary"] = summarize(saved["runs"], args.at_epoch)
        kept = {k: v for k, v in saved.get("checks", {}).items() if k == "offline_equals_online"}
        saved["checks"] = kept | checks(saved["summary"], args.dim, args.temperature, args.alpha)
        report(saved, args.markdown)
        return saved
    started = time.perf_counter()
    machine = machine_summary()
    mode = (
        "quick"
        if args.quick
        else "sweep"
        if args.sweep
        else "sweep-kd"
        if args.sweep_kd
        else "full"
    )
    out: dict[str, Any] = {"mode": f"sequence-{mode}", "machine": machine}
    if args.json is not None and args.json.exists() and not args.quick:
        previous = json.loads(args.json.read_text())
        if previous.get("mode") == out["mode"]:
            out["runs"] = previous.get("runs", {})
            say(f"[sequence] {len(out['runs'])} run(s) kept from {args.json}")
    repository = args.repository.resolve()
    ensure_sequence_teacher(repository / args.model, small=args.quick)
    epochs = args.epochs or (2 if args.quick else 4 if args.sweep else 8)
    max_windows = args.max_windows or (QUICK_WINDOWS if args.quick else None)
    first = args.first_seed
    one_seed = args.quick or args.sweep or args.sweep_kd
    seeds = [first] if one_seed else list(range(first, first + args.seeds))
    temperature, dim, alpha = args.temperature, args.dim, args.alpha
    rows = [row.strip() for row in args.rows.split(",")] if args.rows else list(ROWS)
    with tempfile.TemporaryDirectory(prefix="distill-seq-") as scratch, torch_threads(1):
        work = Path(scratch)
        with teacher_process(repository, SERVE_ARGS) as teacher:
            with TeacherClient(teacher.grpc_address) as client:
                session = open_session(client, teacher.grpc_address, args.model, work, max_windows)
                out["teacher"] = session.teacher
                out["data"] = {
                    "train_windows": len(session.split.train),
                    "train_tokens": session.split.train.predicted_tokens,
                    "held_out_tokens": session.split.held_out.predicted_tokens,
                }
                out["settings"] = {
                    "epochs": epochs,
                    "seeds": seeds,
                    "temperature": temperature,
                    "dim": dim,
                    "alpha": alpha,
                    "rows": rows,
                    "lr": LR,
                    "batch_size": BATCH_SIZE,
                }
                if args.sweep:
                    plan = sweep_plan(epochs)
                elif args.sweep_kd:
                    plan = kd_sweep_plan(
                        epochs, temperature, alpha, dim,
                        floats(args.sweep_temperatures), floats(args.sweep_alphas), rows,
                    )  # fmt: skip
                elif args.quick:
                    base = RunConfig("hard", epochs=epochs, temperature=temperature, dim=dim)
                    plan = [
                        base,
                        replace(base, targets="forward", top_k=8),
                        replace(base, targets="forward", top_k=OFFLINE_TOP_K),
                        replace(base, targets="forward", top_k=0),
                        replace(base, targets="reverse", top_k=8),
                    ]
                else:
                    plan = full_plan(seeds, epochs, temperature, dim, alpha, rows)
                online = replace(
                    RunConfig("forward", OFFLINE_TOP_K, temperature, dim=dim, epochs=epochs),
                    source="online",
                )
                run_plan(session, plan, seeds, out, args.json)
                if not (args.sweep or args.sweep_kd or args.no_offline):
                    run_plan(session, [online], [0], out, args.json)
                    out["offline"] = offline_check(
                        session, lambda: stop(teacher), replace(online, source="memory"), out, work
                    )
    out["summary"] = summarize(out["runs"])
    # The checks need 3 seeds and the full schedule; the quick run checks the mechanics.
    out["checks"] = {} if args.quick else checks(out["summary"], dim, temperature, alpha)
    if "offline" in out and "holds" in out["offline"]:
        out["checks"]["offline_equals_online"] = {
            k: v for k, v in out["offline"].items() if k != "offline"
        } | {"offline_perplexity": out["offline"]["offline"]["perplexity"]}
    if args.quick:
        out["checks"].update(quick_checks(out))
    out["machine_after"] = machine_summary()
    out["seconds"] = round(time.perf_counter() - started, 1)
    report(out, args.markdown)
    if args.json is not None:
        write_json(args.json, out)
    return out


def floats(text: str) -> list[float]:
    """A comma-separated list of numbers (`--sweep-temperatures 0.5,0.75`)."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def stop(teacher: Any) -> bool:
    """Stop the teacher process now; True once it has exited."""
    teacher.stop()
    return teacher.process.poll() is not None


def ensure_sequence_teacher(folder: Path, small: bool) -> None:
    from student_client.training.lm_demo import ensure_sequence_teacher as ensure

    ensure(folder, small)


def quick_checks(out: dict[str, Any]) -> dict[str, Any]:
    """What a 2-epoch run on a few windows supports: every distilled run's training loss falls,
    every loader pass yielded each batch exactly once, the offline run matches the online one."""
    falling = {
        name: run["loss_per_epoch"]
        for name, run in out["runs"].items()
        if run["config"]["targets"] != "hard"
    }
    expected = -(-out["data"]["train_windows"] // BATCH_SIZE)
    passes = {name: run["loader"] for name, run in out["runs"].items() if run["loader"]}
    return {
        "loss_decreases": {
            "runs": falling,
            "holds": all(losses[-1] < losses[0] for losses in falling.values()),
        },
        "loader_batches_once": {
            "expected": expected,
            "passes": passes,
            "holds": bool(passes)
            and all(
                p["sent"] == p["received"] == p["yielded"] == expected and p["resent"] == 0
                for run in passes.values()
                for p in run
            ),
        },
    }


def print_table(out: dict[str, Any]) -> None:
    say(
        f"\n[sequence] held-out perplexity, mean ± std over seeds (teacher {out['teacher']['perplexity']:.2f}):"
    )
    for key, row in sorted(out["summary"].items()):
        say(
            f"  {key:<32} {row['mean']:8.2f} ± {row['std']:.2f}  (seeds {row['seeds']}, {row['parameters']:,} parameters, {row['seconds_mean']:.0f} s)"
        )
    for name, check in out["checks"].items():
        say(f"[sequence] check {name}: {check.get('holds')}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sequence rows (--sequence)")
    group.add_argument(
        "--sequence", action="store_true", help="the LM rows instead of the image ones"
    )
    group.add_argument(
        "--sweep", action="store_true", help="--sequence: the T / k / width sweep, seed 0"
    )
    group.add_argument(
        "--epochs", type=int, default=None, help="--sequence: epochs (8; sweep 4; quick 2)"
    )
    group.add_argument(
        "--temperature", type=float, default=1.0, help="--sequence: T of the full rows"
    )
    group.add_argument("--dim", type=int, default=64, help="--sequence: the student's width")
    group.add_argument(
        "--alpha", type=float, default=ALPHA, help="--sequence: the KD weight (1 - alpha: CE)"
    )
    group.add_argument(
        "--rows",
        default=None,
        help=f"--sequence: comma-separated rows of {','.join(ROWS)} (default all; topN any N)",
    )
    group.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="--sequence, --consistent: seeds first..first+seeds-1",
    )
    group.add_argument(
        "--no-offline",
        action="store_true",
        help="--sequence: skip the online run and the export / offline check",
    )
    group.add_argument(
        "--sweep-kd",
        action="store_true",
        help="--sequence: one seed, the --rows at each --sweep-temperatures (alpha fixed) and "
        "each --sweep-alphas (T fixed)",
    )
    group.add_argument(
        "--at-epoch",
        type=int,
        default=None,
        help="--from-json: score every run after this epoch (it must have been evaluated)",
    )
    group.add_argument("--sweep-temperatures", default="0.5,0.75,1", help="--sweep-kd: T values")
    group.add_argument("--sweep-alphas", default="0.5,1", help="--sweep-kd: alpha values")
    group.add_argument(
        "--model", default=DEFAULT_SEQUENCE_MODEL_NAME, help="--sequence: the teacher"
    )
    group.add_argument(
        "--max-windows", type=int, default=None, help="--sequence: first N training windows only"
    )


__all__ = ["RunConfig", "add_arguments", "run"]
