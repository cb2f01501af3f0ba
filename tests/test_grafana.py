"""The Grafana dashboard queries only series driftloop exports, and shows every one. Pure."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.controller_metrics import SERIES as CONTROLLER
from jobs.metrics import exported_names
from jobs.monitor_metrics import SERIES as MONITOR
from serving.metrics import SERIES as SERVING

DASHBOARD = Path(__file__).resolve().parent.parent / "cluster" / "grafana" / "driftloop.json"
NAME = re.compile(r"\bray_driftloop_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(ray_driftloop_[a-z0-9_]+)(\{[^}]*\})?")
PIPELINE = 'pipeline=~"$pipeline"'
DATASOURCE = "${datasource}"
ROWS = ("Drift per feature", "Model quality", "Serving health", "The loop")  # issue 16's (a)-(d)
DECLARED = {**MONITOR, **CONTROLLER, **SERVING}

Dashboard = dict[str, Any]


def load() -> Dashboard:
    dashboard: Dashboard = json.loads(DASHBOARD.read_text())
    return dashboard


def panels(dashboard: Dashboard) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels a collapsed row holds included."""
    stack = list(dashboard.get("panels", []))
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))
        yield panel


def queries(dashboard: Dashboard) -> Iterator[str]:
    """The PromQL of panels' targets and annotations: what must filter by the chosen pipeline."""
    for panel in panels(dashboard):
        yield from (t["expr"] for t in panel.get("targets", []) if "expr" in t)
    yield from (a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a)


def expressions(dashboard: Dashboard) -> Iterator[str]:
    """Every PromQL expression: `queries` and the template variables' queries."""
    yield from queries(dashboard)
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        yield query.get("query", "") if isinstance(query, dict) else str(query or "")


def unknown_names(dashboard: Dashboard) -> set[str]:
    """Names queried that no part exports (a misspelling, or a series renamed or removed)."""
    exported = set().union(*(exported_names(s) for s in (MONITOR, CONTROLLER, SERVING)))
    return {n for e in expressions(dashboard) for n in NAME.findall(e)} - exported


def unshown_series(dashboard: Dashboard) -> set[str]:
    """Declared series (names without Ray's prefix) that no expression queries."""
    queried = {n.removeprefix("ray_") for e in expressions(dashboard) for n in NAME.findall(e)}
    queried |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in queried}
    return set(DECLARED) - queried


def unfiltered(dashboard: Dashboard) -> list[str]:
    """Selectors in panels and annotations that do not keep to the chosen pipelines."""
    return [m.group(0) for e in queries(dashboard) for m in SELECTOR.finditer(e) if PIPELINE not in (m.group(2) or "")]


def test_every_series_the_dashboard_queries_is_exported_and_every_declared_one_is_shown() -> None:
    dashboard = load()
    assert unknown_names(dashboard) == set()
    assert unshown_series(dashboard) == set(), "a declared series no panel shows: add a panel"
    assert unfiltered(dashboard) == []


def test_panels_have_titles_and_the_chosen_datasource_and_every_row_is_there() -> None:
    dashboard = load()
    shown = [p for p in panels(dashboard) if p["type"] != "row"]
    assert shown and all(p.get("title") for p in panels(dashboard))
    assert all(p["type"] == "timeseries" for p in shown)
    assert all(p["datasource"]["uid"] == DATASOURCE for p in shown)
    assert all(t["datasource"]["uid"] == DATASOURCE for p in shown for t in p["targets"])
    assert [p["title"] for p in panels(dashboard) if p["type"] == "row"] == list(ROWS)
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_the_variables_and_the_annotations() -> None:
    dashboard = load()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["pipeline"]["datasource"]["uid"] == DATASOURCE
    assert variables["pipeline"]["query"]["query"] == "label_values(ray_driftloop_windows_total, pipeline)"
    annotations = {a["name"]: a for a in dashboard["annotations"]["list"]}
    assert all(a["datasource"] == {"type": "prometheus", "uid": DATASOURCE} for a in annotations.values())
    assert (
        'ray_driftloop_model_version{pipeline=~"$pipeline",variant="champion"}'
        in (annotations["Promotions and swaps"]["expr"])
    )
    assert "increase(ray_driftloop_retrain_requests_total" in annotations["Retrain requests"]["expr"]
    assert "increase(ray_driftloop_rollbacks_total" in annotations["Rollbacks"]["expr"]


def _set_expr(d: Dashboard, expr: str) -> None:
    d["panels"][-1]["targets"][0]["expr"] = expr


def _in_a_collapsed_row(d: Dashboard) -> None:
    last = d["panels"].pop()
    last["targets"][0]["expr"] = 'ray_driftloop_consumer_lagg{pipeline=~"$pipeline"}'
    d["panels"].append({"type": "row", "title": "More", "id": 999, "collapsed": True, "panels": [last]})


def _in_an_annotation(d: Dashboard) -> None:
    d["annotations"]["list"][0]["expr"] = "increase(ray_driftloop_rolbacks_total[1m]) > 0"


def _in_a_variable(d: Dashboard) -> None:
    d["templating"]["list"][1]["query"]["query"] = "label_values(ray_driftloop_window, pipeline)"


# Where a misspelling goes -> (how the copy is changed, the name the checker must report).
MISSPELLINGS: dict[str, tuple[Callable[[Dashboard], None], str]] = {
    "panel": (
        lambda d: _set_expr(d, 'ray_driftloop_windows_totl{pipeline=~"$pipeline"}'),
        "ray_driftloop_windows_totl",
    ),
    "collapsed row": (_in_a_collapsed_row, "ray_driftloop_consumer_lagg"),
    "annotation": (_in_an_annotation, "ray_driftloop_rolbacks_total"),
    "variable": (_in_a_variable, "ray_driftloop_window"),
    "histogram suffix": (
        lambda d: _set_expr(d, 'rate(ray_driftloop_label_lag_seconds_buckets{pipeline=~"$pipeline"}[5m])'),
        "ray_driftloop_label_lag_seconds_buckets",
    ),
}


@pytest.mark.parametrize("where", list(MISSPELLINGS))
def test_a_misspelt_series_is_reported(where: str) -> None:
    dashboard = load()  # a fresh copy: the file is not touched
    mutate, misspelt = MISSPELLINGS[where]
    mutate(dashboard)
    assert unknown_names(dashboard) == {misspelt}


def test_a_series_no_panel_shows_and_a_query_without_the_pipeline_are_reported() -> None:
    dashboard = load()
    dashboard["panels"] = [
        p for p in dashboard["panels"] if not any("driftloop_consumer_lag" in t["expr"] for t in p.get("targets", []))
    ]
    assert unshown_series(dashboard) == {"driftloop_consumer_lag"}
    dashboard["panels"][-1]["targets"][0]["expr"] = "sum(rate(ray_driftloop_monitored_total[1m]))"
    assert unfiltered(dashboard) == ["ray_driftloop_monitored_total"]
