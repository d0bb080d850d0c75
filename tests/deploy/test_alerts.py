"""The chart's PrometheusRule and dashboard without a cluster: the rule validated against a
small schema of the monitoring.coreos.com/v1 resource (kubernetes-validate has none), the
alerts the issue asks for present, and every PromQL expression (alerts and dashboard panels)
parsed with promql-parser, each metric it names looked up in a real /metrics scrape of a
gatekeeper + sidecar server, each alert selecting this release by its job label."""

from __future__ import annotations

import asyncio
import functools
import json

import yaml
from test_chart import CHART, by_kind, render

RULE_SCHEMA = {  # the part of monitoring.coreos.com/v1 PrometheusRule that the chart uses
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "required": ["groups"], "additionalProperties": False,
                 "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                     "type": "object", "required": ["name", "rules"],
                     "additionalProperties": False, "properties": {
                         "name": {"type": "string", "minLength": 1},
                         "rules": {"type": "array", "minItems": 1, "items": {
                             "type": "object", "required": ["alert", "expr", "for", "labels",
                                                            "annotations"],
                             "additionalProperties": False, "properties": {
                                 "alert": {"type": "string",
                                           "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                                 "expr": {"type": "string", "minLength": 1},
                                 "for": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d))+$"},
                                 "labels": {"type": "object", "required": ["severity"],
                                            "properties": {"severity": {
                                                "enum": ["warning", "critical"]}},
                                            "additionalProperties": {"type": "string"}},
                                 "annotations": {"type": "object",
                                                 "required": ["summary", "description"],
                                                 "additionalProperties": {"type": "string"}},
                             }}}}}}}},
    },
}
ALERTS = {"HopgateOODRateSpike", "HopgateScoreDrift", "HopgateHigh5xxRate",
          "HopgateQueueSaturated", "HopgateUpstreamFailures"}


def rules(values: dict) -> tuple[dict, list[dict]]:
    (rule,) = by_kind(render(values), "PrometheusRule")
    return rule, [r for g in rule["spec"]["groups"] for r in g["rules"]]


def selectors(expr: str) -> list:
    """Every VectorSelector in a PromQL expression (the promql-parser AST)."""
    import promql_parser

    out, stack = [], [promql_parser.parse(expr)]
    while stack:
        node = stack.pop()
        if isinstance(node, promql_parser.VectorSelector):
            out.append(node)
        for attr in ("expr", "lhs", "rhs", "args", "vector_selector", "param"):
            child = getattr(node, attr, None)
            for c in child if isinstance(child, list) else [child]:
                if type(c).__module__.startswith("promql_parser"):
                    stack.append(c)
    return out


def test_prometheusrule_validates_and_alerts_what_the_issue_asks():
    import jsonschema

    sidecar = yaml.safe_load((CHART / "ci" / "sidecar.yaml").read_text())
    rule, rs = rules(sidecar)
    jsonschema.validate(rule, RULE_SCHEMA)
    assert {r["alert"] for r in rs} == ALERTS
    _, standalone = rules({"alerts": {"enabled": True}})  # no classifier, no upstream alert
    assert {r["alert"] for r in standalone} == ALERTS - {"HopgateUpstreamFailures"}
    assert not by_kind(render({}), "PrometheusRule")  # off unless asked for
    rule, rs = rules({"alerts": {"enabled": True, "labels": {"release": "prom"},
                                 "oodRate": 0.3}, "settings": {"queueImages": 100}})
    assert rule["metadata"]["labels"]["release"] == "prom"
    exprs = {r["alert"]: r["expr"] for r in rs}
    assert exprs["HopgateOODRateSpike"].endswith("> 0.3")
    assert "> 80" in exprs["HopgateQueueSaturated"]  # 0.8 of the queue bound


@functools.cache
def _scraped_names() -> frozenset[str]:
    """The series names a gatekeeper-and-sidecar server exports, from its own /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from hopgate.service.app import create_app
    from hopgate.service.config import Settings

    async def scrape() -> str:
        app = create_app(Settings(upstream_url="http://127.0.0.1:9/predict", buckets=[1],
                                  proxy_routes=["/predict"], admin_port=9901,
                                  log_requests=False))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://h:9901") as c:
                return (await c.get("/metrics")).text

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
                "gauge": [""], "info": ["_info"]}
    return frozenset(fam.name + s for fam in text_string_to_metric_families(asyncio.run(scrape()))
                     for s in suffixes.get(fam.type, [""]))


def test_alert_exprs_parse_and_use_only_exported_metrics():
    exported = _scraped_names()
    _, rs = rules(yaml.safe_load((CHART / "ci" / "sidecar.yaml").read_text()))
    (svc,) = by_kind(render({}), "Service")
    for r in rs:
        sels = selectors(r["expr"])  # raises on a PromQL syntax error
        assert sels, r["alert"]
        for sel in sels:
            assert sel.name in exported, (r["alert"], sel.name)
            # the ServiceMonitor's job label (the Service's name): this release only
            assert f'job="{svc["metadata"]["name"]}"' in str(sel), (r["alert"], str(sel))


def test_dashboard_exprs_use_only_exported_metrics():
    (cm,) = by_kind(render({}), "ConfigMap")
    exported = _scraped_names()
    for p in json.loads(cm["data"]["hopgate.json"])["panels"]:
        for t in p["targets"]:
            assert all(sel.name in exported for sel in selectors(t["expr"])), t["expr"]
