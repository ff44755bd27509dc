"""Consistent augmentation: reproducible views, new views per epoch, exact pixels where promised,
and a real teacher answering for exactly the views the student trains on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from student_client import SoftTargetLoader, TargetOptions, TeacherClient
from student_client.training.augment import (
    AUGMENTATIONS,
    Augmentation,
    augment_batch,
    augment_epoch,
    augmented_batches,
    shift,
)


def _batches(images: np.ndarray, size: int) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    return [
        (
            torch.from_numpy(images[start : start + size]),
            {"digit": torch.arange(start, start + len(images[start : start + size]))},
        )
        for start in range(0, len(images), size)
    ]


def _codes(x: torch.Tensor) -> torch.Tensor:
    return x * 255.0 - torch.round(x * 255.0)


def test_parse_names_every_choice_and_rejects_others() -> None:
    assert Augmentation.parse("none") == Augmentation()
    assert Augmentation.parse("shift") == Augmentation(2, "none")
    assert Augmentation.parse("shift+mixup", max_shift=3) == Augmentation(3, "mixup")
    assert (
        Augmentation.parse("cutmix").exact_pixels and not Augmentation.parse("mixup").exact_pixels
    )
    assert all(Augmentation.parse(name).active == (name != "none") for name in AUGMENTATIONS)
    with pytest.raises(ValueError, match="augment: expected one of"):
        Augmentation.parse("rotate")
    with pytest.raises(ValueError, match="mix_alpha"):
        Augmentation(mix="mixup", mix_alpha=0.0)


def test_shift_by_hand() -> None:
    image = torch.arange(1, 10, dtype=torch.uint8).reshape(1, 1, 3, 3)
    rng = np.random.default_rng(0)
    offsets = np.random.default_rng(0).integers(0, 3, size=(1, 2))
    dy, dx = (int(v) - 1 for v in offsets[0])  # offset o in [0, 2] moves the image by 1 - o
    moved = shift(image, 1, rng)
    expected = torch.zeros(3, 3, dtype=torch.uint8)
    for y in range(3):
        for x in range(3):
            if 0 <= y + dy < 3 and 0 <= x + dx < 3:
                expected[y, x] = image[0, 0, y + dy, x + dx]
    assert moved.dtype == torch.uint8 and moved.shape == image.shape
    assert torch.equal(moved[0, 0], expected)


def test_views_are_reproducible_new_per_seed_and_shapes_kept(mnist_test_images) -> None:  # type: ignore[no-untyped-def]
    batches = _batches(mnist_test_images[0][:96], 32)
    for name in AUGMENTATIONS[1:]:
        augmentation = Augmentation.parse(name)
        first = list(augmented_batches(batches, augmentation, seed=7))
        again = list(augmented_batches(batches, augmentation, seed=7))
        other = list(augmented_batches(batches, augmentation, seed=8))
        for (a, labels), (b, _), (c, _), (x, y) in zip(first, again, other, batches, strict=True):
            assert torch.equal(a, b), name  # same seed: the same views, bit for bit
            assert not torch.equal(a, c), name  # another epoch's seed: new views
            assert not torch.equal(a, x), name
            assert a.shape == x.shape and a.dtype == torch.float32
            mixed = augmentation.mix != "none"
            assert labels == ({} if mixed else y), name
            if augmentation.exact_pixels:  # still codes k / 255: uint8 on the wire stays exact
                assert _codes(a).abs().max() < 1e-4, name
    mixup = list(augmented_batches(batches, Augmentation.parse("mixup"), seed=7))
    assert max(float(_codes(x).abs().max()) for x, _ in mixup) > 0.01


def test_mixup_and_cutmix_weights_and_pixels() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 8, 8), generator=generator, dtype=torch.uint8)
    labels = {"digit": torch.arange(16)}
    rng = np.random.default_rng(1)
    for _ in range(20):
        mixed = augment_batch(images, labels, Augmentation(mix="mixup"), rng)
        assert mixed.weight is not None and 0.0 <= mixed.weight <= 1.0
        assert mixed.partner is not None and sorted(mixed.partner.tolist()) == list(range(16))
        assert mixed.inputs.dtype == torch.float32
        expected = (
            mixed.weight * images.float() + (1 - mixed.weight) * images[mixed.partner].float()
        )
        torch.testing.assert_close(mixed.inputs, expected)
        assert mixed.training_labels() == {} and mixed.labels is labels

        cut = augment_batch(images, labels, Augmentation(mix="cutmix"), rng)
        assert cut.inputs.dtype == torch.uint8 and cut.partner is not None
        assert cut.weight is not None and 0.0 <= cut.weight <= 1.0
        # Every pixel is the sample's own or its partner's, and the partner's share is 1 - lam.
        own = cut.inputs == images
        theirs = cut.inputs == images[cut.partner]
        assert bool((own | theirs).all())
        box = (~own).float().mean(dim=(1, 2, 3))  # pixels that visibly came from the partner
        assert bool((box <= 1 - cut.weight + 1e-9).all())


def test_augment_epoch_gives_the_loader_views_with_partners_and_weights() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((40, 1, 8, 8), generator=generator).numpy()
    batches = _batches(images, 16)
    augmentation = Augmentation.parse("shift+mixup")
    full = list(augment_epoch(batches, augmentation, seed=7))
    plain = list(augmented_batches(batches, augmentation, seed=7))
    assert len(full) == len(plain) == 3
    for view, (inputs, labels) in zip(full, plain, strict=True):
        assert torch.equal(view.inputs, inputs) and labels == {}
        assert view.partner is not None and view.weight is not None
        # The labels are kept for a caller who mixes the two labels' losses itself.
        assert set(view.labels) == {"digit"} and len(view.labels["digit"]) == len(inputs)
    shifted = list(augment_epoch(batches, Augmentation.parse("shift"), seed=7))
    assert all(view.partner is None and view.weight is None for view in shifted)


def test_teacher_answers_for_the_exact_augmented_pixels(teacher, mnist_test_images) -> None:  # type: ignore[no-untyped-def]
    """Through a real server: shifted and cut-mixed views go as uint8 codes, mixed-up views as
    floats, and each batch's soft targets are the teacher's answer for those very pixels."""
    images = mnist_test_images[0][:64]
    options = TargetOptions(temperature=4.0, output_dtype="float32")
    with TeacherClient(teacher.grpc_address) as client:
        for name, input_dtype in (("shift+cutmix", "uint8"), ("shift+mixup", None)):
            augmentation = Augmentation.parse(name)
            plain = _batches(images, 16)
            views = list(augmented_batches(plain, augmentation, seed=3))
            loader = SoftTargetLoader(views, client, options, input_dtype=input_dtype)
            for (inputs, labels, targets), (view, _), (source, _) in zip(
                loader, views, plain, strict=True
            ):
                assert inputs is view and labels == {}
                direct = client.soft_targets_with(view.numpy(), options)
                original = client.soft_targets_with(source.numpy(), options)
                for task in targets.outputs:
                    np.testing.assert_allclose(
                        targets.outputs[task].values, direct.outputs[task].values, atol=1e-6
                    )
                moved = np.abs(direct.outputs["digit"].values - original.outputs["digit"].values)
                assert moved.max() > 1e-3  # the teacher did see different images
            assert loader.stats.yielded == 4
