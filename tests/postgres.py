"""A throwaway PostgreSQL server for tests: Debian's binaries (initdb, pg_ctl) start a cluster in
a temporary folder on a free port of 127.0.0.1, trusted local logins only; each test gets a fresh
database in it. initdb refuses to run as root, so under root the server runs as the `postgres`
user (runuser). `available()` says why it cannot run where it cannot."""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from servers import free_port

USER = "captioner"  # the cluster's superuser; logins are trusted, on 127.0.0.1 only


def bin_dir() -> Path | None:
    """PostgreSQL's server binaries: $CAPTIONER_PG_BIN, else Debian's /usr/lib/postgresql/<15 or newest>/bin,
    else initdb on PATH."""
    if os.environ.get("CAPTIONER_PG_BIN"):
        return Path(os.environ["CAPTIONER_PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: (Path(p).parts[-3] != "15",
                                                                                    -int(Path(p).parts[-3])))
    if found:
        return Path(found[0]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def available() -> tuple[bool, str]:
    """(whether a throwaway server can be started here, why not)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False, "psycopg is not installed (pip install \"captioner[postgres]\")"
    where = bin_dir()
    if where is None or not (where / "initdb").is_file() or not (where / "pg_ctl").is_file():
        return False, ("PostgreSQL's server binaries not found (apt-get install postgresql-15, "
                       "or set CAPTIONER_PG_BIN)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False, "running as root and there is no postgres user to run initdb as"
        if not shutil.which("runuser"):
            return False, "running as root and runuser is missing"
    return True, ""


class Cluster:
    """initdb + pg_ctl start in a temporary folder; `database()` makes a fresh database, `stop()` ends it all."""

    def __init__(self) -> None:
        self.bin = bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="captioner-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: the server runs as postgres, in a folder it owns
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = free_port()
        self._names = itertools.count()
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o",
                  f"-F -k {self.root} -c listen_addresses=127.0.0.1 -p {self.port} -c max_connections=200",
                  "start")

    def _run(self, tool: str, *args: str) -> None:
        proc = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.is_file() else ""
            raise RuntimeError(f"{tool} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}{log}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
