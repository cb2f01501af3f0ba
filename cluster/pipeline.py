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

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streams.config import PipelineConfig
from streams.errors import DriftloopError

__all__ = ["ROOT", "Pipeline", "route_prefix"]

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

    def _actor(self, cls: type, name: str) -> Any:
        import ray

        options: dict[str, Any] = {"name": name, "num_cpus": 0, "max_restarts": -1}
        if self.detached:
            options["lifetime"] = "detached"
        remote: Any = ray.remote(cls)
        return remote.options(**options)

    @property
    def controller_name(self) -> str:
        return f"{self.config.name}-controller"

    @property
    def monitor_names(self) -> list[str]:
        return [f"{self.config.name}-monitor-{i}" for i in range(self.config.monitor.actors)]

    def start_controller(self) -> Any:
        from jobs.controller import ControllerService, JobTemplate

        job = JobTemplate(ROOT, self.jobs_dir, {"MLFLOW_TRACKING_URI": self.tracking_uri}, self.python)
        return self._actor(ControllerService, self.controller_name).remote(self.config, self.jobs_address, job)

    def start_monitors(self) -> list[Any]:
        from jobs.monitor import MonitorService

        return [self._actor(MonitorService, name).remote(self.config, self.tracking_uri) for name in self.monitor_names]

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
