"""What the real-worker tests run with: fetched from PyPI with pip, built once under build/worker/, then reused.

* The worker library `azure-functions-runtime`, what the Functions host runs for Python 3.13; its indexing, load
  checks, binding decoding and invocation are those of the 3.11/3.12 worker. It goes into each Python version's
  *worker bundle* (`pip install --no-deps --ignore-requires-python --target`), next to the protobuf and grpcio the
  production worker for 3.11/3.12 bundles and the worker's FunctionRpc stubs: the worker's own packages, as the
  host's `workers/python/<version>/<OS>/<arch>` holds them.
* The host's gRPC protocol: the `FunctionRpc` descriptors in the `azure-functions-runtime-v1` wheel's
  `tests/protos`. The wheel is downloaded and read, never installed (it ships a top-level `tests` package). They are
  compiled with grpcio-tools twice: for the emulated host (this interpreter's protobuf) and for the worker (protobuf
  5.29, with the grpcio-tools 1.70 the worker is built with).
* Per installed Python 3.11, 3.12 and 3.13, a venv with the app's requirements.txt and nothing else: the app's
  packages, as `.python_packages` holds them in Azure, the app itself included (its `.`: built and compiled by
  mypyc in an isolated build, as the remote build does, under a minute per version; again when the app changes).

Cold, this downloads about 30 MB and takes about a minute per Python version; warm, it only checks stamps.
`python -m tests.worker.toolchain` builds it for every installed version (`make unit` does, before pytest).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

if sys.platform != "win32":
    import fcntl

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = REPO_ROOT / "build" / "worker"
REQUIREMENTS = REPO_ROOT / "requirements.txt"
APP_DISTRIBUTION = "dataverse-fhir-writeback"  # pyproject.toml's name: requirements.txt's `.`

SUPPORTED = ((3, 11), (3, 12), (3, 13))  # what Flex Consumption offers for new apps
RUNTIME = "azure-functions-runtime==1.3.0"  # the worker library
PROTOS_WHEEL = "azure-functions-runtime-v1==1.2.0"  # read for its tests/protos only
# What the production worker for 3.11/3.12 bundles (its own pyproject pins), and the protoc it builds its stubs with.
WORKER_PROTOBUF = "protobuf~=5.29.0"
WORKER_GRPCIO = "grpcio~=1.70.0"
WORKER_GRPCIO_TOOLS = "grpcio-tools~=1.70.0"

STUBS_PACKAGE = "functions_rpc"  # the package the generated stubs live in (the wheel's are relative to tests.protos)
PROTO_FILES = {  # proto file → its generated module in the wheel
    "FunctionRpc.proto": "tests/protos/FunctionRpc_pb2.py",
    "identity/ClaimsIdentityRpc.proto": "tests/protos/identity/ClaimsIdentityRpc_pb2.py",
    "shared/NullableTypes.proto": "tests/protos/shared/NullableTypes_pb2.py",
}
STEP_TIMEOUT_SECONDS = 900.0

Version = tuple[int, int]


def label(version: Version) -> str:
    return f"{version[0]}.{version[1]}"


# ---- Python interpreters --------------------------------------------------------------------------------------


def _pyenv_versions() -> Path:
    return Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"


def _probe(candidate: str) -> tuple[Version, Path] | None:
    """The version and real executable of an interpreter that runs (a pyenv shim may exist without its Python) and
    can make a venv (some distributions ship venv/ensurepip separately)."""
    probe = "import sys, venv, ensurepip; print(*sys.version_info[:2], sys.executable)"
    try:
        proc = subprocess.run([candidate, "-c", probe],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    major, minor, executable = proc.stdout.split(maxsplit=2)
    return (int(major), int(minor)), Path(executable.strip())


def search_places() -> str:
    return f"PATH and {_pyenv_versions()}"


def find_interpreters() -> dict[Version, Path]:
    """Each supported Python version installed here → one interpreter of it: PATH first, then pyenv's versions
    folder (newest patch release first), then the interpreter running this."""
    candidates = [path for name in ("python3.13", "python3.12", "python3.11", "python3")
                  if (path := shutil.which(name))]

    def patch_order(folder: Path) -> tuple[int, ...]:
        return tuple(int(part) if part.isdigit() else -1 for part in folder.name.split("."))

    versions = _pyenv_versions()
    if versions.is_dir():
        for folder in sorted(versions.iterdir(), key=patch_order, reverse=True):
            candidates += [str(p) for p in sorted((folder / "bin").glob("python3.1[1-9]"))]
    candidates.append(sys.executable)
    found: dict[Version, Path] = {}
    for candidate in candidates:
        probed = _probe(candidate)
        if probed is not None and probed[0] in SUPPORTED and probed[0] not in found:
            found[probed[0]] = probed[1]
    return dict(sorted(found.items()))


# ---- building blocks ------------------------------------------------------------------------------------------


def _run(args: list[str], what: str) -> None:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=STEP_TIMEOUT_SECONDS,
                              check=False, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{what}: took longer than {exc.timeout:.0f}s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(args)}\n{tail}")


def _pip(python: Path | str, *args: str) -> list[str]:
    return [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet", *args]


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _tree_digest(root: Path) -> str:
    return _digest(*(f"{p.relative_to(root)}:{_digest(p.read_bytes())}" for p in sorted(root.rglob("*.py"))))


def _app_digest() -> str:
    """Every file the app's own package is built from: its sources and its package data (the shipped maps)."""
    package = REPO_ROOT / "writeback"
    return _digest(*(f"{p.relative_to(package)}:{_digest(p.read_bytes())}" for p in sorted(package.rglob("*"))
                     if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".so")))


def _stamp_matches(folder: Path, key: str) -> bool:
    stamp = folder / ".stamp"
    return stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == key


def _write_stamp(folder: Path, key: str) -> None:
    (folder / ".stamp").write_text(key + "\n", encoding="utf-8")


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """One builder at a time, across processes."""
    CACHE.mkdir(parents=True, exist_ok=True)
    if sys.platform == "win32":  # pragma: no cover - no flock; builds are rarely concurrent there
        yield
        return
    with (CACHE / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- the host's protocol ---------------------------------------------------------------------------------------


def _descriptor_set() -> Path:
    """FunctionRpc's file descriptors, read from the wheel's generated modules without running them, renamed under
    STUBS_PACKAGE so the stubs import each other as a package; protoc compiles from this set."""
    descriptor_pb2 = importlib.import_module("google.protobuf.descriptor_pb2")  # this interpreter's protobuf
    folder = CACHE / "protocol"
    out = folder / "FunctionRpc.pb"
    key = _digest(PROTOS_WHEEL, *PROTO_FILES, STUBS_PACKAGE)
    if out.is_file() and _stamp_matches(folder, key):
        return out
    folder.mkdir(parents=True, exist_ok=True)
    downloads = CACHE / "downloads"
    _run(_pip(sys.executable, "download", "--no-deps", "--ignore-requires-python", "--only-binary=:all:",
              "--dest", str(downloads), PROTOS_WHEEL), f"downloading {PROTOS_WHEEL}")
    name, version = PROTOS_WHEEL.split("==")
    [wheel] = downloads.glob(f"{name.replace('-', '_')}-{version}-*.whl")
    files = descriptor_pb2.FileDescriptorSet()
    with zipfile.ZipFile(wheel) as archive:
        for proto, module in PROTO_FILES.items():
            tree = ast.parse(archive.read(module))
            [blob] = [node.args[0].value for node in ast.walk(tree) if isinstance(node, ast.Call)
                      and isinstance(node.func, ast.Attribute) and node.func.attr == "AddSerializedFile"
                      and isinstance(node.args[0], ast.Constant)]
            file = files.file.add()
            file.ParseFromString(blob)
            assert file.name == proto, (file.name, proto)
    well_known = sorted({d for f in files.file for d in f.dependency if d.startswith("google/protobuf/")})
    for dependency in well_known:  # protoc reads imports from the set only: add the well-known types it uses
        compiled = importlib.import_module(dependency.removesuffix(".proto").replace("/", ".") + "_pb2")
        files.file.insert(0, descriptor_pb2.FileDescriptorProto.FromString(compiled.DESCRIPTOR.serialized_pb))
    for file in files.file:
        if file.name in PROTO_FILES:
            file.name = f"{STUBS_PACKAGE}/{file.name}"
        file.dependency[:] = [f"{STUBS_PACKAGE}/{d}" if d in PROTO_FILES else d for d in file.dependency]
    out.write_bytes(files.SerializeToString())
    _write_stamp(folder, key)
    return out


_GENERATE = """
import sys
sys.path[:0] = [p for p in sys.argv[1].split("|") if p]
from grpc_tools import protoc
descriptors, out = sys.argv[2:4]
args = ["protoc", "--descriptor_set_in=" + descriptors, "--python_out=" + out, "--grpc_python_out=" + out]
sys.exit(protoc.main(args + sys.argv[4:]))
"""


def _generate(out: Path, tools: Path | None) -> None:
    descriptors = _descriptor_set()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    protos = [f"{STUBS_PACKAGE}/{name}" for name in PROTO_FILES]
    _run([sys.executable, "-c", _GENERATE, str(tools or ""), str(descriptors), str(out), *protos],
         f"generating FunctionRpc stubs into {out}")
    for folder in [out / STUBS_PACKAGE, *(out / STUBS_PACKAGE).glob("*/")]:
        (folder / "__init__.py").touch()


def host_stubs() -> Path:
    """sys.path entry of STUBS_PACKAGE for this interpreter's protobuf and grpcio (the emulated host)."""
    protobuf = importlib.import_module("google.protobuf")
    out = CACHE / "stubs" / f"host-protobuf{protobuf.__version__}-grpciotools{metadata.version('grpcio-tools')}"
    key = _digest(_descriptor_set().read_bytes())
    if not _stamp_matches(out, key):
        _generate(out, tools=None)
        _write_stamp(out, key)
    return out


def worker_stubs() -> Path:
    """sys.path entry of STUBS_PACKAGE for the worker's protobuf 5.29 (pure Python: one copy for every version)."""
    tools = CACHE / "tools" / f"grpcio-tools-py{label(sys.version_info[:2])}"
    tools_key = _digest(WORKER_GRPCIO_TOOLS)
    if not _stamp_matches(tools, tools_key):
        if tools.exists():
            shutil.rmtree(tools)
        _run(_pip(sys.executable, "install", "--no-deps", "--only-binary=:all:", "--target", str(tools),
                  WORKER_GRPCIO_TOOLS), f"installing {WORKER_GRPCIO_TOOLS}")
        _write_stamp(tools, tools_key)
    out = CACHE / "stubs" / "worker"
    key = _digest(tools_key, _descriptor_set().read_bytes())
    if not _stamp_matches(out, key):
        _generate(out, tools=tools)
        _write_stamp(out, key)
    return out


# ---- per Python version: the app's venv and the worker bundle --------------------------------------------------


@dataclass(frozen=True)
class Toolchain:
    version: Version
    python: Path  # the app's venv python: the worker runs under it
    site_packages: Path  # the app's packages
    bundle: Path  # the worker's packages: library, grpcio/protobuf, FunctionRpc stubs


def _venv(version: Version, interpreter: Path) -> tuple[Path, Path]:
    root = CACHE / f"py{label(version)}"
    venv = root / "venv"
    python = venv / "bin" / "python"
    site_packages = venv / "lib" / f"python{label(version)}" / "site-packages"
    made_key = _digest(str(interpreter))
    if not (python.exists() and _stamp_matches(root, made_key)):
        if venv.exists():
            shutil.rmtree(venv)
        _run([str(interpreter), "-m", "venv", str(venv)], f"creating a Python {label(version)} venv")
        _write_stamp(root, made_key)
    # Re-run pip whenever requirements.txt or the app changes: it installs only what differs, and the app itself
    # (requirements.txt's `.`, compiled by mypyc as Azure's remote build compiles it) afresh.
    key = _digest(REQUIREMENTS.read_bytes(), (REPO_ROOT / "setup.py").read_bytes(),
                  (REPO_ROOT / "pyproject.toml").read_bytes(), _app_digest(), os.environ.get("WRITEBACK_COMPILE", ""))
    if not _stamp_matches(venv, key):
        _run(_pip(python, "uninstall", "--yes", APP_DISTRIBUTION), f"removing the app's old build for Python "
             f"{label(version)}")
        _run(_pip(python, "install", "-r", str(REQUIREMENTS)),
             f"installing requirements.txt (the app compiled) for Python {label(version)}")
        _write_stamp(venv, key)
    return python, site_packages


def _bundle(version: Version, python: Path, stubs: Path) -> Path:
    bundle = CACHE / f"py{label(version)}" / "worker"
    key = _digest(RUNTIME, WORKER_PROTOBUF, WORKER_GRPCIO, _tree_digest(stubs))
    if _stamp_matches(bundle, key):
        return bundle
    if bundle.exists():
        shutil.rmtree(bundle)
    # The venv's own pip picks the wheels built for its Python version.
    _run(_pip(python, "install", "--no-deps", "--ignore-requires-python", "--only-binary=:all:", "--target",
              str(bundle), RUNTIME, WORKER_PROTOBUF, WORKER_GRPCIO),
         f"installing the worker bundle for Python {label(version)}")
    shutil.copytree(stubs / STUBS_PACKAGE, bundle / STUBS_PACKAGE)
    _write_stamp(bundle, key)
    return bundle


def ensure(version: Version, interpreter: Path) -> Toolchain:
    with _lock():
        stubs = worker_stubs()
        python, site_packages = _venv(version, interpreter)
        return Toolchain(version, python, site_packages, _bundle(version, python, stubs))


def ensure_host_stubs() -> Path:
    with _lock():
        return host_stubs()


def main() -> None:
    interpreters = find_interpreters()
    missing = [label(v) for v in SUPPORTED if v not in interpreters]
    print(f"worker tests: Python {', '.join(label(v) for v in interpreters)} found"
          + (f"; {', '.join(missing)} not installed (looked on {search_places()})" if missing else ""))
    ensure_host_stubs()
    for version, interpreter in interpreters.items():
        print(f"worker tests: Python {label(version)} ({interpreter}) ...", end=" ", flush=True)
        started = time.monotonic()
        ensure(version, interpreter)
        print(f"ready in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
