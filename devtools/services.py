"""Launchers for the loopback services used by tests and ``make demo``.

* :class:`FhirDevServer` runs ``fhirdev/server.mjs``: Medplum's FHIR engine (in memory) behind an
  OAuth 2.0 client-credentials token endpoint, at ``http://127.0.0.1:<port>/fhir/R4``.
* :class:`Azurite` runs Microsoft's Table Storage emulator (``azurite-table``) on a free port, and
  can be stopped and started again on the same port with the same data.

Both need the Node packages in ``fhirdev/`` (including a Node 22 runtime from npm, because Medplum
and Azurite need Node 22 while the machine may have Node 20); :func:`ensure_node_packages`
installs them with ``npm ci`` when they are missing or stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import httpx

if sys.platform != "win32":
    import fcntl

REPO_ROOT = Path(__file__).resolve().parent.parent
FHIRDEV_DIR = REPO_ROOT / "fhirdev"
NODE_MODULES = FHIRDEV_DIR / "node_modules"

# The emulator's documented, public development account (not a secret).
AZURITE_ACCOUNT_NAME = "devstoreaccount1"
AZURITE_ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

_STOP_GRACE_SECONDS = 10.0
_NPM_CI_TIMEOUT_SECONDS = 900.0


def node_executable() -> Path:
    """Path of the Node 22 binary installed by the ``node`` npm package in fhirdev/."""
    name = "node.exe" if sys.platform == "win32" else "node"
    return NODE_MODULES / "node" / "bin" / name


def _lockfile_digest() -> str:
    return hashlib.sha256((FHIRDEV_DIR / "package-lock.json").read_bytes()).hexdigest()


def _install_stamp() -> Path:
    return NODE_MODULES / ".fhirdev-installed"


def _direct_dependencies_match() -> bool:
    """Every direct dependency is installed at the version package-lock.json pins."""
    lock = json.loads((FHIRDEV_DIR / "package-lock.json").read_text(encoding="utf-8"))
    packages: dict[str, dict[str, Any]] = lock.get("packages", {})
    for name in packages.get("", {}).get("dependencies", {}):
        manifest = NODE_MODULES / name / "package.json"
        if not manifest.is_file():
            return False
        installed = json.loads(manifest.read_text(encoding="utf-8")).get("version")
        if installed != packages.get(f"node_modules/{name}", {}).get("version"):
            return False
    return True


def _node_packages_stale() -> bool:
    if not node_executable().is_file() or not _direct_dependencies_match():
        return True
    # Our stamp holds the digest of the package-lock.json that the last successful
    # ensure_node_packages() installed, so interrupted installs and transitive changes show.
    stamp = _install_stamp()
    if stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == _lockfile_digest():
        return False
    # Installed by hand with `npm ci`: npm writes its hidden lockfile when an install completes.
    hidden_lockfile = NODE_MODULES / ".package-lock.json"
    lockfile = FHIRDEV_DIR / "package-lock.json"
    return not hidden_lockfile.is_file() or hidden_lockfile.stat().st_mtime < lockfile.stat().st_mtime


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """Serialises ``npm ci`` between processes (e.g. parallel pytest workers)."""
    if sys.platform == "win32":  # pragma: no cover - no flock on Windows; installs are rarely parallel there
        yield
        return
    digest = hashlib.sha256(str(FHIRDEV_DIR).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"fhirdev-npm-ci-{digest}.lock"
    with lock_path.open("w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def ensure_node_packages() -> None:
    """Run ``npm ci`` in fhirdev/ unless node_modules already matches package-lock.json.

    Safe to call from several processes at once (they wait for one install). Raises RuntimeError
    with npm's output if npm is missing or the install fails.
    """
    with _install_lock():
        if not _node_packages_stale():
            return
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(
                "npm was not found on PATH. Install Node.js 20 or newer (npm comes with it); "
                f"then `npm ci` in {FHIRDEV_DIR} sets up the local FHIR server and Azurite."
            )
        try:
            proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=FHIRDEV_DIR,
                capture_output=True,
                text=True,
                timeout=_NPM_CI_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"`npm ci` in {FHIRDEV_DIR} took longer than {exc.timeout:.0f}s") from exc
        if proc.returncode != 0:
            raise RuntimeError(
                f"`npm ci` in {FHIRDEV_DIR} failed with exit code {proc.returncode}:\n"
                + _tail(proc.stdout + proc.stderr)
            )
        if not node_executable().is_file():
            raise RuntimeError(
                f"`npm ci` in {FHIRDEV_DIR} succeeded but {node_executable()} is missing; "
                "the `node` package's install script may have been blocked (see allowScripts "
                "in fhirdev/package.json)."
            )
        _install_stamp().write_text(_lockfile_digest() + "\n", encoding="utf-8")


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class _NodeProcess:
    """A Node child process whose stderr goes to a temp file, so a failure can be explained."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def cpu_seconds(self) -> float | None:
        """The CPU time (user and system, all its threads) the process has used, where /proc tells it (Linux)."""
        if self._proc is None:
            return None
        try:
            fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _spawn(self, args: list[str], env: dict[str, str], stdout: int) -> subprocess.Popen[bytes]:
        if self.running:
            raise RuntimeError(f"{self._name} is already running")
        ensure_node_packages()
        self._close_stderr()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [str(node_executable()), *args],
            cwd=FHIRDEV_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=self._stderr,
        )
        return self._proc

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        return _tail(self._stderr.read().decode("utf-8", errors="replace"))

    def _failure(self, message: str) -> RuntimeError:
        rc = self._proc.poll() if self._proc is not None else None
        status = "still running" if rc is None else f"exit code {rc}"
        tail = self._stderr_tail() or "(no output on stderr)"
        self._terminate(graceful_signal=None)
        return RuntimeError(f"{self._name}: {message} ({status}). stderr tail:\n{tail}")

    def _terminate(self, graceful_signal: int | None) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            if graceful_signal is not None and sys.platform != "win32":
                proc.send_signal(graceful_signal)
            else:
                proc.terminate()
            try:
                proc.wait(timeout=_STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


class FhirDevServer(_NodeProcess):
    """The loopback FHIR R4 server (fhirdev/server.mjs) with its OAuth 2.0 token endpoint.

    ``base_url`` is ``http://127.0.0.1:<port>/fhir/R4`` and ``token_url`` is
    ``http://127.0.0.1:<port>/oauth2/token`` (client-credentials grant with ``client_id`` and
    ``client_secret``). Every FHIR request needs ``Authorization: Bearer <access_token>``.
    """

    def __init__(
        self,
        client_id: str = "writeback",
        client_secret: str | None = None,
        token_ttl: int = 3600,
        startup_timeout: float = 60.0,
    ) -> None:
        super().__init__("fhirdev server")
        self.client_id = client_id
        self.client_secret = client_secret if client_secret is not None else secrets.token_urlsafe(24)
        self.token_ttl = token_ttl
        self.startup_timeout = startup_timeout
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("fhirdev server is not started")
        return self._port

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/fhir/R4"

    @property
    def token_url(self) -> str:
        return f"{self.origin}/oauth2/token"

    def start(self) -> None:
        """Start on a port the server picks itself and wait until it reports ``{"port": N}``."""
        env = {
            **os.environ,
            "FHIRDEV_PORT": "0",
            "FHIRDEV_CLIENT_ID": self.client_id,
            "FHIRDEV_CLIENT_SECRET": self.client_secret,
            "FHIRDEV_TOKEN_TTL_SECONDS": str(self.token_ttl),
        }
        proc = self._spawn([str(FHIRDEV_DIR / "server.mjs")], env, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=_pump_lines, args=(proc.stdout, lines), daemon=True).start()
        try:
            line = lines.get(timeout=self.startup_timeout)
        except queue.Empty:
            raise self._failure(f"no {{'port': N}} line within {self.startup_timeout:.0f}s") from None
        if line is None:
            raise self._failure("exited before it was listening")
        try:
            self._port = int(json.loads(line)["port"])
        except (ValueError, KeyError, TypeError):
            raise self._failure(f"unexpected first line on stdout: {line!r}") from None

    def stop(self) -> None:
        """Terminate the server (then kill it if it does not exit); all FHIR data is lost."""
        self._terminate(graceful_signal=None)
        self._close_stderr()
        self._port = None

    def stats(self) -> dict[str, int]:
        """``{"tokens_issued": N, "requests": N}`` where requests counts calls to the FHIR API."""
        response = httpx.get(f"{self.origin}/_dev/stats", timeout=10.0)
        response.raise_for_status()
        data: dict[str, int] = response.json()
        return data

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _pump_lines(stream: IO[bytes], lines: queue.Queue[bytes | None]) -> None:
    # Reading in a thread lets start() wait with a timeout, and keeps the pipe drained.
    for line in stream:
        lines.put(line)
    lines.put(None)


@contextlib.contextmanager
def fhir_dev_server(
    client_id: str = "writeback",
    client_secret: str | None = None,
    token_ttl: int = 3600,
) -> Iterator[FhirDevServer]:
    """Run a fresh, empty FHIR server for the duration of the block (random secret by default)."""
    with FhirDevServer(client_id=client_id, client_secret=client_secret, token_ttl=token_ttl) as server:
        yield server


class Azurite(_NodeProcess):
    """Azurite Table Storage on 127.0.0.1, data kept in a folder that outlives stop()/start().

    ``stop()`` takes Table Storage down (connections are refused) and ``start()`` brings it back
    on the same port with the same tables, so reliability tests can simulate an outage.
    ``close()`` stops it for good and deletes the data folder if it was a temporary one.
    """

    def __init__(
        self,
        location: Path | None = None,
        port: int | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        super().__init__("azurite-table")
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        if location is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="azurite-")
            location = Path(self._tempdir.name)
        self.location = location
        self.port = port if port is not None else free_port()
        self.startup_timeout = startup_timeout

    account_name = AZURITE_ACCOUNT_NAME
    account_key = AZURITE_ACCOUNT_KEY

    @property
    def table_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT_NAME}"

    @property
    def connection_string(self) -> str:
        return (
            "DefaultEndpointsProtocol=http;"
            f"AccountName={AZURITE_ACCOUNT_NAME};"
            f"AccountKey={AZURITE_ACCOUNT_KEY};"
            f"TableEndpoint={self.table_endpoint};"
        )

    def start(self) -> None:
        """Start (or restart) on ``self.port`` and wait until it accepts connections."""
        main_js = NODE_MODULES / "azurite" / "dist" / "src" / "table" / "main.js"
        args = [
            str(main_js),
            "--tableHost", "127.0.0.1",
            "--tablePort", str(self.port),
            "--location", str(self.location),
            "--skipApiVersionCheck",
            "--loose",
            "--disableProductStyleUrl",
            "--disableTelemetry",
            "--silent",
        ]  # fmt: skip
        self._spawn(args, dict(os.environ), stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise self._failure(f"exited before listening on 127.0.0.1:{self.port}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                return
            time.sleep(0.05)
        raise self._failure(f"not listening on 127.0.0.1:{self.port} after {self.startup_timeout:.0f}s")

    def stop(self) -> None:
        """Take Table Storage down, keeping the port and the data for a later start()."""
        # Azurite saves its database on SIGINT (not on SIGTERM), so ask it nicely first.
        self._terminate(graceful_signal=signal.SIGINT)

    def close(self) -> None:
        """Stop and remove the temporary data folder (if this object created it)."""
        self.stop()
        self._close_stderr()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def azurite() -> Iterator[Azurite]:
    """Run Azurite Table Storage with empty temporary storage for the duration of the block."""
    with Azurite() as service:
        yield service
