"""cluster.services: the pure parts (command lines, URIs, config files, the SCRAM verifier) alone, then
real servers: Kafka -> the dataset store on S3 (moto) and back, identical to a local store; MLflow on
PostgreSQL with its artifacts in the bucket and a model version registered; a wrong password refused;
no secret on a command line or in a log; a Ray job on the multi-node cluster's worker node using all
of it.

As root (CI), the servers are the session's `shared_services`, on the multi-node cluster's bridge;
elsewhere these tests start their own on 127.0.0.1 (and the job on the worker node is skipped).
"""

from __future__ import annotations

import doctest
import os
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import cluster.services
from cluster.services import (
    S3Server,
    Services,
    clients_network,
    hba_conf,
    mlflow_argv,
    pgpass_line,
    postgres_argv,
    postgres_uri,
    role_sql,
    s3_env,
    s3_uri,
    scram_verifier,
)
from streams.config import PipelineConfig
from streams.datasets import DatasetStore
from streams.generator import StreamGenerator
from streams.ingest import ingest
from streams.kafka import Producer
from streams.serde import RecordCodec
from streams.topics import Topics

ROOT = Path(__file__).resolve().parent.parent

# Made by PostgreSQL 15 itself: `CREATE ROLE pin LOGIN PASSWORD 'pencil'`, then pg_authid.rolpassword.
PINNED_SALT = "OB7Cnuien71vCN894XBmAQ=="
PINNED_VERIFIER = (
    "SCRAM-SHA-256$4096:OB7Cnuien71vCN894XBmAQ==$CbQRafSg3itLuiHhLcQDhyGGfJulGdWHrUfioWLJ3hk="
    ":S4FZcU2mdYbiucgOIWrbqdgvKvM2v2YTfN6OJW01ff8="
)


# --- pure ---------------------------------------------------------------------------------------------


def test_the_module_examples_hold() -> None:
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(cluster.services, optionflags=flags)
    assert result.attempted >= 10 and result.failed == 0


def test_the_scram_verifier_is_the_one_postgresql_makes() -> None:
    import base64

    assert scram_verifier("pencil", base64.b64decode(PINNED_SALT)) == PINNED_VERIFIER
    assert scram_verifier("pencil", b"\0" * 16) != scram_verifier("pencil", b"\1" * 16)
    with pytest.raises(ValueError, match="ASCII"):
        scram_verifier("pâté", b"\0" * 16)


def test_names_and_values_that_would_need_quoting_are_refused() -> None:
    verifier = scram_verifier("x", b"\0" * 16)
    assert "'" not in role_sql("driftloop", "mlflow", verifier).replace(f"'{verifier}'", "")
    for user, database, secret in [("x; DROP ROLE postgres", "mlflow", verifier), ("driftloop", "Mlflow", verifier),
                                   ("driftloop", "mlflow", "pencil' SUPERUSER --")]:  # fmt: skip
        with pytest.raises(ValueError):
            role_sql(user, database, secret)
    with pytest.raises(ValueError):
        hba_conf("postgres", "driftloop", "mlflow", "0.0.0.0/0 trust")
    with pytest.raises(ValueError):
        postgres_uri("127.0.0.1", 5432, "driftloop@evil", "mlflow")
    with pytest.raises(ValueError):
        s3_uri("No_Such_Bucket")
    with pytest.raises(ValueError):
        s3_uri("driftloop", "x", "file:///etc")


def test_only_the_role_may_log_in_over_tcp_and_only_from_the_clients_network() -> None:
    lines = [line.split() for line in hba_conf("postgres", "driftloop", "mlflow", "10.213.5.0/24").splitlines()[1:]]
    assert lines == [["local", "all", '"postgres"', "peer"], ["host", "mlflow", "driftloop", "10.213.5.0/24",
                                                              "scram-sha-256"]]  # fmt: skip
    assert '"jane.doe"' in hba_conf("jane.doe", "driftloop", "mlflow", "127.0.0.1/32")  # a developer's own name
    with pytest.raises(ValueError):
        hba_conf('x" all trust', "driftloop", "mlflow", "127.0.0.1/32")
    assert clients_network("10.213.5.1") == "10.213.5.0/24"
    assert clients_network("127.0.0.1") == "127.0.0.1/32"


def test_postgres_listens_on_one_address_and_is_durable_unless_told() -> None:
    def settings(durable: bool) -> dict[str, str]:
        argv = postgres_argv(Path("/b"), Path("/d"), "10.213.0.1", 5999, Path("/s"), durable)
        return dict(argv[i + 1].split("=", 1) for i, word in enumerate(argv) if word == "-c")

    durable, fast = settings(True), settings(False)
    assert durable["listen_addresses"] == "10.213.0.1" and durable["port"] == "5999"
    assert durable["password_encryption"] == "scram-sha-256" and "fsync" not in durable
    assert fast["fsync"] == "off" and fast["synchronous_commit"] == "off"
    with pytest.raises(ValueError):
        postgres_argv(Path("/b"), Path("/d"), "*", 5999, Path("/s"), True)  # every interface: refused


def test_no_secret_is_on_a_command_line_or_in_a_uri() -> None:
    uri = postgres_uri("10.213.0.1", 5432, "driftloop", "mlflow")
    assert uri == "postgresql+psycopg2://driftloop@10.213.0.1:5432/mlflow"  # psycopg2, and no password
    argv = mlflow_argv("mlflow", "10.213.0.1", 5000, "s3://driftloop/mlartifacts", workers=2)
    assert not any("postgresql" in word or "sqlite" in word for word in argv)  # the backend is in the environment
    assert pgpass_line("h", 1, "d", "u", "p:w\\") == "h:1:d:u:p\\:w\\\\\n"
    env = s3_env("http://127.0.0.1:9000", "key", "secret")
    assert env["AWS_ENDPOINT_URL"] == env["AWS_ENDPOINT"] == "http://127.0.0.1:9000" and env["AWS_ALLOW_HTTP"] == "true"
    assert "AWS_ALLOW_HTTP" not in s3_env("https://s3.example", "key", "secret")


def test_a_missing_program_is_named_with_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.errors import DriftloopError

    monkeypatch.setattr(cluster.services.shutil, "which", lambda name: None)
    with pytest.raises(DriftloopError, match=r"apt-get install postgresql"):
        cluster.services.postgres_bin_dir(debian=tmp_path)
    with pytest.raises(DriftloopError, match=r"no-such-server is not installed \(pip install it\)"):
        cluster.services._binary("no-such-server", "pip install it")


def test_a_server_that_cannot_start_says_why_with_its_log(tmp_path: Path) -> None:
    import socket

    from streams.errors import DriftloopError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = S3Server(tmp_path / "moto.log", port=taken.getsockname()[1])
        with pytest.raises(DriftloopError, match=r"(?s)the S3 server \(moto\) exited while starting.*in use"):
            server.start(timeout_s=30)
    assert not server.running


# --- real servers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """The session's `shared_services` as root (on the multi-node cluster's bridge); else our own on
    loopback (PostgreSQL then runs as this user)."""
    if os.geteuid() == 0:
        yield request.getfixturevalue("shared_services")
        return
    with Services(tmp_path_factory.mktemp("services")) as own:
        yield own


@pytest.fixture
def s3_client_env(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as an S3 client of the services (pyarrow reads the environment)."""
    for name, value in services.s3.env().items():
        monkeypatch.setenv(name, value)


def _produce(config: PipelineConfig, topics: Topics, count: int) -> None:
    codec = RecordCodec(config.schema)
    with Producer(config.kafka) as producer:
        for row in StreamGenerator(config, seed=3).records(count):
            producer.send(topics.records, codec.encode(row.record), key=row.key(config.schema))
        producer.flush()


@pytest.mark.integration
@pytest.mark.parametrize("endpoint_in_uri", [False, True], ids=["endpoint-from-env", "endpoint-in-uri"])
def test_a_dataset_ingested_to_s3_reads_back_the_same_as_a_local_one(
    services: Services, s3_client_env: None, config: PipelineConfig, topics: Topics, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, endpoint_in_uri: bool,
) -> None:  # fmt: skip
    _produce(config, topics, 300)
    prefix = f"datasets-{uuid.uuid4().hex[:8]}"
    if endpoint_in_uri:
        monkeypatch.delenv("AWS_ENDPOINT_URL")  # the URI alone says where the server is
        monkeypatch.delenv("AWS_ENDPOINT")
    on_s3 = DatasetStore(services.s3.uri(prefix, explicit_endpoint=endpoint_in_uri), config.name)
    local = DatasetStore(str(tmp_path / "local"), config.name)

    remote, here = ingest(config, on_s3).manifest, ingest(config, local).manifest
    assert remote is not None and here is not None
    assert remote.rows == here.rows > 250  # a few invalid rows are fine; none lost
    assert (remote.version_id, remote.digest) == (here.version_id, here.digest)  # the same bytes
    assert ingest(config, on_s3).manifest is None  # nothing new: the manifest on S3 is found again
    keys = services.s3.keys(prefix + "/")
    assert f"{prefix}/{config.name}/versions/{remote.version_id}/manifest.json" in keys
    assert len([k for k in keys if k.endswith(".parquet")]) == len(remote.files)

    again = DatasetStore(services.s3.uri(prefix, explicit_endpoint=endpoint_in_uri), config.name)
    assert [m.version_id for m in again.versions()] == [remote.version_id]
    event_time = config.schema.event_time
    by_offset = [("partition", "ascending"), ("offset", "ascending")]
    read = again.read_table(again.window(), event_time).sort_by(by_offset)
    assert read.equals(local.read_table(local.window(), event_time).sort_by(by_offset))


@pytest.mark.integration
def test_mlflow_keeps_runs_in_postgresql_and_artifacts_in_the_bucket(services: Services) -> None:
    import psycopg2
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=services.mlflow.url, registry_uri=services.mlflow.url)
    name = f"svc-{uuid.uuid4().hex[:8]}"
    experiment = client.create_experiment(name)
    run = client.create_run(experiment)
    client.log_param(run.info.run_id, "alpha", "0.5")
    for step in range(3):
        client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
    client.log_text(run.info.run_id, "weights", "model/weights.txt")
    client.set_terminated(run.info.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: clients need no S3 keys

    keys = services.s3.keys(f"mlartifacts/{experiment}/{run.info.run_id}/")
    assert keys == [f"mlartifacts/{experiment}/{run.info.run_id}/artifacts/model/weights.txt"]

    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)
    assert client.get_model_version_by_alias(name, "champion").run_id == run.info.run_id
    assert [m.key for m in client.get_metric_history(run.info.run_id, "loss")] == ["loss"] * 3

    pg = services.postgres  # the rows are in PostgreSQL: read them with the password file
    db = psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, dbname=pg.database, passfile=str(pg.passfile))
    try:
        with db.cursor() as cursor:
            cursor.execute("SELECT name FROM registered_models WHERE name = %s", (name,))
            assert cursor.fetchall() == [(name,)]
            cursor.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s", (run.info.run_id,))
            assert cursor.fetchone() == (3,)
    finally:
        db.close()


@pytest.mark.integration
def test_postgresql_refuses_a_wrong_or_missing_password_and_no_secret_leaks(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg2

    pg = services.postgres
    monkeypatch.delenv("PGPASSFILE", raising=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("HOME", str(Path(pg.log).parent / "nowhere"))  # no ~/.pgpass either
    target = {"host": pg.host, "port": pg.port, "dbname": pg.database, "connect_timeout": 5}
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(user=pg.user, password="not-" + pg.password, **target)
    with pytest.raises(psycopg2.OperationalError, match="no password supplied"):
        psycopg2.connect(user=pg.user, **target)
    with pytest.raises(psycopg2.OperationalError, match=r"no pg_hba\.conf entry"):  # the superuser: socket only
        psycopg2.connect(user="postgres", password=pg.password, **target)
    psycopg2.connect(user=pg.user, password=pg.password, **target).close()

    assert pg.passfile.stat().st_mode & 0o777 == 0o600
    secrets = [pg.password, services.s3.secret_key]
    for log in (pg.log, services.s3.log, services.mlflow.log):
        text = log.read_text(errors="replace")
        assert not any(secret in text for secret in secrets), log
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or ())
        assert not any(secret in line for secret in secrets), line


JOB = '''"""On a node: a dataset version into the store on S3, an MLflow run with an artifact over HTTP."""
import os, sys, uuid

import mlflow
import pyarrow as pa

from streams.datasets import DataFile, DatasetStore
from streams.events import OffsetRange

store = DatasetStore(os.environ["DRIFTLOOP_DATASETS_ROOT"], sys.argv[1])
ranges = [OffsetRange(topic="t", partition=0, start=0, end=3)]
attempt = store.new_attempt(ranges)
with store.fs.open_output_stream(attempt + "/p0-0-3.parquet") as out:
    out.write(b"not parquet, just bytes")
manifest = store.commit(ranges, attempt, [DataFile(path="p0-0-3.parquet", range=ranges[0], rows=3, sha256="0" * 64,
                                                   bytes=23)], pa.schema([("x", pa.int64())]))
mlflow.set_experiment(sys.argv[1])
with mlflow.start_run() as run:
    mlflow.log_param("version", manifest.version_id)
    mlflow.log_text("from the worker", "note.txt")
print("JOB", manifest.version_id, run.info.run_id, flush=True)
'''


@pytest.mark.integration
def test_a_job_on_the_worker_node_uses_the_store_and_mlflow(
    services: Services, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the multi-node cluster needs root")
    from mlflow import MlflowClient

    from tests.multinode import run_job

    cluster: Any = request.getfixturevalue("multinode_cluster")  # the one the services listen beside
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "job.py").write_text(JOB)
    name = f"svc-job-{uuid.uuid4().hex[:8]}"
    prefix = f"jobs-{uuid.uuid4().hex[:8]}"
    env = services.client_env(prefix) | {"PYTHONPATH": str(ROOT)}
    info, logs = run_job(cluster, shlex.join(["python", "job.py", name]), working_dir=folder,
                         resources={"worker_node": 1}, env=env)  # fmt: skip
    assert str(info.status.value) == "SUCCEEDED", logs
    assert info.driver_node_id == cluster.nodes["w1"].node_id
    _, version_id, run_id = next(line for line in logs.splitlines() if line.startswith("JOB ")).split()

    with pytest.MonkeyPatch.context() as patch:  # this machine reads what the node wrote
        for key, value in services.s3.env().items():
            patch.setenv(key, value)
        store = DatasetStore(services.s3.uri(prefix), name)
        assert [m.version_id for m in store.versions()] == [version_id]
    client = MlflowClient(tracking_uri=services.mlflow.url)
    assert client.get_run(run_id).data.params == {"version": version_id}
    assert any(key.endswith(f"{run_id}/artifacts/note.txt") for key in services.s3.keys("mlartifacts/"))
    for process in psutil.process_iter(["cmdline"]):  # the job's environment reached no command line (Ray's)
        assert services.s3.secret_key not in " ".join(process.info["cmdline"] or ())
