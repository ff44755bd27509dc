"""Security: bearer-token authentication, TLS, and requests that try to make the server touch the
file system or run code.

- `--auth-token secret` (and `--operator-token` for the reloads): without the token, or with a wrong one, every call gets UNAUTHENTICATED
  (gRPC, with `error-code`/`error-field` metadata) / 401 with the standard error body and
  `WWW-Authenticate: Bearer` (HTTP); health checks work without it; `TeacherClient(token=...)`
  works over gRPC, HTTP and HTTP-JSON, and so does `SoftTargetLoader`.
- `--auth-token-file` + `--tls-cert-file/--tls-key-file` (a CA and a certificate for 127.0.0.1
  and localhost, made at test time with `cryptography`): clients given `tls_ca_file` work over
  gRPC and HTTPS; a plaintext client, or one trusting another CA, fails at once with
  `Unavailable` naming the address.
- Nothing in a request can make the server load a file, import code or unpickle: model names
  that look like paths or import paths are NOT_FOUND (soft targets, model info, and the admin
  reload, which only knows the repository's folder names), a pickle is just bytes, and the server
  keeps serving.
"""

from __future__ import annotations

import datetime
import ipaddress
import pickle
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protocol import codec
from protocol.errors import GRPC_CODE_KEY, GRPC_FIELD_KEY, Unauthenticated, Unavailable
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from student_client import SoftTargetLoader, TargetOptions, TeacherClient
from student_client.online.retry import NO_RETRY
from tests.reliability.conftest import (
    MODEL,
    Launcher,
    Teacher,
    Transport,
    grpc_channel,
    http_client,
    wait_ready,
)

TOKEN = "secret"
OPERATOR = "operator-secret"  # the admin reload needs an operator credential
FILE_TOKEN = "token-from-a-file"
TIMEOUT = 30.0
GOOD = np.full((2, 1, 28, 28), 0.25, dtype=np.float32)
WRONG_CREDENTIALS = [
    None,
    "Bearer nope",
    f"Bearer {TOKEN}x",
    f"bearer {TOKEN}",
    TOKEN,
    "Basic c2VjcmV0",
    "Bearer",
]


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the server's certificate


def _make_tls_files(folder: Path) -> TlsFiles:
    pytest.importorskip(
        "cryptography", reason="needs the cryptography package (dev extras) to make certificates"
    )
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def ca(common: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(name(common))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cert, key

    ca_cert, ca_key = ca("teacher test CA")
    other_cert, _ = ca("another CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = TlsFiles(folder / "ca.pem", folder / "cert.pem", folder / "key.pem", folder / "x.pem")
    files.ca.write_bytes(ca_cert.public_bytes(pem))
    files.other_ca.write_bytes(other_cert.public_bytes(pem))
    files.cert.write_bytes(server_cert.public_bytes(pem))
    files.key.write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.key.chmod(0o600)
    return files


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return _make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def servers(
    module_launcher: Launcher, tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles
) -> tuple[Teacher, Teacher]:
    """(token server, TLS server with a token file), started side by side."""
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(FILE_TOKEN + "\n")  # stripped when read
    token_file.chmod(0o600)
    plain = module_launcher.launch("--auth-token", TOKEN, "--operator-token", OPERATOR)
    tls = module_launcher.launch(
        "--auth-token-file",
        str(token_file),
        "--tls-cert-file",
        str(tls_files.cert),
        "--tls-key-file",
        str(tls_files.key),
        ca_file=tls_files.ca,
    )
    return wait_ready(plain), wait_ready(tls)


@pytest.fixture(scope="module")
def auth_teacher(servers: tuple[Teacher, Teacher]) -> Teacher:
    return servers[0]


@pytest.fixture(scope="module")
def tls_teacher(servers: tuple[Teacher, Teacher]) -> Teacher:
    return servers[1]


@pytest.fixture(scope="module")
def stub(auth_teacher: Teacher) -> Iterator[pb_grpc.TeacherServiceStub]:
    with grpc_channel(auth_teacher.grpc_address) as channel:
        yield pb_grpc.TeacherServiceStub(channel)


@pytest.fixture(scope="module")
def http(auth_teacher: Teacher) -> Iterator[httpx.Client]:
    with http_client(auth_teacher.http_url) as client:
        yield client


def good_request(**fields: object) -> pb.SoftTargetsRequest:
    fields.setdefault("model", MODEL)
    fields.setdefault("inputs", codec.encode(GOOD))
    return pb.SoftTargetsRequest(**fields)  # type: ignore[arg-type]


def metadata(credentials: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", credentials),) if credentials is not None else ()


def assert_unauthenticated(error: grpc.RpcError) -> None:
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    trailing = dict(error.trailing_metadata() or ())
    assert trailing.get(GRPC_CODE_KEY) == "UNAUTHENTICATED"
    assert trailing.get(GRPC_FIELD_KEY) == "authorization"
    assert "authorization" in (error.details() or "")


@pytest.mark.parametrize("credentials", WRONG_CREDENTIALS)
def test_grpc_refuses_missing_or_wrong_token(
    stub: pb_grpc.TeacherServiceStub, credentials: str | None
) -> None:
    md = metadata(credentials)
    calls = [
        lambda: stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT, metadata=md),
        lambda: stub.GetModelInfo(
            pb.GetModelInfoRequest(model=MODEL), timeout=TIMEOUT, metadata=md
        ),
        lambda: stub.GetSoftTargets(good_request(), timeout=TIMEOUT, metadata=md),
        lambda: list(
            stub.StreamSoftTargets(iter([good_request(batch_id="s")]), timeout=TIMEOUT, metadata=md)
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert_unauthenticated(info.value)


@pytest.mark.parametrize("credentials", WRONG_CREDENTIALS)
def test_http_refuses_missing_or_wrong_token(http: httpx.Client, credentials: str | None) -> None:
    headers = {"authorization": credentials} if credentials is not None else {}
    responses = [
        http.get("/v1/models", headers=headers),
        http.get(f"/v1/models/{MODEL}", headers=headers),
        http.post(
            f"/v1/models/{MODEL}/soft-targets",
            json={"inputs": GOOD.tolist()},
            headers=headers,
        ),
        http.post(
            f"/v1/models/{MODEL}/soft-targets",
            content=good_request().SerializeToString(),
            headers={**headers, "content-type": "application/x-protobuf"},
        ),
        http.get("/v1/no-such-route", headers=headers),  # no hint of what exists either
    ]
    for response in responses:
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json() == {
            "error": {
                "code": "UNAUTHENTICATED",
                "message": "authorization: missing or wrong bearer token",
                "field": "authorization",
            }
        }


@pytest.mark.parametrize("credentials", WRONG_CREDENTIALS)
def test_http_v2_refuses_missing_or_wrong_token_in_the_v2_body(
    http: httpx.Client, credentials: str | None
) -> None:
    """A `/v2` path is the Open Inference Protocol's: its 401 has the v2 body, not ours."""
    headers = {"authorization": credentials} if credentials is not None else {}
    infer = {"inputs": [{"name": "inputs", "datatype": "FP32", "shape": [1, 1, 28, 28]}]}
    responses = [
        http.get("/v2", headers=headers),
        http.get(f"/v2/models/{MODEL}", headers=headers),
        http.post(f"/v2/models/{MODEL}/infer", json=infer, headers=headers),
        http.get("/v2/no-such-route", headers=headers),
    ]
    for response in responses:
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json() == {"error": "authorization: missing or wrong bearer token"}


def test_health_needs_no_token(auth_teacher: Teacher, http: httpx.Client) -> None:
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").json() == {"ready": True}
    with grpc_channel(auth_teacher.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "distill.v1.TeacherService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("transport", ["grpc", "http", "http-json"])
def test_client_with_the_token(
    auth_teacher: Teacher, transport: Transport, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    address = auth_teacher.grpc_address if transport == "grpc" else auth_teacher.http_url
    images = mnist_test_images[0][:32]
    with TeacherClient(address, transport=transport, token=TOKEN) as client:
        assert client.model_info().name == MODEL
        alone = client.soft_targets(images[:8], temperature=2.0)
        assert alone.outputs["digit"].values.shape == (8, 10)
        batches = [(images[i : i + 8], i) for i in range(0, 32, 8)]
        loader = SoftTargetLoader(batches, client, TargetOptions(temperature=2.0), depth=2)
        labels = [label for _, label, _ in loader]
        assert labels == [0, 8, 16, 24]
        assert loader.stats.yielded == 4
    with TeacherClient(address, transport=transport) as client:  # default retries
        with pytest.raises(Unauthenticated) as info:  # not retried: fails at once
            client.soft_targets(images[:8])
        assert info.value.field == "authorization"
    with TeacherClient(address, transport=transport, token="wrong", retry=NO_RETRY) as client:
        with pytest.raises(Unauthenticated):
            client.model_info(MODEL)


@pytest.mark.parametrize("transport", ["grpc", "http", "http-json"])
def test_tls_with_a_token_file(
    tls_teacher: Teacher, tls_files: TlsFiles, transport: Transport
) -> None:
    addresses = (
        [tls_teacher.grpc_address, f"localhost:{tls_teacher.grpc_port}"]
        if transport == "grpc"
        else [tls_teacher.http_address, f"https://localhost:{tls_teacher.http_port}"]
    )
    for address in addresses:
        with TeacherClient(
            address, transport=transport, token=FILE_TOKEN, tls_ca_file=tls_files.ca
        ) as client:
            targets = client.soft_targets(GOOD, temperature=3.0)
            assert targets.outputs["parity"].values.shape == (2, 2)
        with TeacherClient(
            address, transport=transport, tls_ca_file=tls_files.ca, retry=NO_RETRY
        ) as client:
            with pytest.raises(Unauthenticated):
                client.soft_targets(GOOD)


def test_tls_health_needs_no_token(tls_teacher: Teacher, tls_files: TlsFiles) -> None:
    with http_client(tls_teacher.http_url, tls_files.ca) as https:
        assert https.get("/healthz").status_code == 200
        assert https.get("/readyz").status_code == 200
    with grpc_channel(tls_teacher.grpc_address, tls_files.ca) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("transport", ["grpc", "http"])
@pytest.mark.parametrize("trust", ["plaintext", "another CA"])
def test_tls_refuses_untrusting_clients_cleanly(
    tls_teacher: Teacher, tls_files: TlsFiles, transport: Transport, trust: str
) -> None:
    """A plaintext client, or one that does not trust the server's CA, gets `Unavailable` naming
    the address (and, with NO_RETRY, at once)."""
    ca = None if trust == "plaintext" else tls_files.other_ca
    address = tls_teacher.grpc_address if transport == "grpc" else tls_teacher.http_address
    with TeacherClient(
        address, transport=transport, token=FILE_TOKEN, tls_ca_file=ca, retry=NO_RETRY, timeout=10
    ) as client:
        with pytest.raises(Unavailable) as info:
            client.soft_targets(GOOD)
    assert address in str(info.value)


PATH_LIKE_MODELS = [
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    "teacher_server.models:MultiTaskCNN",
    "teacher_server.models.multitask_cnn.MultiTaskCNN",
    "os:system",
    "mnist-multitask/../mnist-multitask",
    "file:///etc/passwd",
]


def test_path_like_model_names_are_not_found(
    stub: pb_grpc.TeacherServiceStub, http: httpx.Client
) -> None:
    auth = (("authorization", f"Bearer {TOKEN}"),)
    headers = {"authorization": f"Bearer {TOKEN}"}
    admin = (("authorization", f"Bearer {OPERATOR}"),)
    before = stub.GetSoftTargets(good_request(), timeout=TIMEOUT, metadata=auth)
    for model in PATH_LIKE_MODELS:
        for call in (
            lambda m=model: stub.GetSoftTargets(
                good_request(model=m), timeout=TIMEOUT, metadata=auth
            ),
            lambda m=model: stub.GetModelInfo(
                pb.GetModelInfoRequest(model=m), timeout=TIMEOUT, metadata=auth
            ),
            # The admin reload looks the name up among the repository's folder names.
            lambda m=model: stub.ReloadModel(
                pb.ReloadModelRequest(model=m), timeout=TIMEOUT, metadata=admin
            ),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.NOT_FOUND, (model, info.value)
            assert dict(info.value.trailing_metadata())[GRPC_FIELD_KEY] == "model"
        # One path segment, every '/' and '.' escaped (httpx would resolve '..' segments).
        quoted = urllib.parse.quote(model, safe="").replace(".", "%2E")
        for response in (
            http.get(f"/v1/models/{quoted}", headers=headers),
            http.post(
                f"/v1/models/{quoted}/soft-targets",
                json={"inputs": GOOD.tolist()},
                headers=headers,
            ),
            http.post(f"/v1/models/{quoted}/reload", headers=dict(admin)),
        ):
            assert response.status_code == 404, (model, response.text)
            assert response.json()["error"]["code"] == "NOT_FOUND"
    after = stub.GetSoftTargets(good_request(), timeout=TIMEOUT, metadata=auth)
    assert after.SerializeToString(deterministic=True) == before.SerializeToString(
        deterministic=True
    )


class _Marker:
    """Unpickling this would create a file: proof that the server never unpickles."""

    path = ""

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_pickles_are_just_bytes(
    stub: pb_grpc.TeacherServiceStub, http: httpx.Client, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    _Marker.path = str(marker)
    payload = pickle.dumps(_Marker())
    auth = (("authorization", f"Bearer {TOKEN}"),)
    headers = {"authorization": f"Bearer {TOKEN}"}
    # As tensor bytes: uint8 of the payload's length, the wrong shape for the model.
    tensor = pb.Tensor(dtype=pb.UINT8, shape=[1, len(payload)], data=payload)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetSoftTargets(good_request(inputs=tensor), timeout=TIMEOUT, metadata=auth)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for content_type in ("application/python-pickle", "application/octet-stream"):
        response = http.post(
            f"/v1/models/{MODEL}/soft-targets",
            content=payload,
            headers={**headers, "content-type": content_type},
        )
        assert response.status_code == 400
        assert response.json()["error"]["field"] == "content-type"
    for content_type in ("application/x-protobuf", "application/json"):
        response = http.post(
            f"/v1/models/{MODEL}/soft-targets",
            content=payload,
            headers={**headers, "content-type": content_type},
        )
        assert response.status_code == 400, response.content
    assert not marker.exists()
    assert stub.GetSoftTargets(good_request(), timeout=TIMEOUT, metadata=auth).outputs
