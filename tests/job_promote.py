"""A job of the racing-promotion test on two nodes (tests/test_cluster_loop.py): one promotion.

`python -m tests.job_promote NAME VERSION ROLE OTHER PAUSE` waits until the job of role OTHER
says it is ready (a tag on the registered model: the barrier goes through the MLflow server, as
everything between nodes does), then promotes VERSION of the pipeline NAME with the demo's
gate, holding its judgement `PAUSE` seconds to widen the race. MLFLOW_TRACKING_URI names the
server. Its last line is the verdict and where it ran, as JSON.
"""

import dataclasses
import json
import os
import socket
import sys
import time

from jobs.registry import ModelRegistry
from streams.config import load_config

MARK = "PROMOTED "

if __name__ == "__main__":
    name, version, role, other, pause = sys.argv[1:6]
    config = dataclasses.replace(load_config("configs/demo.yaml", env={}), name=name)
    registry = ModelRegistry(config, os.environ["MLFLOW_TRACKING_URI"])
    registry.client.set_registered_model_tag(name, f"race.ready.{role}", socket.gethostname())
    deadline = time.monotonic() + 120
    while f"race.ready.{other}" not in registry.client.get_registered_model(name).tags:
        if time.monotonic() > deadline:
            sys.exit(f"the {other} job never got ready")
        time.sleep(0.1)
    verdict = registry.promote(version, config.gate, pause=float(pause))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # the address this node reaches the server from
        probe.connect((os.environ["MLFLOW_TRACKING_URI"].split("//")[1].split(":")[0], 9))
        ip = probe.getsockname()[0]
    print(
        MARK + json.dumps({"version": version, "promote": verdict.promote, "reasons": list(verdict.reasons), "ip": ip})
    )
