"""Child processes for ftserver, ftclient and the localhost demo: start, watch, stop.

Every child gets the running interpreter's ``bin`` first on PATH (Flower's SuperLink and
SuperNode start ``flower-superexec`` by name, and must find ours, not another install's), and,
on Linux, dies with its parent (PR_SET_PDEATHSIG), so a ``kill -9`` of ftserver or ftclient
does not leave a SuperLink or SuperNode holding the port.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def tool(name: str) -> str:
    """A console script installed beside the running interpreter (flower-superlink, ftclient, ...)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(
    cmd: list[str], log_path: Path | None = None, env: dict[str, str] | None = None, cwd: Path | None = None, **kw
) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, output appended to ``log_path`` (or piped when None)."""
    out = open(log_path, "ab") if log_path is not None else subprocess.PIPE  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env or tool_env(),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            **kw,
        )
    finally:
        if log_path is not None:
            out.close()


def spawn_capped(
    cmd: list[str],
    log_path: Path,
    max_bytes: int = 10 << 20,
    backups: int = 2,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """:func:`spawn`, but the child's output reaches ``log_path`` through a pipe and a thread
    that rotates the file at ``max_bytes`` (``log_path.1`` .. ``.{backups}`` keep the older
    output), so a long-lived child's log stays bounded however long the run."""
    proc = spawn(cmd, None, env=env, cwd=cwd)
    threading.Thread(target=_pump, args=(proc.stdout, Path(log_path), max_bytes, backups), daemon=True).start()
    return proc


def rotate(path: Path, backups: int) -> None:
    """``path`` -> ``path.1`` -> ... -> ``path.{backups}`` (the oldest dropped); ``path`` is then gone."""
    for i in range(backups, 0, -1):
        src = path if i == 1 else path.with_name(f"{path.name}.{i - 1}")
        if src.exists():
            os.replace(src, path.with_name(f"{path.name}.{i}"))
    if backups == 0:
        path.unlink(missing_ok=True)


def _pump(stream, path: Path, max_bytes: int, backups: int) -> None:
    out = open(path, "ab")  # noqa: SIM115 - rotated below
    size = out.tell()
    try:
        for line in iter(lambda: stream.readline(65536), b""):
            if size + len(line) > max_bytes and size:
                out.close()
                rotate(path, backups)
                out, size = open(path, "ab"), 0  # noqa: SIM115
            out.write(line)
            out.flush()
            size += len(line)
    except (OSError, ValueError):
        pass
    finally:
        out.close()
        stream.close()


def stop(proc: subprocess.Popen | None, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
    """Signal the child's whole process group, wait, then SIGKILL what is left. -> exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # helpers the child started (superexec, serverapp)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        return None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> None:
    """Make SIGTERM behave like Ctrl-C in this process (main thread only), so the same
    clean-up (stop children, keep checkpoints) runs for both."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float) -> bool:
    """True once something listens on host:port; False if ``proc`` exits or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if port_open(host, port):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def end_of(path: Path) -> int:
    """The size of ``path`` (0 when it does not exist): where :func:`follow` starts to relay
    only what is written from now on. Taken by the caller before the follower thread starts,
    so lines written before the thread first runs are not skipped."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def follow(path: Path, stop_event: threading.Event, emit, pos: int = 0) -> None:
    """Hand each line of ``path`` from byte ``pos`` on (the lines appended later too) to ``emit``
    until stop_event is set (then drain the rest)."""
    partial = ""
    while True:
        stopping = stop_event.is_set()
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
        except OSError:
            chunk = ""
        lines = (partial + chunk).split("\n")
        partial = lines.pop()
        for line in lines:
            emit(line)
        if stopping:
            if partial:
                emit(partial)
            return
        stop_event.wait(0.3)


def flwr_config_string(pairs: dict[str, str | bool | int | float]) -> str:
    """``key=value ...`` as Flower's --node-config/--run-config parse it (a regex, then TOML).

    Flower's regex ends a quoted value at the next quote of its kind, with no escapes, so a
    string goes in single quotes (a TOML literal string: backslashes are literal too) unless it
    holds one, then in double quotes; one holding both kinds, or a line break, cannot be passed.
    """
    parts = []
    for key, value in pairs.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif "\n" in value or "\r" in value or ("'" in value and '"' in value):
            raise ValueError(f"{key}: {value!r} cannot be passed to Flower (it holds a line break, or both ' and \")")
        elif "'" not in value:
            text = f"'{value}'"
        else:
            text = '"' + value.replace("\\", "\\\\") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)
