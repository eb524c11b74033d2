"""Stands in for the Python worker's own process: its entry point, dependency manager and gRPC dispatcher.

Those three ship inside the Functions host (`workers/python/<version>/<OS>/<arch>/worker.py`), not on PyPI. What
loads and runs the app is the worker *library*, `azure-functions-runtime`, which that dispatcher drives; this module
does what the entry point and dispatcher do around it, and nothing the library does:

* sys.path as the host's `worker.py` sets it for local development (Core Tools): the worker bundle first (its
  grpcio, protobuf, protos and library), the app's packages (its venv) next, the app directory last;
* the dependency manager (azure_functions_worker's for 3.11/3.12, the proxy worker's for 3.13). With isolation, the
  bundle is put ahead of the app's packages at start, so the worker runs on its own grpcio/protobuf; at
  WorkerInitRequest the app's packages go first again and every module loaded from the bundle is dropped from
  sys.modules, so the app imports its own copies. Isolation is always on from Python 3.13; on 3.11/3.12 only with
  the app setting PYTHON_ISOLATE_WORKER_DEPENDENCIES (the worker's default is off). Without it the bundle's
  grpcio/protobuf stay loaded, as in a worker started before its app was mounted (Flex Consumption placeholders);
* the gRPC stream: StartStream, then each request handed to the library's handler as a `WorkerRequest` carrying
  the protos and the host address, as the proxy worker does; log records go to the host as RpcLog messages.

Run by tests/worker/host.py with the app's venv python and the host's command line, plus `--bundle DIR`. Only the
standard library is imported before the bundle is on sys.path.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import queue
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

STUBS_PACKAGE = "functions_rpc"  # the generated FunctionRpc stubs, inside the bundle
ISOLATE_SETTING = "PYTHON_ISOLATE_WORKER_DEPENDENCIES"
SCRIPT_ROOT_SETTING = "AzureWebJobsScriptRoot"
CONNECT_TIMEOUT_SECONDS = 5.0
STOP = object()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Stand-in for the Python worker's process")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workerId", dest="worker_id", required=True)
    parser.add_argument("--requestId", dest="request_id", required=True)
    parser.add_argument("--grpcMaxMessageLength", dest="max_message_length", type=int, default=-1)
    parser.add_argument("--bundle", type=Path, required=True)
    args, _ = parser.parse_known_args(argv)  # the host also passes --functions-* forms of the same values
    return args


def isolation_enabled() -> bool:
    if sys.version_info >= (3, 13):
        return True
    return os.environ.get(ISOLATE_SETTING, "").strip().lower() in {"1", "true", "t", "yes", "y"}


class Dependencies:
    """The worker's dependency manager: which of the bundle and the app's packages Python imports from."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = str(bundle)
        self.app_dir = os.environ.get(SCRIPT_ROOT_SETTING, "")
        # The app's packages: on sys.path, under the app directory (as .python_packages is in Azure).
        self.app_packages = next((p for p in sys.path if self.app_dir and p.startswith(self.app_dir)
                                  and "site-packages" in p), "")

    def use_worker_dependencies(self) -> None:
        self._remove(self.app_packages)
        self._remove(self.app_dir)
        self._add(self.bundle, first=True)

    def prioritize_app_dependencies(self) -> None:
        self._remove(self.bundle)
        self._add(self.app_packages, first=True)
        self._add(self.bundle, first=False)  # kept, last but one, as the worker keeps it for very old apps
        self._add(self.app_dir, first=False)

    def _add(self, path: str, *, first: bool) -> None:
        if path and path not in sys.path:
            if first:
                sys.path.insert(0, path)
            else:
                sys.path.append(path)
            self._forget(path)

    def _remove(self, path: str) -> None:
        if path:
            sys.path[:] = [p for p in sys.path if p != path]
            self._forget(path)

    @staticmethod
    def _forget(path: str) -> None:
        """Drop the import caches of `path`: modules loaded from it are imported afresh from the new order (objects
        already holding them, like the worker's own gRPC channel, keep working on the old ones)."""
        sys.path_importer_cache.pop(path, None)
        for name, module in list(sys.modules.items()):
            if name == "__main__" or name.startswith(STUBS_PACKAGE) or not isinstance(module, ModuleType):
                continue
            try:
                where = set(getattr(module, "__path__", None) or ())
                if getattr(module, "__file__", None):
                    where.add(module.__file__)
            except Exception:  # a namespace whose parent is gone already: kept, as the worker keeps it
                continue
            if any(str(p).startswith(path) for p in where):
                sys.modules.pop(name, None)


def load_protos() -> Any:
    """The `protos` namespace the library builds its responses from (the proxy worker's `protos` package)."""
    rpc = importlib.import_module(f"{STUBS_PACKAGE}.FunctionRpc_pb2")
    rpc_grpc = importlib.import_module(f"{STUBS_PACKAGE}.FunctionRpc_pb2_grpc")
    nullable = importlib.import_module(f"{STUBS_PACKAGE}.shared.NullableTypes_pb2")
    names: dict[str, Any] = {}
    for module in (nullable, rpc, rpc_grpc):
        names.update({name: getattr(module, name) for name in dir(module) if not name.startswith("_")})
    return SimpleNamespace(**names)


@dataclass
class WorkerRequest:
    """What the proxy worker hands each library handler."""

    name: str
    request: Any
    properties: dict[str, Any] | None = None


class RpcLogHandler(logging.Handler):
    """Sends each log record to the host, as the worker does once the stream is open."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        super().__init__(logging.INFO)
        self.dispatcher = dispatcher

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.dispatcher.log(record, self.format(record))
        except Exception:  # a log record must never take the worker down
            self.handleError(record)


class Dispatcher:
    def __init__(self, args: argparse.Namespace, deps: Dependencies, grpc: ModuleType, protos: Any) -> None:
        self.args = args
        self.deps = deps
        self.grpc = grpc
        self.protos = protos
        self.outbox: queue.Queue[Any] = queue.Queue()
        self.loop = asyncio.new_event_loop()
        self.library: Any = None

    def log(self, record: logging.LogRecord, text: str) -> None:
        p = self.protos
        level = (p.RpcLog.Error if record.levelno >= logging.ERROR else
                 p.RpcLog.Warning if record.levelno >= logging.WARNING else p.RpcLog.Information)
        self.outbox.put(p.StreamingMessage(request_id=self.args.request_id, rpc_log=p.RpcLog(
            level=level, message=text, category=record.name)))

    def run(self) -> None:
        options = []
        if self.args.max_message_length > 0:
            options = [("grpc.max_receive_message_length", self.args.max_message_length),
                       ("grpc.max_send_message_length", self.args.max_message_length)]
        channel = self.grpc.insecure_channel(f"{self.args.host}:{self.args.port}", options)
        self.grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_SECONDS)
        stub = self.protos.FunctionRpcStub(channel)
        self.outbox.put(self.protos.StreamingMessage(request_id=self.args.request_id,
                                                     start_stream=self.protos.StartStream(
                                                         worker_id=self.args.worker_id)))
        stream = stub.EventStream(iter(self.outbox.get, STOP))
        threading.Thread(target=self._read, args=(stream,), name="grpc-reader", daemon=True).start()
        logging.getLogger().addHandler(RpcLogHandler(self))
        logging.getLogger().setLevel(logging.INFO)
        self.loop.run_forever()
        self.outbox.put(STOP)
        channel.close()

    def _read(self, stream: Any) -> None:
        try:
            for request in stream:
                self.loop.call_soon_threadsafe(self.loop.create_task, self._dispatch(request))
        except Exception as exc:  # the host closed the stream: the worker's life is over
            print(f"worker: stream ended: {exc!r}", file=sys.stderr, flush=True)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)

    async def _dispatch(self, request: Any) -> None:
        kind = request.WhichOneof("content")
        handlers = {"worker_init_request": self._init, "functions_metadata_request": self._metadata,
                    "function_load_request": self._load, "invocation_request": self._invoke,
                    "worker_status_request": self._status}
        handler = handlers.get(kind)
        if handler is None:
            logging.getLogger("worker").warning("unhandled StreamingMessage content %s", kind)
            return
        try:
            self.outbox.put(await handler(request))
        except Exception:
            # The real dispatcher only logs it and the host waits for its timeout; ending the stream fails faster.
            logging.getLogger("worker").error("worker: %s failed:\n%s", kind, traceback.format_exc())
            self.loop.stop()

    def _wrap(self, name: str, request: Any) -> WorkerRequest:
        return WorkerRequest(name, request, {"protos": self.protos, "host": self.args.host})

    async def _init(self, request: Any) -> Any:
        if isolation_enabled():
            self.deps.prioritize_app_dependencies()
        # Imported here, after the dependency switch, as the proxy worker does: from Python 3.13 an app that pins
        # azure-functions-runtime gets its own copy.
        self.library = importlib.import_module("azure_functions_runtime")
        logging.getLogger("worker").info("library %s from %s; isolation %s", self.library.version.VERSION,
                                         self.library.__file__, isolation_enabled())
        self.library.start_threadpool_executor()
        response = await self.library.worker_init_request(self._wrap("WorkerInitRequest", request))
        # Which copies each side runs on, now that the app is imported: the worker's channel on the grpcio it
        # started with, the app on whatever `import grpc` / `import google.protobuf` now give.
        app = {name: getattr(sys.modules.get(name), "__version__", "-") for name in ("grpc", "google.protobuf")}
        logging.getLogger("worker").info("versions: worker grpcio=%s; app grpcio=%s protobuf=%s",
                                         self.grpc.__version__, app["grpc"], app["google.protobuf"])
        return self.protos.StreamingMessage(request_id=self.args.request_id, worker_init_response=response)

    async def _metadata(self, request: Any) -> Any:
        response = await self.library.functions_metadata_request(self._wrap("WorkerMetadataRequest", request))
        return self.protos.StreamingMessage(request_id=request.request_id, function_metadata_response=response)

    async def _load(self, request: Any) -> Any:
        response = await self.library.function_load_request(self._wrap("FunctionLoadRequest", request))
        return self.protos.StreamingMessage(request_id=self.args.request_id, function_load_response=response)

    async def _invoke(self, request: Any) -> Any:
        response = await self.library.invocation_request(self._wrap("FunctionInvocationRequest", request))
        return self.protos.StreamingMessage(request_id=self.args.request_id, invocation_response=response)

    async def _status(self, request: Any) -> Any:
        return self.protos.StreamingMessage(request_id=request.request_id,
                                            worker_status_response=self.protos.WorkerStatusResponse())


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    # The host runs worker.py from inside the bundle, so sys.path[0] is the bundle; this file lives elsewhere.
    sys.path[0] = str(args.bundle)
    script_root = os.environ.get(SCRIPT_ROOT_SETTING)
    if script_root:
        sys.path.append(script_root)
    deps = Dependencies(args.bundle)
    if isolation_enabled():
        deps.use_worker_dependencies()
    grpc = importlib.import_module("grpc")
    protos = load_protos()
    Dispatcher(args, deps, grpc, protos).run()


if __name__ == "__main__":
    main(sys.argv[1:])
