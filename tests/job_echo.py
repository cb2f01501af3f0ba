"""A stand-in job for the controller's tests: prints the summary a retrain job prints, then exits.

With `JOB_ECHO_FAIL=1` in its environment it exits 1 instead. It runs through the real Ray
Jobs API; what it stands in for is only the training work, which the end-to-end run test
(tests/test_cli.py) does for real.
"""

import json
import os
import sys

from jobs.controller import RESULT_MARK

if __name__ == "__main__":
    if os.environ.get("JOB_ECHO_FAIL") == "1":
        print("no data to train on", file=sys.stderr)
        sys.exit(1)
    trigger = sys.argv[sys.argv.index("--trigger-event-id") + 1]
    print(RESULT_MARK + json.dumps({"version": "7", "run_id": "r1", "report": {"accuracy": 0.9}, "trigger": trigger}))
