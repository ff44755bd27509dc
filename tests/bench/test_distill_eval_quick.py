"""`python -m bench.distill_eval --quick`: a real teacher server on the session's repository, a
short distillation run, and the checks such a run supports."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

# `bench` is not an installed package: import it from the repository root, whichever way pytest
# was started (`python -m pytest` puts the working directory on sys.path, `pytest` does not).
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
distill_eval = importlib.import_module("bench.distill_eval")


def test_settings_and_task_groups() -> None:
    assert distill_eval.parse_setting("dense-f32") == (0, "float32")
    assert distill_eval.parse_setting("top3-f16") == (3, "float16")
    tasks = {"digit": 10, "parity": 2, "loops": 3}
    # The server takes one top_k per request, at most the fewest classes of its tasks.
    assert distill_eval.task_groups(tasks, 0) == {0: ["digit", "parity", "loops"]}
    assert distill_eval.task_groups(tasks, 1) == {1: ["digit", "parity", "loops"]}
    assert distill_eval.task_groups(tasks, 3) == {3: ["digit", "loops"], 2: ["parity"]}
    assert distill_eval.task_groups(tasks, 5) == {5: ["digit"], 2: ["parity"], 3: ["loops"]}


@pytest.mark.timeout(360)
def test_quick_run(default_repository: Path, tmp_path: Path) -> None:
    out_path = tmp_path / "distill-quick.json"
    result = distill_eval.main(
        ["--quick", "--repository", str(default_repository), "--json", str(out_path)]
    )
    saved = json.loads(out_path.read_text())
    assert saved["mode"] == result["mode"] == "quick"
    checks = saved["checks"]
    failed = {name: check for name, check in checks.items() if not check["holds"]}
    assert not failed, json.dumps(failed, indent=2)

    # The client-side softmax of the raw logits is what the server sends as probs at T = 4.
    assert checks["softmax_matches_server"]["max_abs_diff"] <= 1e-6

    mnist = saved["datasets"]["mnist"]
    assert mnist["train_samples"] == 800
    runs = mnist["runs"]
    assert set(runs) == {
        "h512/hard",
        "h512/dense-f32/T1/a0.9",
        "h512/dense-f32/T4/a0.9",
        "h512/top3-f16/T4/a0.9",
    }
    for run in runs.values():
        assert len(run["loss_per_epoch"][0]) == 3
        for accuracy in run["accuracy"].values():
            assert 0.5 < accuracy["mean"] <= 1.0  # 3 epochs on 800 images: well above chance

    # Bytes per sample of the digit task: 10 float32 values; 3 float16 values + 3 uint8 indices
    # + a float32 tail mass. The whole response adds the framing (model, version, batch id).
    settings = mnist["experiments"]["compression"]["settings"]
    dense, top3 = settings["dense-f32"]["bytes"], settings["top3-f16"]["bytes"]
    assert dense["digit_payload"] == 40
    assert top3["digit_payload"] == 13
    assert dense["digit_b64"] > 40 and top3["digit_b64"] > 13
    assert top3["all_b64"] < dense["all_b64"]

    # Consistent augmentation (issue 21), 2 epochs on 800 images.
    consistent = saved["consistent"]
    records = {r["key"]: r for r in consistent["records"]}
    assert set(records) == {
        "h512/kd/shift/online/e2",
        "h512/hard/shift/e2",
        "h512/kd/shift/cached/e2",
        "h512/dkd+uw/shift+mixup/online/e2",
        "h64-256/kd+fsp/shift/online/e2",
    }
    # The teacher was asked about each fresh view once: 2 epochs of shifted views and 2 of
    # shifted and mixed-up views, 800 each; the cached-views student reused epoch 1's answers.
    assert consistent["teacher_samples"] == 2 * 800 + 2 * 800
    # DKD + uncertainty weighting + mixup leaves chance (10 %) behind.
    assert records["h512/dkd+uw/shift+mixup/online/e2"]["accuracy"]["digit"] > 0.2
    # The int8 copy: packed int8 weights, a quarter of the float student's bytes plus scales.
    int8 = records["h512/kd/shift/online/e2"]["int8"]
    assert int8["int8_bytes"] < int8["float_bytes"] / 3
    assert abs(int8["int8_accuracy"]["digit"] - int8["float_accuracy"]["digit"]) <= 0.02


def test_consistent_plans_and_their_specs() -> None:
    """`--plan checks` / `--plan sweep` build the rows they name, with the KD setting in the
    key (none for the quickstart's T 4, alpha 0.9, so older logs keep their keys), and a log's
    `plan_spec` rebuilds the same plan for `--from-log`."""
    cli = importlib.import_module("bench.distill_eval.cli")
    consistent = importlib.import_module("bench.distill_eval.consistent")
    args = cli.parse_args(
        [
            *("--consistent", "--consistent-plan", "checks", "--kd-temperature", "2"),
            *("--kd-alpha", "0.5", "--short-epochs", "20", "--long-epochs", "100"),
            *("--teacher-epochs", "60"),
        ]
    )
    assert args.repository == REPO_ROOT / "runs" / "teachers" / "e60"
    spec = cli.plan_spec(args)
    plan = consistent.plan_from_spec(json.loads(json.dumps(spec)))
    assert [row.key for row in plan.rows] == [
        "h512/kd@T2a0.5/shift/online/e20",
        "h512/hard/shift/e20",
        "h512/kd@T2a0.5/shift/cached/e20",
        "h512/kd@T2a0.5/shift+mixup/online/e20",
        "h512/hard/shift+mixup/e20",
        "h512/kd@T2a0.5/shift+mixup/cached/e20",
        "h512/kd@T2a0.5/shift/online/e100",
        "h512/hard/shift/e100",
        "h512/kd@T2a0.5/shift/cached/e100",
    ]
    assert [c.distilled.key for c in plan.checks] == [
        plan.rows[0].key,
        *[plan.rows[i].key for i in (3, 6)],
    ]
    assert [row.key for row in plan.int8_of] == [plan.rows[0].key, plan.rows[6].key]
    default = consistent.kd_check("shift", 20, 4.0, 0.9)
    assert default.distilled.key == "h512/kd/shift/online/e20"  # the full plan's key
    sweep = cli.plan_spec(
        cli.parse_args(
            ["--consistent", "--consistent-plan", "sweep", "--kd-settings", "1:0.5,4:0.9:mixce"]
        )
    )
    plan = consistent.plan_from_spec(sweep)
    assert [row.key for row in plan.rows] == [
        "h512/hard/shift/e20",
        "h512/kd@T1a0.5/shift/online/e20",
        "h512/kd+mixce/shift/online/e20",
        "h512/hard/shift+mixup/e20",
        "h512/kd@T1a0.5/shift+mixup/online/e20",
        "h512/kd+mixce/shift+mixup/online/e20",
    ]
    assert [(c.distilled.key, c.hard.key, c.cached) for c in plan.checks] == [
        (plan.rows[1].key, plan.rows[0].key, None),
        (plan.rows[2].key, plan.rows[0].key, None),
        (plan.rows[4].key, plan.rows[3].key, None),
        (plan.rows[5].key, plan.rows[3].key, None),
    ]
    assert plan.int8_of == ()
    hard_only = cli.plan_spec(
        cli.parse_args(["--consistent", "--consistent-plan", "sweep", "--kd-settings", ""])
    )
    plan = consistent.plan_from_spec(hard_only)
    assert [row.key for row in plan.rows] == ["h512/hard/shift/e20", "h512/hard/shift+mixup/e20"]
    assert plan.checks == ()
    # A cosine learning rate for hard-label and KD rows alike, without the cached-views rows.
    spec = cli.plan_spec(
        cli.parse_args(
            [
                *("--consistent", "--consistent-plan", "checks", "--kd-temperature", "1"),
                *("--augments", "shift+mixup", "--long-augments", "", "--lr-schedule", "cosine"),
                *("--no-cached", "--mix-ce"),
            ]
        )
    )
    plan = consistent.plan_from_spec(spec)
    assert [row.key for row in plan.rows] == [
        "h512/kd@T1a0.9+mixce+cos/shift+mixup/online/e20",
        "h512/hard+cos/shift+mixup/e20",
    ]
    assert plan.checks[0].cached is None
    # Another student for hard-label and KD rows alike (Hinton et al.'s 2 x 800 small net).
    for kind in ("checks", "sweep"):
        args = ["--consistent", "--consistent-plan", kind, "--kd-settings", "1:0.9"]
        spec = cli.plan_spec(cli.parse_args([*args, "--augments", "shift+mixup"]))
        wide = cli.plan_spec(
            cli.parse_args([*args, "--augments", "shift+mixup", "--student-hidden", "800,800"])
        )
        narrow = consistent.plan_from_spec(spec)
        plan = consistent.plan_from_spec(wide)
        assert {row.hidden for row in narrow.rows} == {(512,)}
        assert {row.hidden for row in plan.rows} == {(800, 800)}
        assert [row.key for row in plan.rows] == [
            row.key.replace("h512/", "h800-800/") for row in narrow.rows
        ]
    with pytest.raises(SystemExit, match="--kd-settings"):
        cli.plan_spec(
            cli.parse_args(
                ["--consistent", "--consistent-plan", "sweep", "--kd-settings", "4:0.9:ce"]
            )
        )


@pytest.mark.timeout(120)
def test_long_teacher_is_its_own_model(default_repository: Path, tmp_path: Path) -> None:
    """`--teacher-epochs N` trains the default recipe into its own model `mnist-multitask-eN`
    (here 1 epoch), reuses it on the next call, and refuses a folder holding another model."""
    cli = importlib.import_module("bench.distill_eval.cli")
    root = tmp_path / "e1"
    assert cli.ensure_long_teacher(root, 1) == root
    config = json.loads((root / "mnist-multitask-e1" / "config.json").read_text())
    assert config["name"] == "mnist-multitask-e1"
    assert config["training"]["epochs"] == 1
    model = root / "mnist-multitask-e1" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    cli.ensure_long_teacher(root, 1)  # found: not trained again
    assert model.stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="mnist-multitask"):
        cli.ensure_long_teacher(default_repository, 1)


@pytest.mark.timeout(240)
def test_teacher_ensemble_is_served_as_the_mean_of_its_members(
    default_repository: Path, tmp_path: Path
) -> None:
    """`--teacher-seeds 0,1` trains the recipe once per seed (here 1 epoch) as models of their
    own and writes their ensemble; the real teacher serves it, its logits are the mean of the
    members' logits (asked of the same teacher), the bench asks it by name, and a folder holding
    other models is refused."""
    cli = importlib.import_module("bench.distill_eval.cli")
    common = importlib.import_module("bench.common")
    fetch = importlib.import_module("bench.distill_eval.fetch")
    from student_client.online.client import TeacherClient

    root = tmp_path / "e1x2"
    name = cli.ensure_teacher_ensemble(root, 1, [0, 1])
    assert name == "mnist-multitask-e1x2"
    members = ["mnist-multitask-e1-s0", "mnist-multitask-e1-s1"]
    assert sorted(p.parent.name for p in root.glob("*/config.json")) == [*members, name]
    config = json.loads((root / name / "config.json").read_text())
    assert config["ensemble"]["members"] == members
    weights = [(root / m / "model.safetensors").read_bytes() for m in members]
    assert weights[0] != weights[1]  # the seeds differ
    stamp = (root / members[1] / "model.safetensors").stat().st_mtime_ns
    assert cli.ensure_teacher_ensemble(root, 1, [0, 1]) == name  # found: not trained again
    assert (root / members[1] / "model.safetensors").stat().st_mtime_ns == stamp

    data = importlib.import_module("bench.distill_eval.data")
    images = data.mnist_dataset(None).test_x[:64]
    with common.teacher_process(root, cli.serve_args()) as teacher:
        with TeacherClient(teacher.grpc_address) as client:
            client.wait_ready(60, name)
            ensemble, _ = fetch.fetch_logits(client, images, model=name)
            each = [fetch.fetch_logits(client, images, model=m)[0] for m in members]
    for task, values in ensemble.items():
        mean = (each[0][task].astype("float64") + each[1][task]) / 2
        assert abs(values - mean).max() < 1e-5, task
        assert abs(values - each[0][task]).max() > 1e-3, task  # not just the first member

    with pytest.raises(SystemExit, match="--teacher-seeds"):
        cli.ensure_teacher_ensemble(default_repository, 1, [0, 1])
    with pytest.raises(SystemExit, match="2 distinct seeds"):
        cli.ensure_teacher_ensemble(tmp_path / "other", 1, [3, 3])
    args = cli.parse_args(["--consistent", "--teacher-epochs", "60", "--teacher-seeds", "0,1,2"])
    assert args.teacher_seeds == [0, 1, 2]
    assert args.repository == REPO_ROOT / "runs" / "teachers" / "e60x3"


@pytest.mark.timeout(120)
def test_mixed_ce_and_cosine_rows(teacher: Any) -> None:
    """Against the real teacher, 128 images, 2 epochs: `mix_ce` changes only the mixed batches'
    loss (un-mixed shift views train the same), and `lr_schedule="cosine"` decays the learning
    rate, so the same row with it ends elsewhere."""
    consistent = importlib.import_module("bench.distill_eval.consistent")
    data = importlib.import_module("bench.distill_eval.data").mnist_dataset(128)
    client_module = importlib.import_module("student_client.online.client")
    Row = consistent.Row
    with client_module.TeacherClient(teacher.grpc_address) as client:
        client.wait_ready(60)
        asked = consistent.Teacher(client, data)
        runs = {
            name: consistent.train_row(asked, row, 0)[1]
            for name, row in {
                "mixup": Row("online", "shift+mixup", 2, temperature=1.0),
                "mixup+ce": Row("online", "shift+mixup", 2, temperature=1.0, mix_ce=True),
                "shift": Row("online", "shift", 2, temperature=1.0),
                "shift+ce": Row("online", "shift", 2, temperature=1.0, mix_ce=True),
                "shift+cos": Row("online", "shift", 2, temperature=1.0, lr_schedule="cosine"),
            }.items()
        }
    assert runs["mixup"]["loss_per_epoch"] != runs["mixup+ce"]["loss_per_epoch"]
    assert runs["shift"]["loss_per_epoch"] == runs["shift+ce"]["loss_per_epoch"]
    # epoch 1 runs at lr 1e-3 either way; epoch 2 at the cosine's 5e-4
    assert runs["shift+cos"]["loss_per_epoch"][0] == runs["shift"]["loss_per_epoch"][0]
    assert runs["shift+cos"]["loss_per_epoch"][1] != runs["shift"]["loss_per_epoch"][1]
    with pytest.raises(ValueError, match="lr_schedule"):
        consistent.train_row(asked, Row("hard", "shift", 1, lr_schedule="step"), 0)


def test_weight_averaged_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """`average_epochs`: the reported student is the mean of its weights at the end of its last N
    epochs (computed here by hand from the same run's snapshots), the training itself is the
    same run (same losses and per-epoch accuracies), and the last weights' accuracy is kept."""
    consistent = importlib.import_module("bench.distill_eval.consistent")
    data = importlib.import_module("bench.distill_eval.data").mnist_dataset(128)
    import torch

    teacher = consistent.Teacher(None, data)  # hard-label rows never ask the teacher
    plain_row = consistent.Row("hard", "shift+mixup", 3)
    averaged_row = consistent.Row("hard", "shift+mixup", 3, average_epochs=2)
    assert averaged_row.key == "h512/hard+swa2/shift+mixup/e3"
    snapshots: list[dict[str, torch.Tensor]] = []
    original = consistent.accuracy

    def snapshot(student: Any, data: Any) -> dict[str, float]:  # per epoch, then at the end
        snapshots.append({k: v.clone() for k, v in student.state_dict().items()})
        return original(student, data)

    monkeypatch.setattr(consistent, "accuracy", snapshot)  # the real one, with a snapshot
    _, plain = consistent.train_row(teacher, plain_row, 0)
    snapshots.clear()
    student, averaged = consistent.train_row(teacher, averaged_row, 0)
    monkeypatch.undo()
    assert averaged["loss_per_epoch"] == plain["loss_per_epoch"]
    assert averaged["digit_accuracy_per_epoch"] == plain["digit_accuracy_per_epoch"]
    assert averaged["last_weights_accuracy"] == plain["accuracy"]
    epochs = snapshots[:3]  # the end of epochs 1, 2, 3 (then the last weights once more)
    for name, value in student.state_dict().items():
        expected = (epochs[1][name] + epochs[2][name]) / 2
        assert torch.allclose(value, expected, atol=1e-6), name
        assert not torch.allclose(value, epochs[2][name]), name
    assert averaged["accuracy"] == original(student, data)
    assert consistent.average(200, -1) == 50 and consistent.average(10, -1) == 3
    assert consistent.average(20, 30) == 20 and consistent.average(200, 0) == 0
