"""The same teachers behind KServe's Python ModelServer, for a side-by-side comparison.

Runs in the separate KServe virtual environment (`bench/.venv-kserve`, made by
`python -m bench.kserve_env`), never in the project's own:

    bench/.venv-kserve/bin/python -m bench.kserve_teacher \
        --model-dir /tmp/mr/mnist-multitask --model-dir /tmp/light/light-digits \
        --http_port 8080 --grpc_port 8081 --enable_latency_logging false

Each `--model-dir` is one of our model repository folders (`config.json` + `model.safetensors`);
the architecture is imported by the same `package.module:Class` path (only under
`teacher_server.models.` or `bench.`), with the repository root put on `sys.path`. A request is an
Open Inference Protocol (v2) request with one FP32 input `inputs` of shape [N, *input_shape] and an
optional request parameter `temperature` (number, or string over gRPC, whose parameters have no
double type; default 1). The answer has one FP32 output per task, [N, classes]: the softmax of
logits / T, computed as our engine does (float64 softmax, rounded to float32 once).

`predict` is synchronous, as in KServe's own examples: it runs on the server's event loop, one
request at a time; KServe's Python server has no dynamic batcher of its own. Both servers bind
127.0.0.1 only (KServe hard-codes all interfaces; this file rebinds them to loopback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import types
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ALLOWED_PREFIXES = ("teacher_server.models.", "bench.")
LOOPBACK = "127.0.0.1"


def import_architecture(path: str) -> type[torch.nn.Module]:
    """The `package.module:Class` named by a config.json, if under an allowed prefix."""
    module_name, _, class_name = path.partition(":")
    if not module_name.startswith(ALLOWED_PREFIXES):
        raise ValueError(f"architecture {path!r} is not under {ALLOWED_PREFIXES}")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TypeError(f"{path!r} is not an nn.Module")
    return cls


def load_folder(folder: Path) -> tuple[dict[str, Any], torch.nn.Module]:
    """(config, module in eval mode) of one model repository folder."""
    config = json.loads((folder / "config.json").read_text())
    tasks = {task["name"]: len(task["class_names"]) for task in config["tasks"]}
    module = import_architecture(config["architecture"])(tasks=tasks, **config.get("kwargs", {}))
    module.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return config, module.eval()


def temperature_of(parameters: Any) -> float:
    """The request's `temperature` parameter: a JSON number (REST) or an InferParameter (gRPC)."""
    if not parameters or "temperature" not in parameters:
        return 1.0
    value = parameters["temperature"]
    if hasattr(value, "HasField"):  # gRPC InferParameter: string or int64
        if value.HasField("string_param"):
            return float(value.string_param)
        if value.HasField("int64_param"):
            return float(value.int64_param)
        raise ValueError("temperature: expected a string or int64 parameter")
    return float(value)


def make_model_class() -> type:
    """The kserve.Model subclass (built here so importing this file needs no kserve)."""
    import kserve
    from kserve import InferOutput, InferRequest, InferResponse

    class TeacherModel(kserve.Model):  # type: ignore[misc]
        def __init__(self, folder: Path) -> None:
            self.folder = folder
            self.config: dict[str, Any] = json.loads((folder / "config.json").read_text())
            super().__init__(self.config["name"])
            self.module: Any = None  # the architecture's nn.Module once loaded
            self.load()

        def load(self) -> bool:
            _, self.module = load_folder(self.folder)
            self.ready = True
            return True

        def predict(
            self, payload: InferRequest, headers: dict[str, str] | None = None
        ) -> InferResponse:
            inputs = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
            temperature = temperature_of(payload.parameters)
            with torch.inference_mode():
                features = self.module.forward_features(torch.from_numpy(inputs))["features"]
                outputs = []
                for task in self.config["tasks"]:
                    logits = self.module.heads[task["name"]](features).double() / temperature
                    probs = torch.softmax(logits, dim=1).float().numpy()
                    output = InferOutput(
                        name=task["name"], shape=list(probs.shape), datatype="FP32"
                    )
                    # raw bytes for gRPC raw-input requests, a JSON list for REST (passing the
                    # array as `data=` fails in KServe 0.21's to_grpc: ndarray truth value)
                    output.set_data_from_numpy(probs, binary_data=payload.use_binary_outputs)
                    outputs.append(output)
            return InferResponse(
                response_id=payload.id or "",
                model_name=self.name,
                infer_outputs=outputs,
                use_binary_outputs=payload.use_binary_outputs,
            )

    return TeacherModel


def bind_loopback_only() -> None:
    """KServe binds 0.0.0.0 (REST) and [::] (gRPC); make both 127.0.0.1."""
    import kserve.protocol.grpc.server as grpc_server
    import kserve.protocol.rest.server as rest_server

    rest_init = rest_server.RESTServer.__init__

    def loopback_rest_init(self: Any, *args: Any, **kwargs: Any) -> None:
        rest_init(self, *args, **kwargs)
        self.config.host = LOOPBACK

    rest_server.RESTServer.__init__ = loopback_rest_init  # type: ignore[method-assign]
    real_server = grpc_server.aio.server

    def loopback_server(*args: Any, **kwargs: Any) -> Any:
        server = real_server(*args, **kwargs)
        add_port = server.add_insecure_port
        server.add_insecure_port = lambda address: add_port(address.replace("[::]", LOOPBACK))
        return server

    grpc_server.aio = types.SimpleNamespace(server=loopback_server)  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, action="append", required=True)
    parser.add_argument(
        "--request-logs",
        action="store_true",
        help="keep KServe's per-request access and timing log lines (off: WARNING level)",
    )
    args, _ = parser.parse_known_args()  # the rest are kserve.ModelServer's own flags
    import kserve

    bind_loopback_only()
    model_class = make_model_class()
    models = [model_class(folder) for folder in args.model_dir]
    server = kserve.ModelServer()  # configures logging
    if not args.request_logs:
        for name in ("kserve", "kserve.trace", "uvicorn.access"):
            logging.getLogger(name).setLevel(logging.WARNING)
    server.start(models)


if __name__ == "__main__":
    main()
