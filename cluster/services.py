"""Shared state as services: an S3 server (moto), PostgreSQL, and an MLflow server on both.

A cluster of several nodes shares nothing through a local path; what its jobs share goes through
services every node reaches (issue 18, docs/multinode.md). This module starts such services on one
machine, for the tests, the benchmarks and a user trying a cluster by hand:

- `S3Server`: moto's S3 server (`moto_server`, from `moto[server]`) on a host and port, with one
  bucket. Clients get `env()`: `AWS_ENDPOINT_URL` and the keys. pyarrow (its S3FileSystem, so
  the dataset store's `s3://` roots and Ray Train's storage path), boto3 and MLflow all honour
  `AWS_ENDPOINT_URL`; where an environment cannot be set, `s3_uri(..., endpoint_url=...)` names
  the endpoint in the URI itself (pyarrow's `endpoint_override`).
- `PostgresServer`: `initdb` into a folder of its own, listening on one address only (loopback,
  or the namespaces' bridge), with a role and a database for MLflow and password (SCRAM)
  authentication from that address's /24 only. The password is generated, set as a SCRAM verifier
  (so even a logged statement would not show it), and handed to clients in a 0600 password file
  (`PGPASSFILE`, libpq reads it): never on a command line or in a log. The server refuses to run
  as root, so a root caller runs it as the `postgres` system user (`user=` of subprocess).
- `MlflowServer`: `mlflow server` on any SQLAlchemy backend (PostgreSQL's `uri` without its
  password; a SQLite file for comparison), the backend URI in its environment
  (`MLFLOW_BACKEND_STORE_URI`), artifacts proxied to a destination (`s3://bucket/mlartifacts`), so
  its clients speak plain HTTP and need no S3 credentials of their own.
- `Services`: the three together, and `client_env()`, what a job on any node exports to use them.

Command lines, URIs and config files are pure functions beside the classes (each tested alone);
the classes only run processes. Every server is its own process group, started with
`start()` (which waits until it answers, else raises `DriftloopError` with its log's tail) and
ended with `stop()`; each class is a context manager that does both.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from cluster.broker import free_port
from cluster.processes import spawn, wait_ready
from streams.errors import DriftloopError

__all__ = [
    "MlflowServer",
    "PostgresServer",
    "S3Server",
    "Services",
    "hba_conf",
    "initdb_argv",
    "mlflow_argv",
    "moto_argv",
    "pgpass_line",
    "postgres_argv",
    "postgres_bin_dir",
    "postgres_uri",
    "role_sql",
    "s3_env",
    "s3_uri",
    "scram_verifier",
]

_S = TypeVar("_S", bound="_Started")
LOOPBACK = "127.0.0.1"
POSTGRES_USER = "postgres"  # the system user a root caller runs PostgreSQL as
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")  # a role or database name that needs no quoting in SQL
_SYSTEM_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}\Z")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")


# --- pure: command lines, URIs, config files ----------------------------------------------------


def moto_argv(moto_server: str, host: str, port: int) -> list[str]:
    """moto's S3 server on `host:port`.

    >>> moto_argv("moto_server", "127.0.0.1", 5000)
    ['moto_server', '-H', '127.0.0.1', '-p', '5000']
    """
    return [moto_server, "-H", host, "-p", str(port)]


def s3_env(endpoint_url: str, access_key: str, secret_key: str, region: str = "us-east-1") -> dict[str, str]:
    """What an S3 client exports to use an endpoint: boto3, pyarrow and MLflow read `AWS_ENDPOINT_URL`;
    Tansu (its `s3://` storage engine) reads `AWS_ENDPOINT` and needs `AWS_ALLOW_HTTP` for plain HTTP.

    >>> sorted(s3_env("http://10.213.0.1:9000", "key", "secret"))  # doctest: +NORMALIZE_WHITESPACE
    ['AWS_ACCESS_KEY_ID', 'AWS_ALLOW_HTTP', 'AWS_DEFAULT_REGION', 'AWS_ENDPOINT', 'AWS_ENDPOINT_URL',
     'AWS_SECRET_ACCESS_KEY']
    """
    env = {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": region,
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ENDPOINT": endpoint_url,
    }
    if endpoint_url.startswith("http://"):
        env["AWS_ALLOW_HTTP"] = "true"
    return env


def s3_uri(bucket: str, prefix: str = "", endpoint_url: str | None = None) -> str:
    """`s3://bucket/prefix`; with `endpoint_url`, the endpoint in the URI too (pyarrow's
    `endpoint_override` and `scheme`), for a client whose environment has no `AWS_ENDPOINT_URL`.

    >>> s3_uri("driftloop", "datasets")
    's3://driftloop/datasets'
    >>> s3_uri("driftloop", "datasets/", "http://10.213.0.1:9000")
    's3://driftloop/datasets?endpoint_override=10.213.0.1%3A9000&scheme=http'
    """
    if not _BUCKET.match(bucket):
        raise ValueError(f"not an S3 bucket name: {bucket!r}")
    uri = f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")
    if endpoint_url is None:
        return uri
    parsed = urllib.parse.urlsplit(endpoint_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"not an http(s) endpoint: {endpoint_url!r}")
    return f"{uri}?{urllib.parse.urlencode({'endpoint_override': parsed.netloc, 'scheme': parsed.scheme})}"


def scram_verifier(password: str, salt: bytes, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier of `password` (what `pg_authid.rolpassword` holds), as
    libpq's `PQencryptPasswordConn` makes it. Given to `CREATE ROLE ... PASSWORD`, the server keeps it
    as is: the password itself never reaches the server. (`password` must need no SASLprep: ASCII.)

    >>> scram_verifier("pencil", b"0123456789abcdef").split("$")[:2]  # the iterations and the salt, then the keys
    ['SCRAM-SHA-256', '4096:MDEyMzQ1Njc4OWFiY2RlZg==']
    """
    if not password.isascii():
        raise ValueError("the password must be ASCII (no SASLprep here)")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{what} must match {_NAME.pattern}: {value!r}")
    return value


def role_sql(user: str, database: str, verifier: str) -> str:
    """The statements that make the login role (with its password as a SCRAM verifier) and its database.

    >>> print(role_sql("driftloop", "mlflow", "SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5"))
    CREATE ROLE driftloop LOGIN PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5';
    CREATE DATABASE mlflow OWNER driftloop;
    """
    if not re.fullmatch(r"SCRAM-SHA-256\$\d+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+", verifier):
        raise ValueError("not a SCRAM-SHA-256 verifier")
    user, database = _name(user, "the role"), _name(database, "the database")
    return f"CREATE ROLE {user} LOGIN PASSWORD '{verifier}';\nCREATE DATABASE {database} OWNER {user};\n"


def clients_network(host: str) -> str:
    """Who may log in over TCP: the host itself when it is loopback, else its /24 (the namespaces'
    bridge, 10.213.<slot>.1: the nodes are .2 and on).

    >>> clients_network("127.0.0.1"), clients_network("10.213.3.1")
    ('127.0.0.1/32', '10.213.3.0/24')
    """
    address = ipaddress.ip_address(host)
    if address.is_loopback:
        return f"{address}/{address.max_prefixlen}"
    return str(ipaddress.ip_network(f"{host}/24", strict=False))


def hba_conf(superuser: str, user: str, database: str, clients: str) -> str:
    """`pg_hba.conf`: the superuser on the Unix socket only (peer: the same system user), `user` on
    `database` from `clients` with a SCRAM password; nothing else.

    >>> print(hba_conf("postgres", "driftloop", "mlflow", "10.213.0.0/24"))
    # TYPE  DATABASE  USER  ADDRESS  METHOD
    local  all  "postgres"  peer
    host  mlflow  driftloop  10.213.0.0/24  scram-sha-256
    """
    ipaddress.ip_network(clients)  # raises on anything else
    if not _SYSTEM_USER.match(superuser):  # the system user's own name (peer): quoted, as it may hold . or -
        raise ValueError(f"the superuser must match {_SYSTEM_USER.pattern}: {superuser!r}")
    user, database = _name(user, "the role"), _name(database, "the database")
    return (
        "# TYPE  DATABASE  USER  ADDRESS  METHOD\n"
        f'local  all  "{superuser}"  peer\n'
        f"host  {database}  {user}  {clients}  scram-sha-256\n"
    )


def initdb_argv(bin_dir: Path, data_dir: Path, superuser: str) -> list[str]:
    """`initdb` of a new cluster: UTF-8, C collation (the same on every machine), no fsync of the new
    files (a cluster that crashes while it is made is made again)."""
    return [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", superuser, "--encoding=UTF8", "--locale=C",
            "--auth-local=peer", "--auth-host=scram-sha-256", "--no-sync"]  # fmt: skip


def postgres_argv(bin_dir: Path, data_dir: Path, host: str, port: int, socket_dir: Path, durable: bool) -> list[str]:
    """The server on `host:port` only, its Unix socket in `socket_dir`, SCRAM for new passwords.
    `durable=False` turns off fsync and synchronous commits: for tests, never for data to keep.

    >>> postgres_argv(Path("/b"), Path("/d"), "127.0.0.1", 5432, Path("/s"), durable=True)[:5]
    ['/b/postgres', '-D', '/d', '-c', 'listen_addresses=127.0.0.1']
    """
    settings = {
        "listen_addresses": str(ipaddress.ip_address(host)),
        "port": str(port),
        "unix_socket_directories": str(socket_dir),
        "password_encryption": "scram-sha-256",
        "max_connections": "200",  # MLflow's pool per server worker, times its workers
    }
    if not durable:
        settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
    argv = [str(bin_dir / "postgres"), "-D", str(data_dir)]
    for key, value in settings.items():
        argv += ["-c", f"{key}={value}"]
    return argv


def postgres_uri(host: str, port: int, user: str, database: str) -> str:
    """The SQLAlchemy URI of the database, without a password (libpq finds it in `PGPASSFILE`). The
    driver is named: SQLAlchemy 2.1 takes a bare `postgresql://` to mean psycopg 3, not psycopg2.

    >>> postgres_uri("10.213.0.1", 5432, "driftloop", "mlflow")
    'postgresql+psycopg2://driftloop@10.213.0.1:5432/mlflow'
    """
    return f"postgresql+psycopg2://{_name(user, 'the role')}@{host}:{port}/{_name(database, 'the database')}"


def pgpass_line(host: str, port: int, database: str, user: str, password: str) -> str:
    r"""One line of a libpq password file (`:` and `\` in a field escaped).

    >>> pgpass_line("127.0.0.1", 5432, "mlflow", "driftloop", r"a:b\c")
    '127.0.0.1:5432:mlflow:driftloop:a\\:b\\\\c\n'
    """
    escape = lambda field: field.replace("\\", "\\\\").replace(":", "\\:")  # noqa: E731
    return ":".join(escape(str(field)) for field in (host, port, database, user, password)) + "\n"


def mlflow_argv(mlflow: str, host: str, port: int, artifacts_destination: str, workers: int = 2) -> list[str]:
    """`mlflow server` on `host:port`, proxying artifacts to `artifacts_destination`. The backend URI
    is not here: the server reads `MLFLOW_BACKEND_STORE_URI` from its environment.

    >>> mlflow_argv("mlflow", "127.0.0.1", 5000, "s3://driftloop/mlartifacts")  # doctest: +NORMALIZE_WHITESPACE
    ['mlflow', 'server', '--host', '127.0.0.1', '--port', '5000', '--workers', '2',
     '--artifacts-destination', 's3://driftloop/mlartifacts']
    """
    argv = [mlflow, "server", "--host", host, "--port", str(port), "--workers", str(workers),
            "--artifacts-destination", artifacts_destination]  # fmt: skip
    return argv


# --- processes ------------------------------------------------------------------------------------


def _binary(name: str, hint: str) -> str:
    """`name` beside this interpreter (the venv's scripts), else on PATH; else a clear error."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise DriftloopError(f"{name} is not installed ({hint})")
    return found


def postgres_bin_dir(debian: Path = Path("/usr/lib/postgresql")) -> Path:
    """Where PostgreSQL's server programs are: `pg_config --bindir`, else Debian's
    /usr/lib/postgresql/<newest>/bin, else PATH (`initdb` and `postgres` there)."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if done.returncode == 0:
            candidates.append(Path(done.stdout.strip()))
    versions = sorted(debian.glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    candidates += reversed(versions)
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).parent)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "postgres").exists():
            return folder
    raise DriftloopError("PostgreSQL's server is not installed (Debian: apt-get install postgresql): no initdb found")


class _Started:
    """`start()` on entering, `stop()` on leaving, whatever happened (the servers and `Services`)."""

    def start(self: _S) -> _S:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _Server(_Started):
    """A server process in a process group of its own, its output in a log file."""

    what = "server"
    stop_signal = signal.SIGTERM

    def __init__(self, log: Path) -> None:
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def _launch(self, argv: Sequence[str], env: Mapping[str, str], **popen: Any) -> None:
        self.process = spawn(argv, self.log, env, die_with=self.stop_signal, **popen)

    def _wait(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Until `ready()` answers True; a clear error, with the log's tail, if the process exits or
        time runs out."""
        assert self.process is not None
        wait_ready(self.what, ready, self.process, self.log, timeout_s)

    def _terminate(self, timeout_s: float = 15.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, self.stop_signal)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError):  # what is left of the group (workers of a server)
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class S3Server(_Server):
    """moto's S3 server on `host:port` with `bucket` created (see the module docstring).

    Its keys are random (moto accepts any): a client gets them, with the endpoint, from `env()`.
    """

    what = "the S3 server (moto)"

    def __init__(
        self, log: Path, host: str = LOOPBACK, port: int | None = None, bucket: str = "driftloop",
        region: str = "us-east-1",
    ) -> None:  # fmt: skip
        super().__init__(log)
        s3_uri(bucket)  # checks the name
        self.host, self.port, self.bucket, self.region = host, port or free_port(host), bucket, region
        self.access_key = "DL" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client exports: the endpoint, the keys and the region (`s3_env`)."""
        return s3_env(self.endpoint_url, self.access_key, self.secret_key, self.region)

    def uri(self, prefix: str = "", explicit_endpoint: bool = False) -> str:
        """`s3://<bucket>/<prefix>`; `explicit_endpoint`: the endpoint in the URI too (`s3_uri`)."""
        return s3_uri(self.bucket, prefix, self.endpoint_url if explicit_endpoint else None)

    def client(self, timeout_s: float | None = None) -> Any:
        """A boto3 S3 client of this server (`timeout_s`: per connection and read, and no retries)."""
        import boto3
        from botocore.config import Config

        config = None if timeout_s is None else Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                                                         retries={"total_max_attempts": 1})  # fmt: skip
        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region, config=config)  # fmt: skip

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def start(self, timeout_s: float = 60.0) -> S3Server:
        moto = _binary("moto_server", "pip install 'moto[server]'")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self._launch(moto_argv(moto, self.host, self.port), env)
        try:
            self._wait(self._bucket_made, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _bucket_made(self) -> bool:
        client = self.client(timeout_s=2.0)
        if self.bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=self.bucket)
        return True

    def stop(self) -> None:
        self._terminate()


class PostgresServer(_Server):
    """A PostgreSQL cluster made for the run (see the module docstring).

    `root` holds the data (`data/`), the Unix socket (`socket/`) and the log; without one, a fresh
    private folder under the temp dir, removed by `stop()`. A root caller runs the server as the
    `postgres` system user, which owns `root`: each folder above `root` must let it through (a
    pytest `tmp_path` does not; the default does). Clients connect to `uri` with `env()`
    (`PGPASSFILE`, a 0600 file of this process's user).
    """

    what = "PostgreSQL"
    stop_signal = signal.SIGINT  # fast shutdown: roll back open transactions, close, exit

    def __init__(
        self, root: Path | None = None, host: str = LOOPBACK, port: int | None = None, user: str = "driftloop",
        database: str = "mlflow", durable: bool = True,
    ) -> None:  # fmt: skip
        self._made_root = root is None
        self.root = Path(tempfile.gettempdir()) / f"dl-pg-{secrets.token_hex(6)}" if root is None else root
        super().__init__(self.root / "postgres.log")
        self.host, self.port = str(ipaddress.ip_address(host)), port or free_port(host)
        self.user, self.database, self.durable = _name(user, "the role"), _name(database, "the database"), durable
        self.password = secrets.token_urlsafe(24)
        self.passfile = self.root / "pgpass"
        self.run_as = POSTGRES_USER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    @property
    def uri(self) -> str:
        """The database's SQLAlchemy URI, without the password."""
        return postgres_uri(self.host, self.port, self.user, self.database)

    def env(self) -> dict[str, str]:
        """What a client of this process's user exports for libpq to find the password."""
        return {"PGPASSFILE": str(self.passfile)}

    def start(self, timeout_s: float = 60.0) -> PostgresServer:
        bin_dir = postgres_bin_dir()
        data, sockets = self.root / "data", self.root / "socket"
        try:
            self._prepare(sockets)
            popen: dict[str, Any] = {"cwd": str(self.root)}
            if os.geteuid() == 0:
                popen |= {"user": self.run_as, "group": self.run_as, "extra_groups": []}
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(self.root)}
            made = subprocess.run(initdb_argv(bin_dir, data, self.run_as), env=env, capture_output=True, text=True,
                                  check=False, **popen)  # fmt: skip
            if made.returncode != 0:
                raise DriftloopError(f"initdb failed ({made.returncode}): {(made.stdout + made.stderr)[-2000:]}")
            (data / "pg_hba.conf").write_text(
                hba_conf(self.run_as, self.user, self.database, clients_network(self.host))
            )
            argv = postgres_argv(bin_dir, data, self.host, self.port, sockets, self.durable)
            self._launch(argv, env, **popen)
            ready = [str(bin_dir / "pg_isready"), "-q", "-h", str(sockets), "-p", str(self.port)]
            self._wait(lambda: subprocess.run(ready, check=False).returncode == 0, timeout_s)
            verifier = scram_verifier(self.password, secrets.token_bytes(16))
            psql = [str(bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(sockets), "-p",
                    str(self.port), "-U", self.run_as, "-d", "postgres"]  # fmt: skip
            done = subprocess.run(psql, input=role_sql(self.user, self.database, verifier), env=env,
                                  capture_output=True, text=True, check=False, **popen)  # fmt: skip
            if done.returncode != 0:
                raise DriftloopError(f"making the role and database failed: {done.stderr.strip()[-2000:]}")
            with os.fdopen(os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
                handle.write(pgpass_line(self.host, self.port, self.database, self.user, self.password))
        except BaseException:
            self.stop()
            raise
        return self

    def _prepare(self, sockets: Path) -> None:
        """`root` and the socket folder, private to the server's user; `root` reachable by it."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=not self._made_root)
        sockets.mkdir(mode=0o700, exist_ok=True)
        for folder in (self.root, sockets):
            folder.chmod(0o700)
        if os.geteuid() != 0:
            return
        account = pwd.getpwnam(self.run_as)
        for folder in (self.root, sockets):
            os.chown(folder, account.pw_uid, account.pw_gid)
        for above in self.root.resolve().parents:
            mode = above.stat().st_mode
            owner_ok = above.stat().st_uid == account.pw_uid and mode & 0o100
            if not (mode & 0o001 or owner_ok):
                raise DriftloopError(
                    f"PostgreSQL runs as {self.run_as}, who cannot enter {above} (mode {oct(mode & 0o777)}): "
                    "give PostgresServer a root it can reach, or none"
                )

    def stop(self) -> None:
        self._terminate()
        if self._made_root:
            shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer(_Server):
    """`mlflow server` on `backend_uri` (PostgreSQL, SQLite, ...), artifacts proxied to
    `artifacts_destination`; `env` is what the server needs beyond this process's environment (the
    backend's `PGPASSFILE`, the artifact store's S3 keys and endpoint). No login: it listens where
    only the machine (loopback) or the cluster's own namespaces (their bridge) reach it."""

    what = "the MLflow server"

    def __init__(
        self, root: Path, backend_uri: str, artifacts_destination: str, env: Mapping[str, str] | None = None,
        host: str = LOOPBACK, port: int | None = None, workers: int = 2,
    ) -> None:  # fmt: skip
        super().__init__(root / "mlflow.log")
        self.root, self.backend_uri, self.artifacts_destination = root, backend_uri, artifacts_destination
        self.extra_env = dict(env or {})
        self.host, self.port, self.workers = host, port or free_port(host), workers

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client_env(self) -> dict[str, str]:
        """What a client exports: the tracking URI (plain HTTP; artifacts go through the server), and no
        telemetry (MLflow's client would call out to its vendor from every job)."""
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_DISABLE_TELEMETRY": "true"}

    def start(self, timeout_s: float = 300.0) -> MlflowServer:
        """`launch()`, then `wait_ready()`."""
        self.launch()
        return self.wait_ready(timeout_s)

    def launch(self) -> MlflowServer:
        """Start the server's process and return at once (`wait_ready` waits for it): a caller may
        start several servers and wait for them together, each importing its app meanwhile."""
        mlflow = _binary("mlflow", "pip install mlflow")
        self.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "PG"))}
        # No job runner: its huey consumers (seven processes) serve GenAI features that driftloop does not use.
        env |= {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"} | self.extra_env
        env["MLFLOW_BACKEND_STORE_URI"] = self.backend_uri
        if "AWS_ENDPOINT_URL" in env:
            env["MLFLOW_S3_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"]
        self._launch(mlflow_argv(mlflow, self.host, self.port, self.artifacts_destination, self.workers), env)
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> MlflowServer:
        """Until `/health` answers (stopping the server if it never does)."""
        import requests

        try:  # slow to import its app on a loaded machine: `driftloop up` saw over 2 minutes beside two Ray jobs
            self._wait(lambda: requests.get(f"{self.url}/health", timeout=2).status_code == 200, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._terminate()


class Services(_Started):
    """An S3 server, PostgreSQL and MLflow on both, all listening on `host` (loopback, or the bridge
    a multi-node cluster's nodes reach: `NetnsCluster.host_ip`). `root` holds the logs and MLflow's
    files; PostgreSQL keeps its data in a private temp folder of its own (see `PostgresServer`).

    >>> with Services(Path("/tmp/svc"), host="10.213.0.1") as services:  # doctest: +SKIP
    ...     env = services.client_env()  # MLFLOW_TRACKING_URI, AWS_*, DRIFTLOOP_DATASETS_ROOT
    """

    def __init__(
        self, root: Path, host: str = LOOPBACK, bucket: str = "driftloop", durable: bool = False,
        mlflow_workers: int = 2,
    ) -> None:  # fmt: skip
        self.root, self.host = root, host
        self.s3 = S3Server(root / "moto.log", host=host, bucket=bucket)
        self.postgres = PostgresServer(host=host, durable=durable)
        self.mlflow = MlflowServer(
            root / "mlflow", self.postgres.uri, self.s3.uri("mlartifacts"), env=self.s3.env() | self.postgres.env(),
            host=host, workers=mlflow_workers,
        )  # fmt: skip

    def datasets_root(self, prefix: str = "datasets") -> str:
        """A dataset store root on the S3 server (`datasets.root`)."""
        return self.s3.uri(prefix)

    def client_env(self, datasets_prefix: str = "datasets") -> dict[str, str]:
        """What a job on any node exports: MLflow's URI (plain HTTP: artifacts go through the server),
        the S3 endpoint and keys (the dataset store, Ray Train's storage path), and the datasets root."""
        from streams.config import DATASETS_ROOT_ENV

        return self.mlflow.client_env() | self.s3.env() | {DATASETS_ROOT_ENV: self.datasets_root(datasets_prefix)}

    def start(self) -> Services:
        try:
            self.s3.start()
            self.postgres.start()
            self.mlflow.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in (self.mlflow, self.postgres, self.s3):
            with contextlib.suppress(Exception):
                server.stop()
