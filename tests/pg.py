"""A throwaway PostgreSQL cluster for the suite: `initdb` in a temporary folder, a free loopback
port, stopped and removed at the end. Nothing is skipped when it cannot start: the suite fails,
saying why.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

HINT = "install Debian's postgresql package (apt-get install postgresql)"


class ClusterError(Exception):
    pass


def _bin(name: str) -> str:
    for found in [shutil.which(name), *sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)]:
        if found and os.access(found, os.X_OK):
            return str(found)
    raise ClusterError(f"PostgreSQL's {name} was not found; {HINT}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One running cluster; `database()` makes an empty database and gives its URL."""

    def __init__(self, folder: Path, port: int, as_user: list[str]) -> None:
        self.folder, self.port, self.as_user = folder, port, as_user
        self._names = itertools.count(1)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database(self) -> str:
        """An empty store of its own: a schema, named first in the URL's search_path (a new schema takes
        milliseconds, a new database a third of a second)."""
        import psycopg
        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"create schema {name}")
        return f"{self.url}?options=-csearch_path%3D{name}"

    def pg_ctl(self, *args: str) -> None:
        """stop, start or restart the server (as the tests that take it down need)."""
        run([*self.as_user, _bin("pg_ctl"), "-D", str(self.folder / "data"), "-w", "-t", "30",
             "-l", str(self.folder / "log"), *args])

    def dump(self, url: str) -> bytes:
        """pg_dump of one store (its schema): what a stolen backup holds."""
        schema = url.rsplit("%3D", 1)[1]
        return subprocess.run([_bin("pg_dump"), "-n", schema, self.url], check=True, capture_output=True,
                              timeout=60).stdout


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise ClusterError(f"{' '.join(cmd[:4])}... failed ({done.returncode}): {done.stderr.strip()[-800:]}")


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    folder = Path(tempfile.mkdtemp(prefix="sealgate-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    port = _free_port()
    c = Cluster(folder, port, as_user)
    try:
        run([*as_user, _bin("initdb"), "-D", str(folder / "data"), "-U", "postgres", "-A", "trust",
             "--no-sync", "-E", "UTF8"])
        with (folder / "data" / "postgresql.conf").open("a") as conf:  # kept across a stop and start
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{folder}'\n"
                       "fsync = off\nfull_page_writes = off\nsynchronous_commit = off\nmax_connections = 300\n")
        c.pg_ctl("start")
        yield c
    finally:
        with contextlib.suppress(ClusterError):
            c.pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(folder, ignore_errors=True)
