"""Schemathesis against the router's own /openapi.json, served by a real uvicorn in front
of a fake worker: request bodies generated from the documented schemas, valid and
deliberately invalid, for every operation. No answer may be a 5xx, have a status or
content type the description does not list, or break the documented response schema;
every body the schema forbids must be refused with a 4xx.

CI runs at least 1000 generated cases here (the last test checks the count); the
`slow` test runs ten times as many per operation."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig

from common.openai_api import ServedModel
from router.app import create_app
from router.config import RouterConfig
from tests.router.app_harness import (
    MAX_MODEL_LEN,
    SERVED_NAMES,
    VOCAB_SIZE,
    embedded_tokenizer,
    running_router,
    served_model,
)
from tests.router.fake_worker import EOS, FakeWorker

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]
CI_EXAMPLES = 60  # per operation and generation phase: about 1400 cases over the 11 operations
SLOW_EXAMPLES = 600
MIN_CI_CASES = 1000

calls: list[str] = []  # one entry per generated case sent, for the count at the end

ROUTER_SETTINGS = {"max_event_size": 256 * 1024}  # generated bodies that outgrow it get the documented 413


def _description() -> dict:
    """/openapi.json of a router with ROUTER_SETTINGS, built without starting anything (the
    description does not depend on the model; test_the_live_router_serves_this_description
    checks it is what the live router serves)."""
    config = RouterConfig(decode_workers=["tcp://127.0.0.1:9"], **ROUTER_SETTINGS)
    served = ServedModel(
        names=list(SERVED_NAMES), max_model_len=MAX_MODEL_LEN, tokenizer=None, vocab_size=VOCAB_SIZE
    )
    return create_app(config, served).openapi()


def _schema(max_examples: int):
    config = SchemathesisConfig.from_dict(
        {
            "generation": {"mode": "all", "max-examples": max_examples, "deterministic": True},
            "phases": {"coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
            "request-timeout": 30,
        }
    )
    return schemathesis.openapi.from_dict(DESCRIPTION, config=config)


DESCRIPTION = _description()
schema = _schema(CI_EXAMPLES)
schema_long = _schema(SLOW_EXAMPLES)


@pytest.fixture(scope="module")
def live_router():
    tokenizer = embedded_tokenizer()
    reply = tokenizer.encode(" fine", add_special_tokens=False) + [EOS]
    worker = FakeWorker(script=lambda prompt: reply, token_interval_s=0.002)
    with running_router(served_model(tokenizer), [worker], **ROUTER_SETTINGS) as live:
        yield live


@pytest.fixture(scope="module")
def http():
    with requests.Session() as session:
        yield session


def test_the_live_router_serves_this_description(live_router):
    assert requests.get(live_router.url + "/openapi.json", timeout=10).json() == DESCRIPTION


@schema.parametrize()
def test_generated_requests_get_documented_answers_and_never_a_5xx(case, live_router, http):
    calls.append(case.operation.label)
    case.call_and_validate(base_url=live_router.url, session=http, checks=CHECKS)


@pytest.mark.slow
@schema_long.parametrize()
def test_ten_times_more_generated_requests_get_documented_answers(case, live_router, http):
    case.call_and_validate(base_url=live_router.url, session=http, checks=CHECKS)


def test_at_least_a_thousand_cases_ran_over_every_operation(live_router):
    assert len(calls) >= MIN_CI_CASES, f"only {len(calls)} generated cases ran"
    operations = {f"{method.upper()} {path}" for path, ops in DESCRIPTION["paths"].items() for method in ops}
    assert set(calls) == operations
    # and the router still answers a plain request after all of them
    response = requests.post(live_router.url + "/v1/completions", json={"prompt": "hi"}, timeout=10)
    assert response.status_code == 200, response.text
