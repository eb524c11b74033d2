"""Why the app setting PYTHON_ISOLATE_WORKER_DEPENDENCIES=1 is needed, shown on the imports themselves.

The Service Bus extension (1.0.0b2) imports code generated for protobuf 6.31.1 and grpcio 1.74, which checks the
loaded versions at import time. The production worker for Python 3.11/3.12 bundles protobuf 5.29 and grpcio 1.70
and, without isolation, keeps its copies loaded, so function_app.py's import of the extension fails. With isolation
the worker's dependency manager puts the app's packages first and drops the modules it loaded from its bundle
(tests/worker/worker.py's `Dependencies`, after azure_functions_worker's DependencyManager), and the import works.

Each case runs in a fresh interpreter of the app's venv, with the worker bundle built by tests/worker/toolchain.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.worker import toolchain
from tests.worker.host import worker_environment

WORKER_SCRIPT = Path(__file__).with_name("worker.py")

PROBE = """
import importlib.util, json, os, sys
case, bundle, worker_script = sys.argv[1:4]
if case == "worker grpcio first":
    import google.protobuf  # the app's protobuf, then the worker's grpcio
if case == "isolated":
    spec = importlib.util.spec_from_file_location("stand_in_worker", worker_script)
    worker = sys.modules["stand_in_worker"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    dependencies = worker.Dependencies(bundle)
    dependencies.use_worker_dependencies()  # at start: the worker runs on what it bundles
else:
    sys.path.insert(0, bundle)
import grpc
import google.protobuf  # the worker's, unless the app's was imported first
loaded = {"worker grpcio": grpc.__version__, "worker protobuf": google.protobuf.__version__}
if case == "isolated":
    dependencies.prioritize_app_dependencies()  # at WorkerInitRequest
try:
    import azurefunctions.extensions.bindings.servicebus
except Exception as exc:
    print(json.dumps({**loaded, "error": f"{type(exc).__module__}.{type(exc).__name__}: {exc}"}))
else:
    print(json.dumps({**loaded, "app grpcio": sys.modules["grpc"].__version__,
                      "app protobuf": sys.modules["google.protobuf"].__version__}))
"""


def probe(chain: toolchain.Toolchain, case: str) -> dict[str, Any]:
    proc = subprocess.run([str(chain.python), "-c", PROBE, case, str(chain.bundle), str(WORKER_SCRIPT)],
                          capture_output=True, text=True, timeout=120, check=False, env=worker_environment({}),
                          cwd=toolchain.REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_with_the_workers_protobuf_loaded_the_extension_fails(chain: toolchain.Toolchain) -> None:
    result = probe(chain, "worker first")
    assert result["worker grpcio"].startswith("1.70.") and result["worker protobuf"].startswith("5.29.")
    error = result["error"]
    assert error.startswith("google.protobuf.runtime_version.VersionError:"), error
    assert "gencode 6.31.1 runtime 5.29." in error


def test_with_the_workers_grpcio_loaded_the_extension_fails(chain: toolchain.Toolchain) -> None:
    result = probe(chain, "worker grpcio first")
    assert result["worker grpcio"].startswith("1.70.") and not result["worker protobuf"].startswith("5.29.")
    assert result["error"].startswith("builtins.RuntimeError:"), result["error"]
    assert "depends on grpcio>=1.74.0" in result["error"]


def test_loaded_the_way_isolation_does_the_extension_imports(chain: toolchain.Toolchain) -> None:
    result = probe(chain, "isolated")
    assert "error" not in result, result["error"]
    assert result["worker grpcio"].startswith("1.70.") and result["worker protobuf"].startswith("5.29.")
    assert not result["app grpcio"].startswith("1.70.") and result["app protobuf"].startswith("6.")
