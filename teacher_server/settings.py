"""The teacher's one settings object, read by every floor; it imports nothing of the server.

Command-line flags over `TEACHER_*` environment variables over defaults that run with no
configuration.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Every field can be set as `--field-name` on `teacher-server serve` or as `TEACHER_FIELD_NAME`."""

    model_config = SettingsConfigDict(env_prefix="TEACHER_", protected_namespaces=())

    host: str = Field("127.0.0.1", description="address both servers bind (0.0.0.0 in a container)")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port; 0 picks a free one")
    model_repository: Path = Field(
        Path("model_repository"), description="folder holding one subfolder per model"
    )
    train_default_if_missing: bool = Field(
        True, description="train the default MNIST teacher into the repository if it has no model"
    )
    default_sequence_teacher: bool = Field(
        True,
        description="with train_default_if_missing, also train the default sequence teacher "
        "(pydoc-causal-lm, about 4 min on 2 CPU cores) into a repository that holds no model but "
        "the MNIST one: in a child process at low priority once the server is ready, then loaded",
    )
    default_sequence_small: bool = Field(
        False,
        description="train the default sequence teacher's tiny recipe instead (seconds; for tests)",
    )
    repository_poll_s: float = Field(
        0.0,
        ge=0,
        description="re-scan the repository every N seconds and reload changed models; 0: off",
    )
    allowed_architectures: Annotated[tuple[str, ...], NoDecode] = Field(
        ("teacher_server.models.",),
        description="import-path prefixes a config.json may name as its architecture",
    )
    device: str = Field(
        "auto", description="torch device: auto (cuda when available), cpu, cuda:0..."
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="CPU threads for the forward; 0: torch's default (all cores). With students "
        "training on the same machine, prefer forward_workers = cores",
    )
    allow_tf32: bool = Field(
        False,
        description="let CUDA use TF32 matmuls/convolutions (faster; soft targets then differ from "
        "float32 by up to ~1e-3)",
    )
    forward_chunk: int = Field(
        -1,
        ge=-1,
        description="run merged batches in row chunks of at most N (0: whole batches); -1: on a "
        "CPU chunks of 64 (a CNN's activations then stay in cache) unless a probe batch at load "
        "runs at least 10%% faster whole (an MLP), on a GPU whole batches",
    )
    forward_workers: int = Field(
        1,
        ge=1,
        description="on a CPU, chunks computed at once on Python threads, each on one torch "
        "thread (torch_threads is then ignored); 1: one chunk at a time over torch_threads "
        "threads, the fastest for a server alone on its cores; set it to the number of cores "
        "when students train on the same machine (docs/performance.md)",
    )
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto",
        description="run image models (4-d inputs) in the channels-last memory format; auto: "
        "on a CPU for models with 2-d convolutions, where that layout is faster",
    )
    max_batch_size: int = Field(
        1024, ge=1, description="most samples in one request, and in one merged forward"
    )
    max_batch_tokens: int = Field(
        16384,
        ge=1,
        description="sequence models: most real tokens merged into one forward (and padded tokens "
        "in one length bucket); a single larger request runs alone",
    )
    max_queue_delay_ms: float = Field(
        2.0,
        ge=0,
        description="how long the batcher waits for more requests to merge into a forward",
    )
    max_queue_size: int = Field(
        256,
        ge=1,
        description="requests waiting for a forward per model; beyond it RESOURCE_EXHAUSTED",
    )
    inline_forward_max_ms: float = Field(
        2.0,
        ge=0,
        description="a lone request (nothing else waiting or running) whose size last ran alone "
        "in at most this many ms is forwarded on the event loop, skipping the queue and the "
        "worker thread's two hops (docs/performance.md); 0: every forward on the worker thread",
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="largest gRPC message or HTTP body accepted"
    )
    stream_max_in_flight: int = Field(
        128, ge=1, description="batches of one gRPC stream being computed at once"
    )
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        description="longest a request may wait for its soft targets (client deadlines "
        "shorter than this are honoured too)",
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="on SIGTERM, how long in-flight requests get to finish"
    )
    fair_queuing: bool = Field(
        True,
        description="share forwards between clients by deficit round-robin over rows (tokens "
        "for sequence models), so a light client is not stuck behind a heavy one's backlog; "
        "false: first come, first served",
    )
    client_max_queued_rows: int = Field(
        131072,
        ge=0,
        description="most rows one client may have waiting for a forward per model version "
        "(a tokens file entry may set its own); beyond it that client gets RESOURCE_EXHAUSTED "
        "/ 429 with Retry-After; 0: no cap. The default holds one stream at "
        "stream_max_in_flight batches of max_batch_size",
    )
    anonymous_client_key: Literal["connection", "host"] = Field(
        "connection",
        description="how clients without a token are told apart for fair queuing and metrics: "
        "connection (peer address and port: a gRPC channel, an HTTP connection) or host "
        "(peer address only: everything from one machine is one client)",
    )
    metrics_max_clients: int = Field(
        16,
        ge=0,
        description="clients without a named token that get their own label in the per-client "
        "metrics; later ones are counted under client='other'",
    )
    auth_token: SecretStr | None = Field(
        None,
        description="a student credential (scope infer): once any student credential is set, "
        "every request needs 'authorization: Bearer <token>'. It cannot reload: that takes "
        "an operator credential",
    )
    auth_token_file: Path | None = Field(None, description="read the auth token from this file")
    operator_token: SecretStr | None = Field(
        None,
        description="an operator credential (scopes infer and admin): the admin reload is off "
        "unless one is configured (here or in auth_tokens_file)",
    )
    operator_token_file: Path | None = Field(
        None, description="read the operator token from this file"
    )
    auth_tokens_file: Path | None = Field(
        None,
        description="TOML file of named credentials with scopes (infer, admin), weights and "
        "queued-row caps (docs/operations.md, Roles); read at start",
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate: serve gRPC and HTTP over TLS"
    )
    tls_key_file: Path | None = Field(None, description="PEM private key for tls_cert_file")
    port_file: Path | None = Field(
        None, description="once serving, write {grpc_port, http_port, pid} as JSON to this file"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    stage_timing_file: Path | None = Field(
        None,
        description="benchmarks: stamp every soft-target request's stages (decode, queue, "
        "forward, encode...) and write them to this file as JSON lines at shutdown "
        "(bench/request_cost.py); unset: off, nothing recorded",
    )

    @field_validator("allowed_architectures", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """`TEACHER_ALLOWED_ARCHITECTURES=pkg_a.,pkg_b.` or a JSON list, as well as a list."""
        if isinstance(value, str) and value.lstrip().startswith("["):
            return tuple(json.loads(value))
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        return self

    def token(self) -> str | None:
        """The single student token (`auth_token` / `auth_token_file`), or None."""
        secret = self.auth_token.get_secret_value() if self.auth_token else None
        return load_token(secret, self.auth_token_file)

    def operator(self) -> str | None:
        """The single operator token (`operator_token` / `operator_token_file`), or None."""
        secret = self.operator_token.get_secret_value() if self.operator_token else None
        return load_token(secret, self.operator_token_file)

    def apply_torch_settings(self) -> None:
        """Process-wide torch switches this teacher needs; called once when the server starts.
        With several CPU forward workers each chunk runs on one thread (intra-op threads 1)."""
        if self.torch_device().type == "cpu" and self.forward_workers > 1:
            torch.set_num_threads(1)
        elif self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)
        torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
        torch.backends.cudnn.allow_tf32 = self.allow_tf32

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def load_token(token: str | None, token_file: Path | None) -> str | None:
    """The configured token: the value itself, else the file's content (stripped), else None."""
    if token:
        return token
    if token_file is not None:
        value = token_file.read_text().strip()
        if not value:
            raise ValueError(f"auth token file {token_file} is empty")
        return value
    return None
