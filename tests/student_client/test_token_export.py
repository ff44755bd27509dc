"""`student-client export --tokens` and `OfflineTokenTargetLoader`: a token dataset's per-token
soft targets written once from the real sequence teacher, then read back with no teacher."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from student_client import TargetOptions, TeacherClient
from student_client.cli import main as cli_main
from student_client.offline.export_format import ExportError
from student_client.offline.reader import MissingSampleError, OfflineSoftTargets
from student_client.offline.token_reader import OfflineTokenTargetLoader, OfflineTokenTargets
from student_client.online.token_exporter import load_token_dataset
from student_client.online.token_loader import TokenTargetLoader
from student_client.teacher_process import TeacherProcess
from student_client.types import TokenBatch

MODEL = "pydoc-causal-lm"
TASKS = ("next_token", "topic_group")


@pytest.fixture(scope="module")
def sequence_teacher(
    sequence_repository: Path, teacher_factory: Callable[..., TeacherProcess]
) -> TeacherProcess:
    return teacher_factory(sequence_repository)


def requests(teacher: TeacherProcess) -> float:
    text = httpx.get(teacher.http_url + "/metrics", timeout=10, trust_env=False).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "teacher_requests_total" and sample.labels.get("model") == MODEL
    )


def dataset(n: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Packed ids (sum(lengths),) and lengths (n,) of random sequences of 1..32 tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 33, size=n)
    return rng.integers(3, vocab, size=int(lengths.sum())), lengths


def batches_of(ids: np.ndarray, lengths: np.ndarray, order: np.ndarray, size: int):  # type: ignore[no-untyped-def]
    """(padded TokenBatch, positions) batches of the dataset's sequences in `order`."""
    starts = np.concatenate([[0], np.cumsum(lengths)])
    out = []
    for begin in range(0, len(order), size):
        chosen = order[begin : begin + size]
        sequences = [ids[starts[i] : starts[i + 1]].tolist() for i in chosen]
        out.append((TokenBatch.padded(sequences, pad_id=0), chosen))
    return out


def test_export_then_offline_read_equals_online(
    sequence_teacher: TeacherProcess, sequence_repository: Path, tmp_path: Path
) -> None:
    tokenizer = sequence_repository / MODEL / "tokenizer.json"
    hash_ = "sha256:" + hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    with TeacherClient(sequence_teacher.grpc_address) as client:
        vocab = client.model_info(MODEL).vocab_size
    ids, lengths = dataset(70, vocab)
    npz = tmp_path / "tokens.npz"
    np.savez(npz, ids=ids, lengths=lengths)
    assert load_token_dataset(npz).ids.tolist() == ids.tolist()
    out = tmp_path / "export"
    cli_main(
        ["export", "--teacher", sequence_teacher.grpc_address, "--tokens", str(npz),
         "--tokenizer", str(tokenizer), "--out", str(out), "--top-k", "3",
         "--output-dtype", "float16", "--temperature", "2", "--shard-size", "32",
         "--batch-size", "8"]
    )  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 3
    assert manifest["teacher"]["tokenizer_hash"] == hash_
    assert manifest["dataset"]["kind"] == "tokens"
    assert manifest["dataset"]["tokens"] == int(lengths.sum())
    assert manifest["settings"]["token_tasks"] == ["next_token"]
    with pytest.raises(ExportError, match="token export"):
        OfflineSoftTargets(out)  # the image reader refuses it, naming the right one

    order = np.random.default_rng(5).permutation(70)
    options = TargetOptions(
        model=MODEL, tasks=TASKS, top_k=3, output_dtype="float16", temperature=2.0
    )
    with TeacherClient(sequence_teacher.grpc_address) as client:
        online = list(
            TokenTargetLoader(
                batches_of(ids, lengths, order, 9), client, options, tokenizer_hash=hash_
            )
        )
    before = requests(sequence_teacher)
    export = OfflineTokenTargets(out)
    offline = list(OfflineTokenTargetLoader(batches_of(ids, lengths, order, 9), export))
    assert requests(sequence_teacher) == before  # no teacher needed
    assert len(offline) == len(online) == 8
    for (batch, positions, served), (batch_, positions_, stored) in zip(
        online, offline, strict=True
    ):
        assert positions.tolist() == positions_.tolist()
        assert batch_.lengths.tolist() == batch.lengths.tolist()
        assert stored.lengths is not None and served.lengths is not None
        assert stored.lengths.tolist() == served.lengths.tolist()
        assert stored.model_version == served.model_version and stored.temperature == 2.0
        for task in TASKS:
            a, b = stored.outputs[task], served.outputs[task]
            assert a.level == b.level and a.kind == b.kind
            assert a.values.shape == b.values.shape and a.values.dtype == b.values.dtype
            # the same sequences, batched differently by the teacher: equal up to float16 rounding
            np.testing.assert_allclose(
                a.values.astype(np.float32), b.values.astype(np.float32), atol=2e-3
            )
            assert a.tail_mass is not None and b.tail_mass is not None
            np.testing.assert_allclose(a.tail_mass, b.tail_mass, atol=2e-3)
    # Exactly what was written: offline rows of one sequence equal the shard's rows.
    first = export.targets(np.array([0]))
    assert first.outputs["next_token"].values.shape == (int(lengths[0]), 3)

    with pytest.raises(MissingSampleError, match="not in the export"):
        list(OfflineTokenTargetLoader([TokenBatch.padded([[3, 4, 5, 6, 7, 8, 9]])], export))

    # Resume: the same command keeps every shard.
    cli_main(
        ["export", "--teacher", sequence_teacher.grpc_address, "--tokens", str(npz),
         "--tokenizer-hash", hash_, "--out", str(out), "--top-k", "3",
         "--output-dtype", "float16", "--temperature", "2", "--shard-size", "32",
         "--batch-size", "8"]
    )  # fmt: skip
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]


def test_offline_token_reader_imports_nothing_of_the_online_path() -> None:
    found = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-c",
            "import student_client.offline.reader, student_client.offline.token_reader",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    assert "student_client.offline.token_reader" in found
    assert not [line for line in found.splitlines() if "grpc" in line or "httpx" in line]
