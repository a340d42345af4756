"""The Grafana dashboard queries only what a running stack exports: a real `pdserve serve`
on the embedded model (every prompt prefilled remotely, so KV transfers happen), a few
requests (one prompt twice, for prefix hits), then every selector of every dashboard
query must select at least one series scraped from the router's and the workers' /metrics,
and every label the queries group by must be on those series."""

from __future__ import annotations

import json
import re
import urllib.request
from dataclasses import dataclass

import pytest

from tests.deploy.deploy_files import DASHBOARD_FILE
from tests.harness.stack import ServeStack

# labels Prometheus adds to every scraped series (the target's), not exported by pdserve
TARGET_LABELS = {"job", "instance", "component", "namespace", "pod"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset"}  # fmt: skip
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# dashboard variables, as the test resolves them: every model
VARIABLES = {"$model_name": ".*", "$__rate_interval": "1m"}


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)

    def matches(self, labels: dict[str, str]) -> bool:
        for label, op, value in self.matchers:
            if label in TARGET_LABELS:
                continue
            actual = labels.get(label, "")
            hit = re.fullmatch(value, actual) is not None if op in ("=~", "!~") else actual == value
            if hit != (op in ("=", "=~")):
                return False
        return True


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def parse_query(expr: str) -> tuple[list[Selector], set[str]]:
    """The selectors of a PromQL expression and the labels it groups by."""
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    grouping: set[str] = set()
    for match in re.finditer(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        grouping |= {label.strip() for label in match.group(1).split(",") if label.strip()}
    expr = re.sub(r"\b(?:by|without)\s*\([^)]*\)", " ", expr)
    if expr.startswith("label_values("):
        metric, label = expr.removeprefix("label_values(").removesuffix(")").split(",")
        return [Selector(metric.strip(), ())], {label.strip()}
    selectors = []
    for match in _SELECTOR.finditer(expr):
        body = match.group(2)
        matchers = tuple(_MATCHER.findall(body))
        assert ",".join(f'{a}{b}"{c}"' for a, b, c in matchers) == re.sub(r"\s", "", body), body
        assert match.group(1), f"selector without a metric name in {expr!r}"
        selectors.append(Selector(match.group(1), matchers))
    rest = _SELECTOR.sub(" ", expr)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    for name in _IDENTIFIER.findall(rest):
        following = rest[rest.index(name) + len(name) :].lstrip()
        if name in PROMQL_WORDS or following.startswith("("):
            continue
        selectors.append(Selector(name, ()))  # a bare metric name
    return selectors, grouping


def scrape(url: str) -> tuple[list[tuple[str, dict[str, str], float]], set[str]]:
    """(name, labels, value) of every sample at `url`, and the metric families it declares."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    series = []
    declared = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        pairs = re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels)
        series.append((name, dict(pairs), float(value)))
    return series, declared


@dataclass
class Scraped:
    series: list[tuple[str, dict[str, str], float]]
    declared: set[str]

    def declared_without_samples(self, metric: str) -> bool:
        """A labelled metric nothing has counted yet (no rejected request, say) is declared
        with its HELP and TYPE but has no sample until its first labels are set."""
        family = re.sub(r"_(bucket|sum|count)$", "", metric)
        names = {family, f"{family}_bucket", f"{family}_sum", f"{family}_count"}
        return family in self.declared and not any(name in names for name, _, _ in self.series)


def test_query_parser_finds_selectors_and_grouping():
    selectors, grouping = parse_query(
        'sum by (role) (rate(vllm:prefix_cache_hits_total{role=~"prefill|decode", model_name=~"$model_name"}'
        "[$__rate_interval])) / sum by (role) (rate(pdserve_router_x_total[5m]))"
    )
    assert [s.metric for s in selectors] == ["vllm:prefix_cache_hits_total", "pdserve_router_x_total"]
    assert selectors[0].matchers == (("role", "=~", "prefill|decode"), ("model_name", "=~", ".*"))
    assert grouping == {"role"}
    assert selectors[0].matches({"role": "decode", "model_name": "m"})
    assert not selectors[0].matches({"model_name": "m"})
    router_only = Selector("m", (("role", "=", ""),))
    assert router_only.matches({}) and not router_only.matches({"role": "decode"})


@pytest.fixture(scope="module")
def scraped() -> Scraped:
    stack = ServeStack(
        ["--num-prefill-workers", "1", "--local-prefill-threshold", "0", "--max-model-len", "1024"]
    ).ready()
    try:
        with urllib.request.urlopen(stack.url + "/v1/models", timeout=10) as response:
            model = json.load(response)["data"][0]["id"]
        prompts = ["Describe the tides of the sea in a few words. " * 6] * 2 + ["Name three colours."]
        for prompt in prompts:
            body = json.dumps(
                {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 6}
            )
            request = urllib.request.Request(
                stack.url + "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                assert response.status == 200
        result = Scraped(*scrape(stack.url + "/metrics"))
        for role in ("prefill", "decode"):
            for _, metrics_port in stack.workers[role]:
                series, declared = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
                result.series += series
                result.declared |= declared
        return result
    finally:
        stack.stop()


def test_every_dashboard_query_selects_series_the_stack_exports(scraped):
    queries = dashboard_queries()
    assert len(queries) > 20
    missing = []
    empty = set()
    for expr in queries:
        selectors, grouping = parse_query(expr)
        assert selectors, expr
        selected = []
        for selector in selectors:
            hits = [
                labels
                for name, labels, _ in scraped.series
                if name == selector.metric and selector.matches(labels)
            ]
            if not hits and scraped.declared_without_samples(selector.metric):
                empty.add(selector.metric)
            elif not hits:
                missing.append(f"{selector} in {expr}")
            selected += hits
        for label in grouping - TARGET_LABELS:
            if not selected and empty:
                continue  # nothing counted yet: its labels cannot be seen
            if not any(label in labels for labels in selected):
                missing.append(f"label {label!r} (grouped by) on no selected series of {expr}")
    assert not missing, "\n".join(missing)
    # only the error counters may still be empty after a few good requests
    assert empty <= {"pdserve_router_requests_rejected_total", "pdserve_router_requests_failed_total"}, empty


def test_the_stack_moved_kv_blocks_and_hit_the_prefix_cache(scraped):
    """The panels that need traffic to show anything did get it."""

    def total(name: str, **labels: str) -> float:
        wanted = labels.items()
        return sum(
            v for n, ls, v in scraped.series if n == name and all(ls.get(k, "") == x for k, x in wanted)
        )

    assert total("vllm:request_success_total", role="") == 3  # the router's count
    assert total("pdserve_router_prefill_decisions_total", decision="remote") == 3
    assert total("vllm:nixl_bytes_transferred_count", role="decode") == 3
    assert total("vllm:nixl_bytes_transferred_sum", role="decode") > 0
    assert total("vllm:prefix_cache_hits_total", role="decode") > 0
