"""Offline export (`student-client export`, `export_soft_targets`) and training from it
(`OfflineSoftTargetLoader`): the same soft targets as online, temperatures applied offline to a
logits export, resuming an interrupted export without duplicates, and corrupted shards refused."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from student_client import SoftTargetLoader, TargetOptions, TeacherClient
from student_client.cli import main as cli_main
from student_client.digests import dataset_fingerprint
from student_client.offline.cache import SoftTargetCache
from student_client.offline.export_format import CorruptShardError, ExportError, file_sha256
from student_client.offline.reader import (
    MissingSampleError,
    OfflineSoftTargetLoader,
    OfflineSoftTargets,
)
from student_client.online.exporter import export_soft_targets


def _by_sample(loader, n: int) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """One pass; each task's values rearranged by dataset index (the batches' labels)."""
    out: dict[str, np.ndarray] = {}
    for _, index, targets in loader:
        for task, output in targets.outputs.items():
            if task not in out:
                out[task] = np.zeros((n, *output.values.shape[1:]), dtype=output.values.dtype)
            out[task][np.asarray(index)] = output.values
    return out


def _batches(
    images: np.ndarray, order: np.ndarray, size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(images[order[s : s + size]], order[s : s + size]) for s in range(0, len(order), size)]


def test_probs_export_offline_equals_online(teacher, mnist_test_images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    images = mnist_test_images[0][:600]
    options = TargetOptions(temperature=4.0, output_dtype="float32")
    out = tmp_path / "export"
    with TeacherClient(teacher.grpc_address) as client:
        # One batch in flight, the same batches as the export: the same forwards as the export's.
        result = export_soft_targets(
            client, images, out, options, batch_size=64, shard_size=256, depth=1, dataset_name="t"
        )
        online = _by_sample(
            SoftTargetLoader(_batches(images, np.arange(600), 64), client, options, depth=1), 600
        )
        info = client.model_info()
    assert result.complete and result.written == [0, 1, 2] and result.kept == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["teacher"]["model"] == info.name
    assert manifest["teacher"]["model_version"] == info.model_version
    assert [t["name"] for t in manifest["teacher"]["tasks"]] == ["digit", "parity", "loops"]
    assert manifest["settings"] == {
        "tasks": ["digit", "parity", "loops"],
        "output": "probs",
        "temperature": 4.0,
        "top_k": 0,
        "output_dtype": "float32",
        "shard_size": 256,
    }
    assert manifest["dataset"]["fingerprint"] == dataset_fingerprint(images)
    assert manifest["dataset"]["samples"] == manifest["samples"]["written"] == 600
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [
        (0, 256),
        (256, 512),
        (512, 600),
    ]
    for shard in manifest["shards"]:
        assert file_sha256(out / shard["file"]) == shard["sha256"]
    assert re.match(r"\d{4}-\d\d-\d\dT", manifest["created"])
    assert any("only this temperature" in note for note in manifest["notes"])

    # No teacher involved from here on: the offline loader takes no client.
    shuffled = _batches(images, np.random.default_rng(0).permutation(600), 50)
    loader = OfflineSoftTargetLoader(shuffled, out)
    offline = _by_sample(loader, 600)
    assert loader.stats.yielded == 12 and loader.stats.samples == 600
    for task in online:
        assert offline[task].dtype == online[task].dtype == np.float32
        np.testing.assert_array_equal(offline[task], online[task])
    # By dataset index instead of by content; the same triples.
    by_index = OfflineSoftTargetLoader([(order, order) for _, order in shuffled], out, key="index")
    np.testing.assert_array_equal(_by_sample(by_index, 600)["digit"], online["digit"])
    # Only the exported temperature is served; an input that is not in the export is an error.
    with pytest.raises(ValueError, match="only that temperature is exact"):
        OfflineSoftTargetLoader(shuffled, out, temperature=2.0)
    with pytest.raises(MissingSampleError, match="batch 0: sample 0"):
        list(OfflineSoftTargetLoader([(images[:2] + 0.5, None)], out))

    # Mixed: the export fills a cache; an online loader with it asks only for the new samples.
    more = mnist_test_images[0][:700]
    with (
        TeacherClient(teacher.grpc_address) as client,
        SoftTargetCache(tmp_path / "cache.sqlite") as cache,
    ):
        assert cache.import_export(out) == 600 * 3
        mixed = SoftTargetLoader(_batches(more, np.arange(700), 100), client, options, cache=cache)
        values = _by_sample(mixed, 700)
        assert mixed.stats.sent == 1 and mixed.stats.cached_samples == 600
        np.testing.assert_array_equal(values["digit"][:600], online["digit"])


def test_logits_export_applies_any_temperature_offline(
    teacher, mnist_test_images, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    images = mnist_test_images[0][:300]
    npy = tmp_path / "inputs.npy"
    np.save(npy, images)
    out = tmp_path / "logits"
    cli_main(
        ["export", "--teacher", teacher.grpc_address, "--npy", str(npy), "--out", str(out),
         "--output", "logits", "--temperature", "1", "--shard-size", "128", "--batch-size", "64"]
    )  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 3
    assert manifest["dataset"]["name"] == "inputs.npy"
    assert any("any temperature" in note for note in manifest["notes"])
    order = np.random.default_rng(1).permutation(300)
    with TeacherClient(teacher.grpc_address) as client:
        for temperature in (1.0, 2.5, 4.0):
            options = TargetOptions(temperature=temperature, output_dtype="float32")
            served = _by_sample(SoftTargetLoader(_batches(images, order, 40), client, options), 300)
            loader = OfflineSoftTargetLoader(
                _batches(images, order, 40), out, temperature=temperature
            )
            offline = _by_sample(loader, 300)
            for task in served:
                np.testing.assert_allclose(offline[task], served[task], atol=1e-6, rtol=0)
    raw = next(iter(OfflineSoftTargetLoader([(images[:5], None)], out)))[2]
    assert raw.outputs["digit"].kind == "logits" and raw.temperature == 1.0


def test_top_k_export_notes_that_only_its_temperature_is_exact(
    teacher, mnist_test_images, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    images = mnist_test_images[0][:100]
    options = TargetOptions(temperature=2.0, top_k=3, output_dtype="float16", tasks=("digit",))
    with TeacherClient(teacher.grpc_address) as client:
        export_soft_targets(client, images, tmp_path / "top3", options, batch_size=32, depth=1)
        ((_, _, online),) = list(SoftTargetLoader([(images[:32], None)], client, options))
    manifest = json.loads((tmp_path / "top3" / "manifest.json").read_text())
    assert any("only the exported temperature" in note for note in manifest["notes"])
    (_, _, offline), *_ = OfflineSoftTargetLoader([(images[:32], None)], tmp_path / "top3")
    for part in ("values", "indices", "tail_mass"):
        np.testing.assert_array_equal(
            getattr(offline.outputs["digit"], part), getattr(online.outputs["digit"], part)
        )
    assert offline.outputs["digit"].values.dtype == np.float16
    with pytest.raises(ValueError, match="top 3"):
        OfflineSoftTargets(tmp_path / "top3").targets(np.arange(3), temperature=1.0)


def test_interrupted_export_resumes_without_duplicates(
    teacher, mnist_test_images, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    images = mnist_test_images[0][:450]
    options = TargetOptions(temperature=4.0)
    out = tmp_path / "export"
    with TeacherClient(teacher.grpc_address) as client:

        def export(**kwargs):  # type: ignore[no-untyped-def]
            return export_soft_targets(
                client, images, out, options, batch_size=32, shard_size=100, **kwargs
            )

        first = export(max_shards=2)  # "killed" after two shards
        assert first.written == [0, 1] and not first.complete
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["samples"]["written"] == 200 and manifest["complete"] is False
        kept_times = {
            name: (out / name).stat().st_mtime_ns
            for name in ("shard-00000.safetensors", "shard-00001.safetensors")
        }

        def crash(shard) -> None:  # type: ignore[no-untyped-def]
            raise RuntimeError(f"killed after shard {shard.index}")

        with pytest.raises(RuntimeError, match="killed after shard 2"):
            export(on_shard=crash)  # dies with batches of shard 3 in flight
        (out / ".shard-00003.safetensors.tmp-1").write_bytes(b"half a shard")  # a torn write

        third = export()
        assert third.kept == [0, 1, 2] and third.written == [3, 4] and third.complete
        assert not list(out.glob(".*.tmp-*"))  # the torn write is cleaned up, never listed
        again = export()  # nothing left to do
        assert again.kept == [0, 1, 2, 3, 4] and again.written == []
        with pytest.raises(ExportError, match="other settings"):
            export_soft_targets(
                client, images, out, TargetOptions(temperature=2.0), batch_size=32, shard_size=100
            )
        with pytest.raises(ExportError, match="another dataset"):
            export_soft_targets(client, images[:400], out, options, shard_size=100)
    for name, mtime in kept_times.items():
        assert (out / name).stat().st_mtime_ns == mtime  # not rewritten
    reader = OfflineSoftTargets(out)
    assert len(reader) == 450
    np.testing.assert_array_equal(reader.sample_index, np.arange(450))  # exact and unique
    assert len({bytes(d) for d in reader.digests}) == 450
    shards = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert shards == [f"shard-{i:05d}.safetensors" for i in range(5)]


def test_corrupted_shard_is_refused_and_rewritten(teacher, mnist_test_images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    images = mnist_test_images[0][:300]
    out = tmp_path / "export"
    with TeacherClient(teacher.grpc_address) as client:
        export_soft_targets(client, images, out, batch_size=50, shard_size=100)
        good = OfflineSoftTargets(out).targets(np.arange(300)).outputs["digit"].values
        shard = out / "shard-00001.safetensors"
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0x01  # one bit of one value
        shard.write_bytes(bytes(data))
        with pytest.raises(CorruptShardError, match=re.escape(str(shard)) + ": sha256"):
            OfflineSoftTargets(out)
        with pytest.raises(CorruptShardError, match="shard-00001"):
            OfflineSoftTargetLoader([images[:10]], out)
        # Exporting again into the folder rewrites the changed shard, and only that one.
        result = export_soft_targets(client, images, out, batch_size=50, shard_size=100)
        assert result.written == [1] and result.kept == [0, 2]
    np.testing.assert_allclose(
        OfflineSoftTargets(out).targets(np.arange(300)).outputs["digit"].values, good, atol=1e-6
    )
    # Unreadable, with a manifest that agrees: still refused, naming the file.
    shard.write_bytes(b"\x00" * 64)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = file_sha256(shard)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptShardError, match=r"shard-00001\.safetensors: not a readable"):
        OfflineSoftTargets(out)
