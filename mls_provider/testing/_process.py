"""What the test servers (livekit-server, redis-server, the delivery service) share: a
subprocess on loopback, started with readiness polling (a lost race for a port is retried),
stopped with SIGTERM then SIGKILL, and never left behind (``atexit``, and on Linux
``setpriv --pdeathsig`` for when this process itself is killed)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import weakref
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Self

HOST = "127.0.0.1"
# readiness probes must never go through an http_proxy from the environment
NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
START_ATTEMPTS = 3  # a port taken between our probe and the server's bind is retried

_live: weakref.WeakSet[ServerProcess] = weakref.WeakSet()
_handed_out: set[tuple[int, int]] = set()  # (socket kind, port)


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        server.close()


def pdeathsig_prefix(signal_name: str = "TERM") -> list[str]:
    """``setpriv --pdeathsig <signal_name> --`` (Linux; elsewhere nothing) to put before a
    command: the child gets that signal when the thread that spawned it ends, even if this
    process is killed. Servers use TERM (or KILL); test participants use KILL."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", signal_name, "--"] if setpriv else []


def free_port(kind: int = socket.SOCK_STREAM, host: str = HOST) -> int:
    """A port of ``kind`` free now on ``host`` and not handed out before by this process:
    servers keep their ports across restarts, so the kernel may offer one of them again
    while its server is down."""
    while True:
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if (kind, port) not in _handed_out:
            _handed_out.add((kind, port))
            return port


class ServerProcess:
    """A server subprocess. Subclasses spawn it (``_spawn``, setting ``_proc`` and
    ``_log``), say when it is ready (``_probe``) and where it logs (``log_path``)."""

    name: ClassVar[str] = "server"
    error: ClassVar[type[RuntimeError]] = RuntimeError
    poll_interval: ClassVar[float] = 0.05
    stop_timeout: ClassVar[float] = 10.0

    def __init__(self, startup_timeout: float) -> None:
        self.startup_timeout = startup_timeout
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- what subclasses provide -----------------------------------------------------------

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    def _spawn(self) -> None:
        raise NotImplementedError

    def _probe(self) -> bool:
        """True once the server serves (called from a worker thread by ``astart``)."""
        raise NotImplementedError

    def _bind_race(self, log_tail: str) -> bool:
        """Whether a start that exited with this log lost a port race (then retried)."""
        return False

    def _abort_start(self) -> None:
        """Ends a server that failed to start."""
        self._reap(kill=True)

    # -- state -----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, RuntimeError):
            return "<no log>"

    # -- starting --------------------------------------------------------------------------

    def _popen(self, args: list[str], *, output: Path | None = None, **kwargs: object) -> None:
        """Spawns ``args`` with stdout and stderr appended to ``output`` (``log_path``)."""
        self._log = open(output or self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        self._proc = subprocess.Popen(  # type: ignore[call-overload]
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, **kwargs
        )
        self.starts += 1
        _live.add(self)

    def _startup_failure(self) -> tuple[bool, str] | None:
        """None while the process runs; else (retry with other ports?, message)."""
        assert self._proc is not None
        code = self._proc.poll()
        if code is None:
            return None
        tail = self.log_tail()
        self._reap()
        return self._bind_race(tail), (
            f"{self.name} exited with code {code} during startup; "
            f"log ({self.log_path}) tail:\n{tail}"
        )

    def _fail(self, message: str) -> RuntimeError:
        self._abort_start()
        return self.error(message)

    def _timeout_message(self) -> str:
        return (
            f"{self.name} not ready within {self.startup_timeout:.0f} s; "
            f"log ({self.log_path}) tail:\n{self.log_tail()}"
        )

    def _poll_start(self, attempt: int, ready: bool, expired: bool) -> bool | None:
        """One poll of a start: True once ready, False to spawn again (a lost race for a
        port), None to keep polling; raises ``self.error`` on failure."""
        failure = self._startup_failure()
        if failure is not None:
            if failure[0] and attempt < START_ATTEMPTS:
                return False
            raise self._fail(failure[1])
        if ready:
            return True
        if expired:
            raise self._fail(self._timeout_message())
        return None

    def start(self) -> Self:
        """Starts the server and blocks until it is ready (raises ``self.error``)."""
        if self.running:
            return self
        for attempt in range(1, START_ATTEMPTS + 1):
            self._spawn()
            deadline = time.monotonic() + self.startup_timeout
            while True:
                state = self._poll_start(attempt, self._probe(), time.monotonic() > deadline)
                if state is not None:
                    break
                time.sleep(self.poll_interval)
            if state:
                return self
        raise AssertionError("unreachable")

    async def astart(self) -> Self:
        """``start`` for async code: spawned from the calling (event-loop) thread, polled
        without blocking the loop."""
        if self.running:
            return self
        loop = asyncio.get_running_loop()
        for attempt in range(1, START_ATTEMPTS + 1):
            self._spawn()
            deadline = loop.time() + self.startup_timeout
            while True:
                ready = await asyncio.to_thread(self._probe)
                state = self._poll_start(attempt, ready, loop.time() > deadline)
                if state is not None:
                    break
                await asyncio.sleep(self.poll_interval)
            if state:
                return self
        raise AssertionError("unreachable")

    # -- stopping --------------------------------------------------------------------------

    def _reap(self, *, kill: bool = False, timeout: float | None = None) -> int | None:
        """SIGTERM (or SIGKILL), SIGKILL after ``timeout``; waits; returns the exit code."""
        proc, self._proc = self._proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout if timeout is None else timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
            code = proc.returncode
            _live.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (a graceful shutdown), SIGKILL after ``timeout``; the exit code."""
        return self._reap(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        self._reap(kill=True)

    def restart(self, *, kill: bool = False) -> Self:
        """Stops (``kill``: SIGKILL) and starts again."""
        self._reap(kill=kill)
        return self.start()

    def close(self) -> None:
        """Stops the server for good (subclasses also remove temp dirs of their own)."""
        self.stop()

    async def astop(self, timeout: float | None = None) -> int | None:
        return await asyncio.to_thread(self.stop, timeout)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    async def arestart(self, *, kill: bool = False) -> Self:
        await asyncio.to_thread(self._reap, kill=kill)
        return await self.astart()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)
