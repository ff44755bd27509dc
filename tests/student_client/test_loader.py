"""SoftTargetLoader over the real server: order, exactly-once delivery, errors naming the batch."""

from __future__ import annotations

import time

import numpy as np
import pytest

from protocol.errors import InvalidArgument
from student_client import SoftTargetLoader, TargetOptions, TeacherClient


def _batches(images: np.ndarray, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    batches, start = [], 0
    for size in sizes:
        batches.append((images[start : start + size], np.arange(start, start + size)))
        start += size
    return batches


@pytest.mark.parametrize(
    ("transport", "depth"), [("grpc", 1), ("grpc", 4), ("grpc", 32), ("http", 4), ("http-json", 4)]
)
def test_every_batch_once_in_order(teacher, mnist_test_images, transport: str, depth: int) -> None:  # type: ignore[no-untyped-def]
    images = mnist_test_images[0]
    sizes = [1, 7, 16, 3, 32, 5] * 5  # 30 batches of varying size
    batches = _batches(images, sizes)
    address = teacher.grpc_address if transport == "grpc" else teacher.http_url
    options = TargetOptions(temperature=4.0, tasks=("digit", "loops"))
    with TeacherClient(address, transport=transport) as client:  # type: ignore[arg-type]
        loader = SoftTargetLoader(batches, client, options, depth=depth)
        seen = []
        for (inputs, labels, targets), (sent_inputs, sent_labels) in zip(
            loader, batches, strict=True
        ):
            assert inputs is sent_inputs and labels is sent_labels  # order kept, passed through
            assert targets.batch_size == len(inputs)
            assert list(targets.outputs) == ["digit", "loops"]
            seen.append(targets.batch_id)
        # Each answer is the teacher's answer for exactly that batch.
        check = [0, 13, 29]
        for index in check:
            alone = client.soft_targets_with(batches[index][0], options)
            again = SoftTargetLoader([batches[index]], client, options)
            ((_, _, targets),) = list(again)
            np.testing.assert_allclose(
                targets.outputs["digit"].values, alone.outputs["digit"].values, atol=1e-5
            )
    assert len(seen) == len(set(seen)) == 30
    assert loader.stats.sent == loader.stats.received == loader.stats.yielded == 30
    assert loader.stats.samples == sum(sizes)


def test_teacher_error_names_the_batch_and_loader_recovers(teacher, mnist_test_images) -> None:  # type: ignore[no-untyped-def]
    images = mnist_test_images[0]
    batches = _batches(images, [8] * 10)
    poisoned = batches[5][0].copy()
    poisoned[2, 0, 3, 4] = np.nan
    batches[5] = (poisoned, batches[5][1])
    with TeacherClient(teacher.grpc_address) as client:
        loader = SoftTargetLoader(batches, client, TargetOptions(), depth=4)
        yielded = 0
        with pytest.raises(InvalidArgument) as caught:
            for _ in loader:
                yielded += 1
        assert yielded == 5  # batches 0-4 delivered, none skipped
        assert "batch 5" in caught.value.message and caught.value.field == "inputs"
        # The same client keeps working.
        clean = SoftTargetLoader(_batches(images, [8] * 3), client, TargetOptions(), depth=2)
        assert len(list(clean)) == 3


def test_loader_rejects_bad_depth(teacher) -> None:  # type: ignore[no-untyped-def]
    with TeacherClient(teacher.grpc_address) as client, pytest.raises(ValueError, match="depth"):
        SoftTargetLoader([], client, depth=0)


def test_student_split_is_the_teachers_split() -> None:
    from student_client.training.datasets import mnist_multitask
    from teacher_server.repository.default_teacher import mnist_split, task_labels

    train_x, _, test_x, test_y = mnist_split()
    split = mnist_multitask()
    np.testing.assert_array_equal(split.train_x, train_x)
    np.testing.assert_array_equal(split.test_x, test_x)
    for task, labels in task_labels(test_y).items():
        np.testing.assert_array_equal(split.test_y[task], labels)


def test_uint8_inputs_are_the_exact_pixel_codes(teacher, mnist_test_images) -> None:  # type: ignore[no-untyped-def]
    """Floats k / 255 sent as uint8 reach the teacher as the same images (a quarter of the
    bytes); floats that are not whole codes are refused before anything is sent."""
    images = mnist_test_images[0][:48]
    batches = _batches(images, [16, 16, 16])
    options = TargetOptions(temperature=4.0, output_dtype="float32")
    with TeacherClient(teacher.grpc_address) as client:
        plain = list(SoftTargetLoader(batches, client, options))
        coded = SoftTargetLoader(batches, client, options, input_dtype="uint8")
        for (_, _, a), (_, _, b) in zip(plain, coded, strict=True):
            for task in a.outputs:
                np.testing.assert_allclose(
                    b.outputs[task].values, a.outputs[task].values, rtol=0, atol=1e-6
                )
        assert coded.stats.yielded == 3
        shifted = [(inputs + 0.001, labels) for inputs, labels in batches]
        loader = SoftTargetLoader(shifted, client, options, input_dtype="uint8")
        with pytest.raises(ValueError, match=r"input_dtype: uint8 needs inputs .* 0\.00392157"):
            list(loader)
        assert loader.stats.sent == 0
        for bad, shown in ((float("nan"), "nan"), (2.0, "2.0"), (-1 / 255, "-0.0039")):
            wrong = images[:16].copy()
            wrong[3, 0, 5, 7] = bad
            loader = SoftTargetLoader([(wrong, None)], client, options, input_dtype="uint8")
            with pytest.raises(ValueError, match=rf"inputs\[3, 0, 5, 7\] is {shown}"):
                list(loader)
            assert loader.stats.sent == 0


def test_cached_pass_raises_a_source_error_in_place_and_stops_its_thread(
    teacher, mnist_test_images, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """With a cache the source is read on a prefetch thread: an error it raises comes out of the
    loop after the batches before it, and leaving a pass early stops that thread."""
    import threading

    from student_client.offline.cache import SoftTargetCache

    images = mnist_test_images[0][:64]
    batches = _batches(images, [16, 16, 16, 16])

    def failing():  # type: ignore[no-untyped-def]
        yield from batches[:2]
        raise RuntimeError("source broke at batch 2")

    options = TargetOptions(temperature=4.0)
    with (
        TeacherClient(teacher.grpc_address) as client,
        SoftTargetCache(tmp_path / "cache.sqlite") as cache,
    ):
        seen = []
        with pytest.raises(RuntimeError, match="source broke at batch 2"):
            for _, _, targets in SoftTargetLoader(failing(), client, options, cache=cache):
                seen.append(targets.batch_size)
        assert seen == [16, 16]
        for _ in SoftTargetLoader(batches, client, options, cache=cache, depth=1):
            break  # leave the pass early
        deadline = time.monotonic() + 10
        while any(t.name == "loader-prefetch" for t in threading.enumerate()):
            assert time.monotonic() < deadline, "the prefetch thread outlived its pass"
            time.sleep(0.05)
