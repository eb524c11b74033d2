"""Stands in for the Azure Functions host, which cannot run here (Core Tools download their binaries at install).

The host talks to a Python worker over gRPC on loopback: it serves `FunctionRpc.EventStream`, starts the worker
process with its address on the command line, and sends requests down the stream. The Service Bus extension's
settlement client (`ServiceBusMessageActions`) calls back the host's `Settlement` service at the same address
(the extension reads `--host`, `--port` and `--functions-grpc-max-message-length` from the worker's command line),
so both services are served here, on one port, and every settlement call is recorded.

The messages are those of the host's protocol (stubs compiled by tests/worker/toolchain.py from the worker's own
FunctionRpc descriptors), in the order the host sends them for an app indexed by the worker: WorkerInitRequest,
FunctionsMetadataRequest, FunctionLoadRequest per function, then InvocationRequests.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc  # type: ignore[import-untyped]
from azurefunctions.extensions.bindings.protos import settlement_pb2_grpc

from tests.worker import toolchain

empty_pb2 = importlib.import_module("google.protobuf.empty_pb2")
WORKER_SCRIPT = Path(__file__).with_name("worker.py")
MAX_MESSAGE_LENGTH = 2_147_483_647  # what the host passes
HOST_VERSION = "4.1040.0"
SERVICE_BUS_SOURCE = "AzureServiceBusReceivedMessage"  # model_binding_data.source for a received message


def load_stubs() -> Stubs:
    """The FunctionRpc message classes and service helpers, for this interpreter's protobuf and grpcio."""
    path = str(toolchain.ensure_host_stubs())
    if path not in sys.path:
        sys.path.append(path)
    rpc = importlib.import_module(f"{toolchain.STUBS_PACKAGE}.FunctionRpc_pb2")
    rpc_grpc = importlib.import_module(f"{toolchain.STUBS_PACKAGE}.FunctionRpc_pb2_grpc")
    return Stubs(rpc, rpc_grpc)


@dataclass(frozen=True)
class Stubs:
    rpc: Any  # FunctionRpc_pb2: the messages
    rpc_grpc: Any  # FunctionRpc_pb2_grpc: the service


@dataclass(frozen=True)
class Settlement:
    """One call the worker made to the host's Settlement service."""

    kind: str  # complete, abandon, deadletter, defer
    lock_token: str
    reason: str | None = None
    description: str | None = None


class _SettlementService(settlement_pb2_grpc.SettlementServicer):  # type: ignore[misc]
    def __init__(self, calls: list[Settlement], lock: threading.Lock) -> None:
        self.calls = calls
        self.lock = lock

    def _record(self, settlement: Settlement) -> Any:
        with self.lock:
            self.calls.append(settlement)
        return empty_pb2.Empty()

    # The method names are the service's (settlement.proto).
    def Complete(self, request: Any, context: Any) -> Any:
        return self._record(Settlement("complete", request.locktoken))

    def Abandon(self, request: Any, context: Any) -> Any:
        return self._record(Settlement("abandon", request.locktoken))

    def Defer(self, request: Any, context: Any) -> Any:
        return self._record(Settlement("defer", request.locktoken))

    def Deadletter(self, request: Any, context: Any) -> Any:
        reason = request.deadletterReason.value if request.HasField("deadletterReason") else None
        description = (request.deadletterErrorDescription.value
                       if request.HasField("deadletterErrorDescription") else None)
        return self._record(Settlement("deadletter", request.locktoken, reason, description))


_STOP = object()


@dataclass
class _Stream:
    """The one EventStream a worker opens: what the host sends, what it has received."""

    outbox: queue.Queue[Any] = field(default_factory=queue.Queue)
    inbox: queue.Queue[Any] = field(default_factory=queue.Queue)


class _FunctionRpcService:
    def __init__(self, stream: _Stream) -> None:
        self.stream = stream

    def EventStream(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        def read() -> None:
            try:
                for message in requests:
                    self.stream.inbox.put(message)
            except grpc.RpcError:
                pass  # the worker went away
            finally:
                self.stream.inbox.put(_STOP)

        threading.Thread(target=read, name="host-stream-reader", daemon=True).start()
        while (message := self.stream.outbox.get()) is not _STOP:
            yield message


class WorkerFailed(AssertionError):
    """The worker did not answer as the host expects; the message carries its log and output."""


class EmulatedHost:
    """The Functions host's side of one worker process: start, requests, answers, settlements."""

    def __init__(self, stubs: Stubs, log_dir: Path, *, timeout: float = 60.0) -> None:
        self.stubs = stubs
        self.rpc = stubs.rpc
        self.log_dir = log_dir
        self.timeout = timeout
        self.settlements: list[Settlement] = []
        self.logs: list[str] = []
        self._lock = threading.Lock()
        self._stream = _Stream()
        self._request_id = uuid.uuid4().hex
        self._worker_id = str(uuid.uuid4())
        self._server: Any = None
        self._process: subprocess.Popen[bytes] | None = None
        self._output: Path = log_dir / "worker-output.log"
        self.port = 0

    # ---- life cycle ----

    def __enter__(self) -> Self:
        options = [("grpc.max_send_message_length", MAX_MESSAGE_LENGTH),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_LENGTH)]
        self._server = grpc.server(ThreadPoolExecutor(max_workers=8, thread_name_prefix="host-grpc"),
                                   options=options)
        self.stubs.rpc_grpc.add_FunctionRpcServicer_to_server(_FunctionRpcService(self._stream), self._server)
        settlement_pb2_grpc.add_SettlementServicer_to_server(_SettlementService(self.settlements, self._lock),
                                                             self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stream.outbox.put(_STOP)
        if self._process is not None:
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        if self._server is not None:
            self._server.stop(grace=None).wait()

    def start_worker(self, chain: toolchain.Toolchain, env: Mapping[str, str]) -> None:
        """Start the worker as the host does: the language's executable, the worker script, the host's address.
        `env` is the worker's whole environment (the app settings and what the platform sets)."""
        host, port, size = "127.0.0.1", str(self.port), str(MAX_MESSAGE_LENGTH)
        args = [str(chain.python), str(WORKER_SCRIPT), "--host", host, "--port", port,
                "--workerId", self._worker_id, "--requestId", self._request_id, "--grpcMaxMessageLength", size,
                "--functions-uri", f"http://{host}:{port}/", "--functions-worker-id", self._worker_id,
                "--functions-request-id", self._request_id, "--functions-grpc-max-message-length", size,
                "--bundle", str(chain.bundle)]
        with self._output.open("wb") as output:
            self._process = subprocess.Popen(args, env=dict(env), cwd=toolchain.REPO_ROOT,
                                             stdout=output, stderr=subprocess.STDOUT)
        started = self.expect("start_stream")
        assert started.start_stream.worker_id == self._worker_id

    # ---- the stream ----

    def send(self, **content: Any) -> None:
        self._stream.outbox.put(self.rpc.StreamingMessage(request_id=self._request_id, **content))

    def expect(self, content: str, timeout: float | None = None) -> Any:
        """The next message of kind `content` from the worker; logs on the way are kept in `self.logs`."""
        limit = timeout or self.timeout
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self._stream.inbox.get(timeout=left)
            except queue.Empty:
                break
            if message is _STOP:
                raise self.failure(f"the worker closed the stream before sending {content}")
            kind = message.WhichOneof("content")
            if kind == "rpc_log":
                self.logs.append(f"[{message.rpc_log.category}] {message.rpc_log.message}")
            elif kind == content:
                return message
        raise self.failure(f"no {content} within {limit:.0f} s")

    def failure(self, what: str) -> WorkerFailed:
        output = self._output.read_text(errors="replace") if self._output.exists() else ""
        code = self._process.poll() if self._process is not None else None
        return WorkerFailed(f"{what} (worker exit code {code})\n--- worker log ---\n" + "\n".join(self.logs[-60:])
                            + "\n--- worker output ---\n" + "\n".join(output.splitlines()[-60:]))

    # ---- the requests, in the host's order ----

    def initialize(self, app_dir: Path, worker_dir: Path) -> Any:
        self.send(worker_init_request=self.rpc.WorkerInitRequest(
            host_version=HOST_VERSION, function_app_directory=str(app_dir), worker_directory=str(worker_dir),
            capabilities={}, log_categories={}))
        return self.expect("worker_init_response").worker_init_response

    def functions_metadata(self, app_dir: Path) -> Any:
        self.send(functions_metadata_request=self.rpc.FunctionsMetadataRequest(function_app_directory=str(app_dir)))
        return self.expect("function_metadata_response").function_metadata_response

    def load(self, metadata: Any) -> Any:
        self.send(function_load_request=self.rpc.FunctionLoadRequest(function_id=metadata.function_id,
                                                                     metadata=metadata))
        return self.expect("function_load_response").function_load_response

    def invoke_service_bus_batch(self, function_id: str, parameter: str, contents: Sequence[bytes],
                                 message_ids: Sequence[str]) -> Any:
        """One invocation of a batch trigger with SDK types: the messages as a CollectionModelBindingData, one
        ModelBindingData (lock token + AMQP message) per message, and the host's trigger metadata arrays."""
        rpc = self.rpc
        batch = rpc.CollectionModelBindingData(model_binding_data=[
            rpc.ModelBindingData(version="1.0", source=SERVICE_BUS_SOURCE, content_type="application/octet-stream",
                                 content=content) for content in contents])
        metadata = {"MessageIdArray": rpc.TypedData(json=_json_list(message_ids)),
                    "DeliveryCountArray": rpc.TypedData(json=_json_list([1] * len(contents)))}
        invocation_id = str(uuid.uuid4())
        self.send(invocation_request=rpc.InvocationRequest(
            invocation_id=invocation_id, function_id=function_id, trigger_metadata=metadata,
            input_data=[rpc.ParameterBinding(name=parameter, data=rpc.TypedData(collection_model_binding_data=batch))]))
        response = self.expect("invocation_response").invocation_response
        assert response.invocation_id == invocation_id
        return response

    def settlements_snapshot(self) -> list[Settlement]:
        with self._lock:
            return list(self.settlements)


def _json_list(values: Sequence[object]) -> str:
    return json.dumps(list(values))


def worker_environment(settings: Mapping[str, str], *, drop: Sequence[str] = ()) -> dict[str, str]:
    """The worker's environment: this process's, without what would leak into the worker's Python (a venv,
    PYTHONPATH) or the app's settings (`drop`), plus `settings` and what the host sets for every worker."""
    env = {k: v for k, v in os.environ.items()
           if k not in drop and k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}}
    env.update({"AzureWebJobsScriptRoot": str(toolchain.REPO_ROOT), "FUNCTIONS_WORKER_RUNTIME": "python",
                "PYTHONUNBUFFERED": "1"})
    env.update(settings)
    return env
