"""Structured outputs through the router's HTTP API, in front of a fake worker: each way of
asking for a constraint reaches the worker as the spec on the wire, with the server's
--structured-outputs-config defaults; each bad constraint is answered 400 with the OpenAI
error body naming the problem, and nothing reaches a worker. /openapi.json documents the
fields."""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest

from common.config.structured_outputs_config import StructuredOutputsConfig
from common.protocol import GenerateRequest
from common.structured_output.spec import StructuredOutputSpec
from tests.router.app_harness import assert_openai_error, embedded_tokenizer, running_router, served_model
from tests.router.fake_worker import EOS, FakeWorker

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}}
SCHEMA_TEXT = '{"type":"object","properties":{"answer":{"type":"string"}}}'


@pytest.fixture(scope="module")
def worker():
    return FakeWorker(script=lambda prompt: [42, EOS])


@pytest.fixture(scope="module")
def router(worker):
    # the server closes JSON objects and leaves no free whitespace unless a request says otherwise
    defaults = StructuredOutputsConfig(disable_any_whitespace=True, disable_additional_properties=True)
    served = replace(served_model(embedded_tokenizer()), structured_outputs=defaults)
    with running_router(served, [worker]) as live:
        yield live


@pytest.fixture(scope="module")
def client(router):
    with httpx.Client(base_url=router.url, timeout=10) as http:
        yield http


def sent_to_worker(worker: FakeWorker) -> list[GenerateRequest]:
    return worker.messages(GenerateRequest)


GOOD = [
    ("/v1/completions", {"response_format": {"type": "json_object"}}, StructuredOutputSpec("json_object", "", True, True)),
    (
        CHAT,
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}},
        StructuredOutputSpec("json", SCHEMA_TEXT, True, True),
    ),
    (CHAT, {"structured_outputs": {"regex": "(yes|no)"}}, StructuredOutputSpec("regex", "(yes|no)", True, True)),
    (
        "/v1/completions",
        {"structured_outputs": {"choice": ["red", "blue"], "disable_any_whitespace": False}},
        StructuredOutputSpec("choice", '["red","blue"]', False, True),
    ),
    (CHAT, {"structured_outputs": {"grammar": 'start: "x"+'}}, StructuredOutputSpec("grammar", 'start: "x"+', True, True)),
    (
        "/v1/completions",
        {"guided_json": SCHEMA, "structured_outputs": {"disable_additional_properties": False}},
        StructuredOutputSpec("json", SCHEMA_TEXT, True, False),
    ),
    (CHAT, {"guided_choice": ["a", "b"], "guided_decoding_backend": "guidance"}, StructuredOutputSpec("choice", '["a","b"]', True, True)),
    ("/v1/completions", {"response_format": {"type": "text"}}, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "fields", "spec"), GOOD, ids=[f"{i}-{next(iter(f))}" for i, (_, f, _) in enumerate(GOOD)]
)
def test_a_constraint_reaches_the_worker_as_its_spec(client, worker, path, fields, spec):
    body = {**({"messages": HI} if path == CHAT else {"prompt": "hi"}), **fields, "max_tokens": 4, "n": 2}
    before = len(sent_to_worker(worker))
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    sent = sent_to_worker(worker)[before:]
    assert len(sent) == 2  # both choices carry it
    assert {request.sampling().structured_outputs for request in sent} == {spec}


BAD = [
    ("invalid JSON schema", {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "properties": 5}}}},
     "response_format", "invalid JSON schema"),
    ("an unsupported keyword", {"structured_outputs": {"json": {"type": "array", "uniqueItems": True}}},
     "structured_outputs.json", "JSON schema uses keywords the grammar engine does not support: [\"uniqueItems\"]"),
    ("a bad regex", {"structured_outputs": {"regex": "a("}}, "structured_outputs.regex", "invalid regex"),
    ("a bad guided regex", {"guided_regex": "a("}, "guided_regex", "invalid regex"),
    ("a grammar syntax error", {"guided_grammar": "start: ("}, "guided_grammar", "grammar syntax error"),
    ("an empty choice list", {"structured_outputs": {"choice": []}}, "structured_outputs.choice", "is an empty list"),
    ("two constraints", {"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "response_format",
     "response_format and guided_regex both constrain the output"),
    ("an unknown response_format type", {"response_format": {"type": "yaml"}}, "response_format", "type must be one of"),
    ("a whitespace pattern", {"guided_json": SCHEMA, "guided_whitespace_pattern": " "}, "guided_whitespace_pattern",
     "is not supported"),
    ("another backend", {"structured_outputs": {"json_object": True, "backend": "xgrammar"}}, "structured_outputs.backend",
     "request-level structured output backend selection is not supported"),
]  # fmt: skip


@pytest.mark.parametrize("path", ["/v1/completions", CHAT])
@pytest.mark.parametrize(("name", "fields", "param", "says"), BAD, ids=[case[0] for case in BAD])
def test_a_bad_constraint_is_a_400_and_reaches_no_worker(client, worker, path, name, fields, param, says):
    body = {**({"messages": HI} if path == CHAT else {"prompt": "hi"}), **fields}
    before = len(sent_to_worker(worker))
    error = assert_openai_error(client.post(path, json=body), 400)
    assert error["type"] == "BadRequestError" and error["param"] == param, error
    assert says in error["message"], error
    # a request sent after it is the first the worker gets (one connection keeps the order)
    assert client.post("/v1/completions", json={"prompt": "after", "max_tokens": 1}).status_code == 200
    assert [request.sampling().structured_outputs for request in sent_to_worker(worker)[before:]] == [None]


def test_the_openapi_page_documents_the_constraint_fields(client):
    description = client.get("/openapi.json").json()
    components = description["components"]["schemas"]
    for request in ("CompletionRequest", "ChatCompletionRequest"):
        fields = components[request]["properties"]
        formats = fields["response_format"]["anyOf"][0]["oneOf"]
        assert {ref["$ref"].rsplit("/", 1)[1] for ref in formats} == {
            "TextResponseFormat", "JsonObjectResponseFormat", "JsonSchemaResponseFormat", "StructuralTagResponseFormat",
        }  # fmt: skip
        assert fields["structured_outputs"]["anyOf"][0]["$ref"].endswith("/StructuredOutputsParams")
        assert all(fields[f"guided_{name}"]["deprecated"] for name in ("json", "regex", "choice", "grammar"))
    assert components["JsonSchema"]["required"] == ["name", "schema"]
    params = components["StructuredOutputsParams"]["properties"]
    assert {"json", "regex", "choice", "grammar", "json_object", "structural_tag", "disable_any_whitespace",
            "disable_additional_properties", "disable_fallback", "whitespace_pattern", "backend"} <= set(params)  # fmt: skip
