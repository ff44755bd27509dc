"""Trains the default sequence teacher into the repository in a child process while the server serves.

The server calls `train_default_sequence_in_background` once it is ready (see
`TeacherCore.start_background_training`). The teacher is trained only where the defaults live: the
repository holds no model but the default MNIST one, and not the sequence teacher yet. The child
is `teacher-server train-default-sequence`, at a lower CPU priority (`--nice`), so neither its
~4 minutes of training nor its GIL slow the forwards the server answers meanwhile, and a shutdown
ends it at once. It writes into a hidden folder (`.pydoc-causal-lm.partial-PID/pydoc-causal-lm`:
the scan skips the hidden parent, and the model keeps its name) renamed into place when complete, under a lock that several replicas
sharing the folder take in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import IO

from teacher_server.repository.default_sequence_teacher import DEFAULT_SEQUENCE_MODEL_NAME
from teacher_server.repository.default_teacher import DEFAULT_MODEL_NAME
from teacher_server.repository.store import scan_repository

log = logging.getLogger(__name__)

LOCK_FILE = ".train-default-sequence.lock"
LOCK_POLL_S = 1.0
CHILD_NICENESS = 10


class BackgroundTrainingError(Exception):
    """The child that trains the default sequence teacher failed; the message says how."""


def needs_default_sequence_teacher(root: Path) -> bool:
    """Whether `root` is the defaults' repository (no model but the MNIST default one) without
    the default sequence teacher."""
    names = set(scan_repository(root))
    return DEFAULT_SEQUENCE_MODEL_NAME not in names and names <= {DEFAULT_MODEL_NAME}


async def train_default_sequence_in_background(root: Path, small: bool = False) -> bool:
    """Train the default sequence teacher into `root` in a child process unless another process
    did meanwhile; True when this call put it there. Cancelling kills the child and removes its
    partial folder. Raises `BackgroundTrainingError` if the child fails."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "w") as lock:
        await _lock(lock)
        if (root / DEFAULT_SEQUENCE_MODEL_NAME).exists():
            return False  # trained by another replica while this one waited
        partial = root / f".{DEFAULT_SEQUENCE_MODEL_NAME}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        command = [
            sys.executable,
            "-m",
            "teacher_server.cli",
            "train-default-sequence",
            "--out",
            str(partial / DEFAULT_SEQUENCE_MODEL_NAME),
            "--nice",
            str(CHILD_NICENESS),
            *(["--small"] if small else []),
        ]
        child = await asyncio.create_subprocess_exec(*command)  # its log lines go to ours
        try:
            code = await child.wait()
        finally:
            if child.returncode is None:  # cancelled: the server is stopping
                child.kill()
                await child.wait()
            if child.returncode != 0:
                shutil.rmtree(partial, ignore_errors=True)
        if code != 0:
            raise BackgroundTrainingError(f"{' '.join(command[2:])} exited with status {code}")
        # Atomic: the folder appears complete, on the same file system.
        os.replace(partial / DEFAULT_SEQUENCE_MODEL_NAME, root / DEFAULT_SEQUENCE_MODEL_NAME)
        partial.rmdir()
        return True


async def _lock(lock: IO[str]) -> None:
    """Take the exclusive lock, polling so that a cancel (shutdown) is never stuck behind it."""
    while True:
        with contextlib.suppress(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        await asyncio.sleep(LOCK_POLL_S)
