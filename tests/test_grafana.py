"""The Grafana dashboard queries only series driftloop exports, and shows every one. Pure."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.controller_metrics import SERIES as CONTROLLER
from jobs.metrics import exported_names
from jobs.monitor_metrics import SERIES as MONITOR
from serving.metrics import SERIES as SERVING

DASHBOARD = Path(__file__).resolve().parent.parent / "cluster" / "grafana" / "driftloop.json"
NAME = re.compile(r"\bray_driftloop_[a-z0-9_]+")
ROWS = ("Drift per feature", "Model quality", "Serving health", "The loop")


def expressions(dashboard: dict[str, Any]) -> Iterator[str]:
    """Every PromQL expression: panels' targets (rows' nested panels too), annotations, variables."""
    stack = list(dashboard.get("panels", []))
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        yield from (t["expr"] for t in panel.get("targets", []) if "expr" in t)
    yield from (a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a)
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            yield query.get("query", "")


def unknown_names(dashboard: dict[str, Any]) -> set[str]:
    exported = set().union(*(exported_names(s) for s in (MONITOR, CONTROLLER, SERVING)))
    return {n for e in expressions(dashboard) for n in NAME.findall(e)} - exported


def test_every_series_the_dashboard_queries_is_exported_and_every_exported_one_is_shown() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert unknown_names(dashboard) == set()
    queried = {n.removeprefix("ray_") for e in expressions(dashboard) for n in NAME.findall(e)}
    queried |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in queried}
    assert set(MONITOR) | set(CONTROLLER) | set(SERVING) <= queried, "a series no panel shows"


def test_every_panel_has_a_title_and_the_chosen_datasource_and_every_row_is_there() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p["title"] and p["datasource"]["uid"] == "${datasource}" for p in panels)
    assert all(t["datasource"]["uid"] == "${datasource}" for p in panels for t in p["targets"])
    assert [p["title"] for p in dashboard["panels"] if p["type"] == "row"] == list(ROWS)
    assert all('pipeline=~"$pipeline"' in e for e in expressions(dashboard) if "ray_driftloop_" in e and "{" in e)
    assert {a["name"] for a in dashboard["annotations"]["list"]} >= {"Promotions and swaps", "Retrain requests"}


@pytest.mark.parametrize("where", ["panel", "annotation"])
def test_a_misspelt_series_is_caught(where: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    if where == "panel":
        dashboard["panels"][-1]["targets"][0]["expr"] = 'ray_driftloop_windows_totl{pipeline=~"$pipeline"}'
    else:
        dashboard["annotations"]["list"][0]["expr"] = "increase(ray_driftloop_rolbacks_total[1m]) > 0"
    assert len(unknown_names(dashboard)) == 1
