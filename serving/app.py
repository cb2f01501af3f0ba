"""The Ray Serve application: the champion over HTTP, hot-swapped, every prediction logged.

Routes (FastAPI ingress, OpenAPI docs at /docs):

- `POST /v1/predict`: one record of features, or a list of them; answers each record's
  prediction, class probabilities and request id (the caller's `request_id`, else a new one),
  with the model name and version. A bad field answers 422 naming it; a body over the limit
  413; a missing or wrong API key 401.
- `GET /v1/health`: no key needed; the model version and the prediction log's counts.
- `GET /v1/model`: name, version, alias and lineage summary.

Each route also answers under `/<pipeline>/v1/...` (404 `unknown_pipeline` for another name), so
that clients use one form whether the app has the cluster's `/` to itself or shares the cluster
under its own route prefix (`cluster.pipeline.route_prefix`).

The API key comes from the environment (`DRIFTLOOP_API_KEY`), sent as `x-api-key` or
`Authorization: Bearer ...`. A hot swap, two ways, neither failing a request:
- a `ModelPromoted` or `ModelRolledBack` on the models topic: each running replica loads the
  new version beside the old one and switches in one assignment;
- a redeploy (`driftloop deploy --version 7`, a `user_config` of `{"version": "7"}` or
  `{"alias": "champion"}`): Serve gives every `serve.run` a new code version, so it replaces
  the replicas, and with `serving.max_surge_percent` (100 by default) the new ones run before
  the old ones stop. With 0 (Serve's default) the old replica stops first, and requests wait
  in the proxy, or fail behind HAProxy, until its successor has loaded the model.

A replica may start before any model is promoted (`driftloop up` deploys at once): it then
answers 503 `no_model` (with `Retry-After`) and health says `no_model`, until the first
`ModelPromoted` on the models topic, a redeploy, or its own look at the registry's alias
(at most every `NO_MODEL_RECHECK_S`) gives it one.
"""

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from jobs.registry import ModelRegistry
from serving.metrics import ServingMetrics
from serving.model import ServedModel, load_served_model
from serving.predlog import PredictionLog
from serving.routing import route
from streams.config import API_KEY_ENV, API_KEY_HASH_ENV, KafkaSettings, PipelineConfig, field_key
from streams.errors import DecodeError, ErrorKind
from streams.events import DeliveryStep, ModelPromoted, ModelRejected, ModelRolledBack, new_event_id
from streams.kafka import Batch
from streams.serde import RequestCodec
from streams.topics import Topics

__all__ = ["API_KEY_ENV", "API_KEY_HASH_ENV", "ModelServer", "app_builder", "build_app", "key_hash"]


WATCH_ENV = "DRIFTLOOP_WATCH_MODELS"  # "0" turns the models-topic watch off
SMALL_REQUEST = 32  # requests with fewer records are batched with concurrent ones (@serve.batch)
NO_MODEL_RECHECK_S = 5.0  # a replica with no model asks the registry this often, at most
log = logging.getLogger(__name__)


def replica_name() -> str:
    """`host:pid` of this process, in /v1/health and the metrics. Called in the replica: a module
    global would be the driver's (Serve ships the class with its globals as they were there)."""
    return f"{os.uname().nodename}:{os.getpid()}"


def user_watch_models() -> bool:
    return os.environ.get(WATCH_ENV, "1") != "0"


api = FastAPI(title="driftloop", description="Predictions from the pipeline's champion model.", version="1")


def _error(status: int, kind: str, message: str, field: str | None = None) -> JSONResponse:
    log.warning("answered %d %s%s: %s", status, kind, f" ({field})" if field else "", message[:200])
    return JSONResponse({"detail": {"kind": kind, "field": field, "message": message}}, status_code=status)


def _no_model(name: str) -> JSONResponse:
    answer = _error(503, "no_model", f"no model of {name!r} is promoted yet: train and promote one (it loads itself)")
    answer.headers["retry-after"] = str(int(NO_MODEL_RECHECK_S))
    return answer


def _refused(name: str, reason: str) -> JSONResponse:
    answer = _error(503, "model_refused", f"the {name!r} model could not be loaded: {reason}")
    answer.headers["retry-after"] = str(int(NO_MODEL_RECHECK_S))
    return answer


def _predictions(ids: list[str], proba: Any, classes: Sequence[Any], keys: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"request_id": i, "prediction": classes[w], "probabilities": dict(zip(keys, p, strict=True))}
        for i, w, p in zip(ids, proba.argmax(axis=1).tolist(), proba.tolist(), strict=True)
    ]


# Above the deployment: Serve serializes the class when it is decorated, with the module's
# globals as they are at that moment.
def key_hash(key: str, salt: bytes | None = None) -> str:
    """`salt$sha256(salt + key)` in hex: what a replica needs to check a key, and not the key.

    The key itself must be random (`driftloop up` makes a 192-bit one): a plain hash of a short
    or guessable key can be searched offline by anyone who reads the logs.
    """
    salt = os.urandom(16) if salt is None else salt
    return f"{salt.hex()}${hashlib.sha256(salt + key.encode()).hexdigest()}"


def key_check(env: Mapping[str, str]) -> tuple[bytes, bytes]:
    """The salt and digest a replica checks keys against: from the hash, else from the key itself."""
    hashed = env.get(API_KEY_HASH_ENV)
    if hashed:
        salt_hex, sep, digest = hashed.partition("$")
        try:
            if sep and len(digest) == 64:
                return bytes.fromhex(salt_hex), bytes.fromhex(digest)
        except ValueError:
            pass
        raise RuntimeError(f"{API_KEY_HASH_ENV} is not a salt$sha256 pair in hex")
    key = env.get(API_KEY_ENV)
    if not key:
        raise RuntimeError(f"{API_KEY_ENV} is not set: the API key comes from the environment")
    salt = os.urandom(16)
    return salt, hashlib.sha256(salt + key.encode()).digest()


@serve.deployment(max_ongoing_requests=32, max_queued_requests=64, health_check_period_s=5)
@serve.ingress(api)
class ModelServer:
    """One replica: a served model, the request codec and the prediction log."""

    def __init__(self, config: PipelineConfig, tracking_uri: str, alias: str = "champion") -> None:
        self._salt, self._digest = key_check(os.environ)
        self.replica = replica_name()
        self.config = config
        self.alias = alias
        self.registry = ModelRegistry(config, tracking_uri)
        self.model: ServedModel | None = None  # None until a model is promoted
        # Why the alias's model could not be loaded (a refused artifact, an unreachable registry). The
        # replica starts anyway and answers 503 with the reason at once: a replica that failed to start
        # would leave no replica, and requests would wait in Serve's proxy for one that never comes.
        self.refused: str | None = None
        self._checked_at = time.monotonic()
        self._load_alias()
        self.challenger: ServedModel | None = None
        # How requests are shared with the challenger: the config's `serving.policy`, or while a
        # model is on a delivery step (`delivery.steps`), that step's (see `_deliver`).
        self.policy: tuple[str, float] = (config.serving.policy, config.serving.canary_fraction)
        if config.delivery.steps:
            self._resume_delivery()
        self.max_body = config.serving.max_body_bytes
        self.keys_of_features = [(f, field_key(f)) for f in config.schema.feature_names]
        self.codec = RequestCodec(
            config.schema, max_bytes=self.max_body, max_records=config.serving.max_records_per_request
        )
        kafka = None if config.kafka.embedded else config.kafka
        topics = Topics.of(config)
        serving = config.serving
        self.log = PredictionLog(
            kafka, topics.predictions, capacity=serving.log_capacity, timeout_s=serving.log_timeout_s
        )
        self.metrics = ServingMetrics(
            config.name,
            self.replica,
            lambda: (self.log.sent, self.log.dropped, self.log.buffered),
            lambda: {
                "champion": getattr(self.model, "version", None),
                "challenger": getattr(self.challenger, "version", None),
            },
            enabled=serving.metrics,
        )
        batcher: Any = self._score  # a serve.batch wrapper
        batcher.set_max_batch_size(min(serving.batch_max_size, serving.max_ongoing_requests))
        batcher.set_batch_wait_timeout_s(serving.batch_wait_ms / 1000)
        self._watcher = None
        if kafka is not None and user_watch_models():
            self._watcher = threading.Thread(target=self._watch_models, args=(kafka, topics), daemon=True)
            self._watcher.start()

    def _watch_models(self, kafka: KafkaSettings, topics: Topics) -> None:
        """Follow the models topic: a promotion or rollback swaps the served model."""
        from streams.kafka import StreamConsumer, ensure_topics
        from streams.serde import decode_events

        def handle(batch: Batch) -> None:
            ours = [e for e in batch.values if getattr(e, "model_name", None) == self.registry.name]
            for event in ours:  # a delivery's steps and its end, in order
                if isinstance(event, DeliveryStep):
                    self._deliver(event.model_version, event.step, event.fraction)
                elif isinstance(event, ModelRejected) and event.model_version == self._challenger_version():
                    self._end_delivery(f"version {event.model_version} was rejected")
            changes = [e for e in ours if isinstance(e, (ModelPromoted, ModelRolledBack))]
            if not changes:
                return
            last = max(changes, key=lambda e: e.occurred_at)
            target = last.model_version if isinstance(last, ModelPromoted) else last.to_version
            if self.model is None or target != self.model.version:
                log.info("swapping to %s version %s (%s)", last.model_name, target, type(last).__name__)
                challenger = self.challenger
                if challenger is not None and challenger.version == target:  # the challenger won: no reload
                    self.model = challenger
                else:
                    self.model = load_served_model(self.config, self.registry, version=target)
            if self.challenger is not None and self.challenger.version == self.model.version:
                self._end_delivery(f"version {target} is the champion")

        while True:
            try:
                ensure_topics(kafka, [topics.models])
                consumer = StreamConsumer(
                    kafka, [topics.models], decode_events, handle, group_id=None, dlq_topic=topics.dlq, from_end=True
                )
                consumer.run()
            except Exception as err:  # the broker may be down: keep serving, retry the watch
                log.warning("models topic watch interrupted (%s); retrying in 5s", err)
                time.sleep(5)

    def _deliver(self, version: str, step: str, fraction: float) -> None:
        """Serve `version` as the challenger on a delivery step (`shadow`, or `canary` answering
        `fraction` of the requests). One that cannot be loaded is not served (and logged): its
        step then gathers no evidence and ends when `delivery.max_step_s` runs out."""
        challenger = self.challenger
        if challenger is None or challenger.version != version:
            try:
                challenger = load_served_model(self.config, self.registry, version=version)
            except Exception as err:
                log.error("challenger version %s of %s not loaded: %s", version, self.registry.name, err)
                return
        self.policy = (step, fraction or self.config.delivery.canary_fraction)
        self.challenger = challenger
        log.info("version %s on delivery step %s (fraction %s)", version, step, self.policy[1])

    def _challenger_version(self) -> str | None:
        return None if self.challenger is None else self.challenger.version

    def _end_delivery(self, why: str) -> None:
        log.info("delivery of version %s ended: %s", getattr(self.challenger, "version", None), why)
        self.challenger = None
        self.policy = (self.config.serving.policy, self.config.serving.canary_fraction)

    def _resume_delivery(self) -> None:
        """A replica that starts during a delivery joins it (the registry's challenger and its step)."""
        try:
            found = self.registry.delivery()
        except Exception as err:  # the registry away: the next DeliveryStep brings it
            log.warning("no delivery state from the registry: %s", err)
            return
        if found is not None and (self.model is None or found[0] != self.model.version):
            version, step, _ = found
            self._deliver(version, step, self.config.delivery.canary_fraction)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Swap to `version` (or to what `alias` points at now); a no-op if that is already served."""
        version = user_config.get("version")
        alias = user_config.get("alias", "champion")
        target = str(version) if version is not None else self.registry.alias(alias)
        self.alias = alias
        if target is not None and (self.model is None or target != self.model.version):
            # one that cannot be loaded leaves the model served as it was (or none: 503 with the reason)
            self.model = self._try_load(version=target if version is not None else None, alias=alias) or self.model
        if self.config.serving.policy != "none":
            wanted = user_config.get("challenger") or self.registry.alias("challenger")
            if wanted is None or self.model is None or str(wanted) == self.model.version:
                self.challenger = None
            elif self.challenger is None or self.challenger.version != str(wanted):
                self.challenger = self._try_load(version=str(wanted))

    def _authorised(self, request: Request) -> bool:
        given = request.headers.get("x-api-key") or ""
        bearer = request.headers.get("authorization", "")
        if not given and bearer.lower().startswith("bearer "):
            given = bearer[7:]
        return hmac.compare_digest(hashlib.sha256(self._salt + given.encode()).digest(), self._digest)

    def _try_load(self, version: str | None = None, alias: str | None = None) -> ServedModel | None:
        """Load a version (or what an alias points at); None when it cannot be, with the reason in
        `refused` (a tampered artifact, the registry away). Never raises: a replica that failed to
        start or to reconfigure would leave requests waiting for one that never comes."""
        try:
            loaded = load_served_model(self.config, self.registry, version=version, alias=alias or self.alias)
        except LookupError:
            log.warning("no %r model of %s yet: answering 503 until one is promoted", self.alias, self.registry.name)
            self.refused = None
            return None
        except Exception as err:
            self.refused = f"{type(err).__name__}: {str(err)[:300]}"
            log.error("a model of %s was not loaded (%s): %s", self.registry.name, version or alias, self.refused)
            return None
        self.refused = None
        return loaded

    def _load_alias(self) -> ServedModel | None:
        """Load what the alias points at, unless the watch loaded a model meanwhile."""
        loaded = self._try_load()
        if self.model is None and loaded is not None:
            self.model = loaded
        return self.model

    async def _served(self) -> ServedModel | None:
        """The model; with none yet, look at the registry's alias (at most every NO_MODEL_RECHECK_S)."""
        if self.model is None and time.monotonic() - self._checked_at >= NO_MODEL_RECHECK_S:
            self._checked_at = time.monotonic()
            await asyncio.to_thread(self._load_alias)
        return self.model

    def _unavailable(self) -> JSONResponse:
        return _refused(self.registry.name, self.refused) if self.refused else _no_model(self.registry.name)

    @api.post("/v1/predict")
    async def predict(self, request: Request) -> Response:
        answer = await self._predict(request)
        if answer.status_code != 200:  # answers with predictions are counted with them
            self.metrics.answered(answer.status_code)
        return answer

    async def _predict(self, request: Request) -> Response:
        if not self._authorised(request):
            return _error(401, "unauthorized", "a valid API key is required (x-api-key or Authorization: Bearer)")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return _error(413, ErrorKind.OVERSIZED.value, f"body of {declared} bytes exceeds {self.max_body}")
        body = await request.body()
        try:
            records = self.codec.decode(body)
        except DecodeError as err:
            status = 413 if err.kind is ErrorKind.OVERSIZED else 422
            return _error(status, err.kind.value, err.message, err.field)
        champion, challenger = await self._served(), self.challenger  # one pair for the whole request
        if champion is None:
            return self._unavailable()
        serving = self.config.serving
        key = records[0].request_id or new_event_id()
        policy, fraction = self.policy
        decision = route(key, policy, fraction, challenger is not None)
        model = challenger if decision.answer_with_challenger and challenger is not None else champion
        rows = [{f: getattr(r, k) for f, k in self.keys_of_features} for r in records]
        small = len(rows) < SMALL_REQUEST and serving.batch_max_size > 1
        proba = await self._score((model, rows)) if small else model.predict(rows)
        ids = [r.request_id or (key if i == 0 else new_event_id()) for i, r in enumerate(records)]
        predictions = _predictions(ids, proba, model.labels, model.keys)
        variant = "challenger" if model is not champion else "champion"
        self.log.append(self.config.name, model.name, model.version, rows, predictions, variant)
        counts = {variant: len(predictions)}
        if decision.shadow and challenger is not None:
            shadowed = _predictions(ids, challenger.predict(rows), challenger.labels, challenger.keys)
            self.log.append(self.config.name, challenger.name, challenger.version, rows, shadowed, "shadow")
            counts["shadow"] = len(shadowed)
        self.metrics.answered(200, counts)
        body = msgspec.json.encode(
            {"model": {"name": model.name, "version": model.version}, "predictions": predictions}
        )
        return Response(content=body, media_type="application/json")

    def _other_pipeline(self, pipeline: str) -> JSONResponse | None:
        if pipeline == self.config.name:
            return None
        return _error(404, "unknown_pipeline", f"this endpoint serves pipeline {self.config.name!r}, not {pipeline!r}")

    @api.post("/{pipeline}/v1/predict")
    async def predict_in(self, pipeline: str, request: Request) -> Response:
        return self._other_pipeline(pipeline) or await self.predict(request)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
    async def _score(self, jobs: list[tuple[ServedModel, list[dict[str, Any]]]]) -> list[Any]:
        """Concurrent small requests share one transform and forward pass per model."""
        out: list[Any] = [None] * len(jobs)
        groups: dict[int, tuple[ServedModel, list[int]]] = {}
        for i, (model, _) in enumerate(jobs):
            groups.setdefault(id(model), (model, []))[1].append(i)
        for model, members in groups.values():
            proba = model.predict([row for i in members for row in jobs[i][1]])
            start = 0
            for i in members:
                out[i] = proba[start : start + len(jobs[i][1])]
                start += len(jobs[i][1])
        return out

    @api.get("/v1/health")
    async def health(self) -> dict[str, Any]:
        """200 while the replica runs; `status` is `no_model` until a model is promoted, `model_refused`
        while the alias's model cannot be loaded (the reason is for callers with the key: /v1/predict)."""
        model = await self._served()
        return {
            "status": "ok" if model is not None else "model_refused" if self.refused else "no_model",
            "model_version": model.version if model is not None else None,
            "predictions_logged": self.log.sent,
            "predictions_buffered": self.log.buffered,
            "predictions_dropped": self.log.dropped,
            "prediction_log_alive": self.log.alive,
            "prediction_log_producers_replaced": self.log.replaced,
            "replica": self.replica,  # the counts above are this replica's
        }

    @api.get("/{pipeline}/v1/health", response_model=None)
    async def health_in(self, pipeline: str) -> dict[str, Any] | JSONResponse:
        return self._other_pipeline(pipeline) or await self.health()

    @api.get("/{pipeline}/v1/model")
    async def model_info_in(self, pipeline: str, request: Request) -> JSONResponse:
        return self._other_pipeline(pipeline) or await self.model_info(request)

    @api.get("/v1/model")
    async def model_info(self, request: Request) -> JSONResponse:
        if not self._authorised(request):
            return _error(401, "unauthorized", "a valid API key is required (x-api-key or Authorization: Bearer)")
        m = await self._served()
        if m is None:
            return self._unavailable()
        info: dict[str, Any] = {"name": m.name, "version": m.version, "alias": m.alias, "kind": m.spec.kind}
        info |= {"classes": list(m.spec.classes), "inputs": m.features.width, "lineage": m.lineage}
        return JSONResponse(info)


def build_app(
    config: PipelineConfig,
    tracking_uri: str,
    alias: str = "champion",
    version: str | None = None,
    challenger: str | None = None,
    api_key: str | None = None,
) -> Any:
    """The Serve application. The API key (`api_key`, else `DRIFTLOOP_API_KEY`) never travels: the
    replicas get a salted SHA-256 of it (`DRIFTLOOP_API_KEY_SHA256`) in their runtime environment,
    which Ray writes to its logs and shows in the dashboard. Without a key, that hash from this
    environment serves (`driftloop launch` run as a job: only the hash travels to the cluster)."""
    key = api_key or os.environ.get(API_KEY_ENV)
    hashed = key_hash(key) if key else os.environ.get(API_KEY_HASH_ENV)
    if not hashed:
        raise RuntimeError(f"set {API_KEY_ENV} to the API key clients must send (or {API_KEY_HASH_ENV} to its hash)")
    key_check({API_KEY_HASH_ENV: hashed})  # a malformed hash is refused here, not in every replica
    s = config.serving
    scaling: dict[str, Any] = {"num_replicas": s.num_replicas}
    if s.max_replicas is not None:
        scaling = {"autoscaling_config": {"min_replicas": s.num_replicas, "max_replicas": s.max_replicas,
                                          "target_ongoing_requests": s.target_ongoing_requests}}  # fmt: skip
    deployment: Any = ModelServer  # a serve.Deployment once decorated
    return deployment.options(
        ray_actor_options={"runtime_env": {"env_vars": {API_KEY_HASH_ENV: hashed}}, "num_cpus": s.num_cpus}
        | ({"resources": dict(s.resources)} if s.resources else {}),
        user_config=({"version": version} if version else {"alias": alias})
        | ({"challenger": challenger} if challenger else {}),
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        logging_config={"enable_access_log": s.access_log},
        max_surge_percent=s.max_surge_percent,
        **scaling,
    ).bind(config, tracking_uri, alias)


def app_builder(args: dict[str, str]) -> Any:
    """For `serve run` / `serve deploy`: `import_path: serving.app:app_builder`, `args: {config: ...}`.

    The tracking URI comes from `args.tracking_uri`, `MLFLOW_TRACKING_URI` or the config.
    """
    from streams.config import load_config

    config = load_config(args["config"])
    uri = args.get("tracking_uri") or config.mlflow.tracking_uri
    if not uri:
        raise RuntimeError("no MLflow tracking URI: set MLFLOW_TRACKING_URI or pass args.tracking_uri")
    return build_app(config, uri, alias=args.get("alias", "champion"), version=args.get("version"))
