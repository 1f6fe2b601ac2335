"""Run a throwaway Debian PostgreSQL server for tests and benchmarks.

Each :class:`Postgres` gets its own data directory in a temp dir (``initdb``), listens on a free
loopback port (and a Unix socket in that dir, nowhere else), trusts local connections, and is stopped
(``pg_ctl stop -m immediate``) and removed on exit. PostgreSQL refuses to run as root, so as root the
server runs as Debian's ``postgres`` system user (created by the ``postgresql`` package), which is
given the temp dir.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

from fishim.testing import Managed, free_port, wait_for_port

__all__ = ["Postgres", "find_postgres"]

log = logging.getLogger("fishim.testing.postgres")

RUN_AS = "postgres"  # Debian's server account, used when the tests run as root


def find_postgres() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding ``initdb`` and ``pg_ctl``, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _user_command(args: list[str]) -> list[str]:
    """``args`` as the server's owner: as root, through ``runuser`` as :data:`RUN_AS`."""
    if os.geteuid() != 0:
        return args
    return ["runuser", "-u", RUN_AS, "--", *args]


def _stop(pg_ctl: str, data: str) -> None:
    subprocess.run(_user_command([pg_ctl, "-D", data, "-m", "immediate", "-w", "-t", "20", "stop"]),
                   capture_output=True, timeout=30, check=False)


class Postgres(Managed):
    """A PostgreSQL server on ``127.0.0.1:port``; :meth:`url` gives a ``postgresql://`` URL per database."""

    def __init__(self, *, bindir: Path | None = None, durable: bool = False, startup_timeout: float = 30.0) -> None:
        self.bindir = bindir or find_postgres()
        self.durable = durable  # False (tests): fsync=off. True (benchmarks): PostgreSQL's own defaults
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self.root = Path(tempfile.mkdtemp(prefix="fishim-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self.user = RUN_AS if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self._finalizer: weakref.finalize | None = None

    def _bin(self, name: str) -> str:
        if self.bindir is None:
            raise FileNotFoundError("PostgreSQL server not found (install Debian package postgresql)")
        return str(self.bindir / name)

    def start(self) -> Postgres:
        """initdb, then start the server and wait until it accepts connections."""
        if os.geteuid() == 0:
            entry = pwd.getpwnam(RUN_AS)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        subprocess.run(_user_command([self._bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user,
                                      "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
                   " -c max_connections=60 -c shared_buffers=32MB" + ("" if self.durable else " -c fsync=off"))
        subprocess.run(_user_command([self._bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log_path),
                                      "-o", options, "-w", "-t", str(int(self.startup_timeout)), "start"]),
                       check=True, capture_output=True, timeout=self.startup_timeout + 10)
        self._finalizer = weakref.finalize(self, _stop, self._bin("pg_ctl"), str(self.data))
        wait_for_port(self.port, timeout=self.startup_timeout)
        log.info("postgres started port=%d dir=%s", self.port, self.root)
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
