"""One pipeline's services on a Ray cluster, built in one place: what `run`, `up` and `deploy` start.

A `Pipeline` is a config whose connections are resolved (its broker, its MLflow tracking URI,
its dataset store) and the cluster it runs on (the Ray Jobs API, where its jobs write). From it,
top to bottom:

1. `start_controller()`: the actor `<name>-controller`, which consumes the pipeline's `retrain`
   topic and submits each request as a Ray Job (`jobs.controller`);
2. `start_monitors()`: `monitor.actors` actors `<name>-monitor-<i>`, which watch its
   `predictions` and `labels` topics and publish drift and retrain events (`jobs.monitor`);
3. `serve()`: the Serve application `<name>` (`serving.app`) at its route prefix.

Actors are restartable (`max_restarts=-1`); `detached` ones outlive the driver that started them
(a stack from `driftloop up`), the others end with it (`driftloop run`). Every name carries the
pipeline's, so several pipelines share one cluster: each has its own actors, topics, dataset
store and registered model. The first pipeline's app has the route prefix `/`, each other one
`/<pipeline>` (`route_prefix`), and every app also answers under `/<pipeline>/v1/...` (see
`serving.app`): one form of URL reaches any pipeline, and a single pipeline keeps `/v1/...`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.config import PipelineConfig
from streams.errors import DriftloopError

__all__ = ["NAMESPACE", "ROOT", "Pipeline", "app_route_prefix", "route_prefix"]

NAMESPACE = "driftloop"  # the Ray namespace of every pipeline's named actors (`up`, `launch`)
ROOT = Path(__file__).resolve().parent.parent  # the code a retrain job ships as its working_dir
RESERVED_ROUTES = ("v1", "docs", "redoc", "openapi.json", "-")  # an app's own paths: never a prefix


def route_prefix(name: str, root_free: bool) -> str:
    """`/` while no other pipeline's app has it (a cluster's first: its clients keep `/v1/...`),
    else `/<name>`. Either way the app also answers under `/<name>/v1/...`. Pure."""
    if root_free:
        return "/"
    if name in RESERVED_ROUTES:
        raise DriftloopError(f"pipeline {name!r} cannot share a cluster: its route /{name} is one of the app's own")
    return f"/{name}"


@dataclass(frozen=True)
class Pipeline:
    config: PipelineConfig  # connected: the broker, tracking URI and dataset store it runs with
    tracking_uri: str
    jobs_address: str  # the Ray Jobs API (http://...) the controller submits retrains to
    jobs_dir: Path  # where each retrain job writes
    detached: bool = False
    python: str = sys.executable  # the interpreter the cluster runs a job's entrypoint with
    job_env: Mapping[str, str] = field(default_factory=dict)  # beside the tracking URI, in each retrain job's env

    def actor_options(self, name: str) -> dict[str, Any]:
        """Ray's options for the service actor `name`: no CPU, restarted for ever, on the nodes with
        `ray.service_resources`, and outliving its driver when `detached`. Pure."""
        options: dict[str, Any] = {"name": name, "num_cpus": 0, "max_restarts": -1}
        if self.config.ray.service_resources:
            options["resources"] = dict(self.config.ray.service_resources)
        if self.detached:
            options["lifetime"] = "detached"
        return options

    def _actor(self, cls: type, name: str) -> Any:
        import ray

        remote: Any = ray.remote(cls)
        return remote.options(**self.actor_options(name))

    @property
    def controller_name(self) -> str:
        return f"{self.config.name}-controller"

    @property
    def monitor_names(self) -> list[str]:
        return [f"{self.config.name}-monitor-{i}" for i in range(self.config.monitor.actors)]

    def start_controller(self) -> Any:
        from jobs.controller import ControllerService, JobTemplate

        env = {**self.job_env, "MLFLOW_TRACKING_URI": self.tracking_uri}
        job = JobTemplate(ROOT, self.jobs_dir, env, self.python)
        return self._actor(ControllerService, self.controller_name).remote(self.config, self.jobs_address, job)

    def start_monitors(self) -> list[Any]:
        from jobs.monitor import MonitorService

        return [self._actor(MonitorService, name).remote(self.config, self.tracking_uri) for name in self.monitor_names]

    def start_services(self, timeout_s: float = 120.0) -> list[str]:
        """The controller and the monitors, each once constructed and answering; their actor names.
        The pipeline's topics are made first (the actors consume them)."""
        import ray

        from streams.kafka import ensure_topics
        from streams.topics import Topics

        ensure_topics(self.config.kafka, Topics.of(self.config).all())
        for actor in [self.start_controller(), *self.start_monitors()]:
            ray.get(actor.stats.remote(), timeout=timeout_s)
        return [self.controller_name, *self.monitor_names]

    def service_reports(self, timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
        """Each of this pipeline's actors, as it says (its `stats()`): running or not, its error, and
        what it has done. An actor that is gone or does not answer is reported as not running."""
        import ray

        reports: dict[str, dict[str, Any]] = {}
        for name in [self.controller_name, *self.monitor_names]:
            try:
                report: Any = ray.get(ray.get_actor(name).stats.remote(), timeout=timeout_s)
            except ValueError:  # no such actor
                reports[name] = {"running": False, "error": "not started (or stopped)"}
                continue
            except Exception as err:  # dead, or not answering
                reports[name] = {"running": False, "error": f"{type(err).__name__}: {err}"[:500]}
                continue
            counts = {k: len(v) if isinstance(v, tuple) else v for k, v in vars(report).items()
                      if k not in ("windows", "deliveries", "error", "running", "resumed")}  # fmt: skip
            reports[name] = {"running": report.running, "error": report.error, **counts}
        return reports

    def stop_services(self) -> list[str]:
        """Stop this pipeline's controller and monitors (by name, from any driver of the cluster) and
        delete its Serve app; the names of what was running. A part that is not running is skipped."""
        import ray
        from ray import serve

        stopped = []
        for name in [self.controller_name, *self.monitor_names]:
            try:
                actor = ray.get_actor(name)
            except ValueError:  # no such actor
                continue
            with contextlib.suppress(Exception):  # stopping anyway: the kill below ends it
                ray.get(actor.stop.remote(), timeout=40)
            ray.kill(actor, no_restart=True)
            stopped.append(name)
        if self.config.name in _serve_apps():
            serve.delete(self.config.name)
            stopped.append(f"serve:{self.config.name}")
        return stopped

    def serve(
        self,
        host: str,
        port: int,
        *,
        prefix: str = "/",
        api_key: str | None = None,
        version: str | None = None,
        challenger: str | None = None,
    ) -> str:
        """Deploy (or hot-swap) the Serve app; its URL. Serve's HTTP proxy starts on `host:port`
        unless this cluster's is already up (then that one is used, whatever `port` says)."""
        from ray import serve

        from serving.app import build_app

        app = build_app(self.config, self.tracking_uri, version=version, challenger=challenger, api_key=api_key)
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=self.config.name, route_prefix=prefix)
        return f"http://{host}:{port}{prefix.rstrip('/')}"


def _serve_apps() -> dict[str, Any]:
    """The Serve applications on the connected cluster, by name (none when Serve is not up)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return {}
    return dict(client.get_serve_details().get("applications") or {})


def app_route_prefix(name: str) -> str:
    """The route prefix of pipeline `name`'s app on the connected cluster: the one it has if it is
    running, else `/` while no other app has it, else `/<name>` (`route_prefix`)."""
    prefixes = {app: str(details.get("route_prefix") or "") for app, details in _serve_apps().items()}
    others = {prefix for app, prefix in prefixes.items() if app != name}
    return prefixes.get(name) or route_prefix(name, root_free="/" not in others)
