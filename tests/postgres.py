"""A throwaway PostgreSQL server on loopback for tests of multi-worker Optuna studies.

The server runs from the binaries of Debian's ``postgresql`` package (``.ci/install-postgres``
installs it when missing) in a temporary data folder, listening on 127.0.0.1 only, with trust
authentication for the ``postgres`` role. PostgreSQL refuses to run as root, so when the tests run as
root the server runs as the ``postgres`` system user the package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

INSTALL_HINT = "run `bash .ci/install-postgres` (Debian's postgresql package) to enable it"


def server_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``, or ``None`` when PostgreSQL is not installed."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.insert(0, str(Path(found).resolve().parent))
    for folder in candidates:
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


def unavailable_reason() -> str | None:
    """Why a server cannot start here (``None`` when it can)."""
    if server_binaries() is None:
        return f"PostgreSQL server binaries (initdb, pg_ctl) are not installed: {INSTALL_HINT}"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return f"running as root and there is no 'postgres' system user to run the server as: {INSTALL_HINT}"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed: pip install -e '.[dev]'"
    return None


@contextmanager
def postgres_server(database: str = "studies") -> Iterator[str]:
    """Start a server, create ``database`` and yield its SQLAlchemy URL; stop and delete it afterwards."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    binaries = server_binaries()
    assert binaries is not None
    folder = Path(tempfile.mkdtemp(prefix="dl-postgres-"))
    data = folder / "data"
    port = _free_port()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    try:
        subprocess.run(
            _as_server_user(
                [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
            ),
            **run,
        )
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={folder} -c fsync=off"
        subprocess.run(
            _as_server_user(
                [
                    str(binaries / "pg_ctl"),
                    "-D",
                    str(data),
                    "-o",
                    options,
                    "-l",
                    str(folder / "server.log"),
                    "-w",
                    "start",
                ]
            ),
            **run,
        )
        try:
            subprocess.run(
                _as_server_user(
                    [str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database]
                ),
                **run,
            )
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}"
        finally:
            subprocess.run(
                _as_server_user([str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                capture_output=True,
                timeout=60,
            )
    except subprocess.CalledProcessError as error:
        log = folder / "server.log"
        details = log.read_text() if log.is_file() else ""
        raise RuntimeError(f"PostgreSQL failed: {error.cmd}\n{error.stdout}\n{error.stderr}\n{details}") from error
    finally:
        shutil.rmtree(folder, ignore_errors=True)
