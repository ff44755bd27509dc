"""`student-client demo`'s issue-21 options through a real teacher: with `--augment` the
hard-label student trains on the same shifts as the distilled one, and `--int8` adds its row."""

from __future__ import annotations

from pathlib import Path

from student_client.teacher_process import TeacherProcess
from student_client.training.demo import DemoResult, DemoSettings, run_demo, summary_table


def _run(teacher: TeacherProcess, out: Path, augment: str) -> tuple[DemoResult, str]:
    settings = DemoSettings(
        epochs=1,
        n_train=128,
        teacher=teacher.grpc_address,
        out=out,
        progress=False,
        augment=augment,
        int8=augment != "none",
    )
    result = run_demo(settings)
    return result, summary_table(result, ["digit", "parity", "loops"])


def test_augment_shifts_both_students_and_int8_adds_a_row(
    teacher: TeacherProcess, tmp_path: Path
) -> None:
    plain, _ = _run(teacher, tmp_path / "plain", "none")
    shifted, table = _run(teacher, tmp_path / "shift", "shift")
    # Same seed, order and initial weights: only the shifted inputs can change the hard-label
    # student's training loss (and the distilled one's).
    assert plain.hard[0][0]["loss"] != shifted.hard[0][0]["loss"]
    assert plain.distilled[0][0]["loss"] != shifted.distilled[0][0]["loss"]
    # Each distilled epoch asked the teacher about every (new) view once.
    assert [stats["samples"] for stats in shifted.loader_batches] == [128]
    assert len(shifted.int8) == 1
    int8_bytes, float_bytes = shifted.int8[0]["int8_bytes"], shifted.int8[0]["float_bytes"]
    assert isinstance(int8_bytes, int) and isinstance(float_bytes, int)
    assert int8_bytes < float_bytes / 3
    assert "student, distilled, int8" in table
    assert (tmp_path / "shift" / "accuracy.png").stat().st_size > 10_000
