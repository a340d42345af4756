"""Structured outputs through the real `openai` client: `pdserve serve` on loopback (one
prefill worker, one decode worker, the router; the embedded model on CPU), every prompt
sent to the prefill worker (--local-prefill-threshold 0), so a constrained request's first
token is sampled under its grammar on the prefill worker and the rest on the decode
worker; plus a second `pdserve router` over the same workers that prefills every prompt
on the decode worker (the aggregated path).

Checked: `chat.completions.parse` with Pydantic models of every shape the grammar engine
takes (nested objects, bounded lists, enums and literals, unions, optional fields, string
formats, patterns, numeric bounds), each output also valid under the model's own JSON
schema; regex and choice constraints on 100 sampled outputs each; vLLM's older guided_*
fields, json_object and /v1/completions; the same greedy text on both prefill paths;
a streamed constrained answer equal to the unstreamed one; a 400 naming the problem for
each constraint the engine cannot compile; and `pdserve bench serve --dataset-name json`
counting the valid answers."""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import openai
import pytest
from pydantic import AnyUrl, BaseModel, Field

from pdserve.cli.main import main
from tests.harness.stack import ServeStack, local_prefill_router, metric
from tests.structured_output.structured_checks import format_checker

API_KEY = "e2e-structured"
MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 1024
ENGINE_FLAGS = [
    "--dtype", "float32", "--quantization", "none", "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN),
    "--num-gpu-blocks-override", "384", "--block-size", "16",
]  # fmt: skip
# Every string and list in the models below is bounded, so a grammar completes well
# within this; a request that reaches it fails parse() with LengthFinishReasonError.
MAX_JSON_TOKENS = 200
PARALLEL = 8  # requests in flight at once: the server batches them
BOUND_S = 300.0  # a batch of requests is answered within this, or the test fails
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome"]


# ---- the Pydantic models parse() is asked for --------------------------------------


class City(BaseModel):
    name: str = Field(max_length=16)
    country: str = Field(max_length=16)
    population: int = Field(ge=0, le=40_000_000)


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Shirt(BaseModel):
    color: Color
    size: Literal["S", "M", "L", "XL"]
    price: float = Field(ge=1, le=99)


class Event(BaseModel):
    title: str = Field(max_length=20)
    day: dt.date
    # RFC 3339 seconds may carry any number of fractional digits: bound the text
    starts_at: dt.time = Field(json_schema_extra={"maxLength": 14})


class Meeting(BaseModel):
    topic: str = Field(max_length=20)
    when: dt.datetime = Field(json_schema_extra={"maxLength": 25})


class Server(BaseModel):
    host: ipaddress.IPv4Address
    port: int = Field(ge=1, le=65535)


class Ticket(BaseModel):
    id: uuid.UUID
    open: bool


class Contact(BaseModel):
    name: str = Field(max_length=16)
    email: str = Field(max_length=32, json_schema_extra={"format": "email"})


class Bookmark(BaseModel):
    title: str = Field(max_length=16)
    url: AnyUrl = Field(max_length=40)


class PostalAddress(BaseModel):
    city: str = Field(max_length=16)
    zip_code: str = Field(pattern=r"^\d{5}$")


class ShoppingList(BaseModel):
    items: list[Annotated[str, Field(max_length=12)]] = Field(min_length=1, max_length=3)


class Address(BaseModel):
    street: str = Field(max_length=20)
    city: str = Field(max_length=16)


class Resident(BaseModel):
    name: str = Field(max_length=16)
    address: Address


class Item(BaseModel):
    name: str = Field(max_length=12)
    quantity: int = Field(ge=1, le=9)


class Order(BaseModel):
    order_id: int = Field(ge=1, le=9999)
    items: list[Item] = Field(min_length=1, max_length=2)


class Measurement(BaseModel):
    quantity: str = Field(max_length=12)
    value: int | Annotated[str, Field(max_length=8)]


class Book(BaseModel):
    title: str = Field(max_length=24)
    subtitle: str | None = Field(default=None, max_length=16)
    year: int = Field(ge=1450, le=2025)


class Weather(BaseModel):
    city: str = Field(max_length=16)
    celsius: float = Field(ge=-50, le=60)
    sunny: bool


class Task(BaseModel):
    title: str = Field(max_length=20)
    priority: Literal[1, 2, 3]
    tags: list[Literal["home", "work", "urgent"]] = Field(max_length=2)


class Point(BaseModel):
    label: str = Field(max_length=8)
    xy: tuple[int, int]


class Grid(BaseModel):
    rows: list[Annotated[list[Annotated[int, Field(ge=-99, le=99)]], Field(min_length=1, max_length=3)]] = (
        Field(min_length=1, max_length=2)
    )


class Cat(BaseModel):
    kind: Literal["cat"]
    name: str = Field(max_length=10)
    indoor: bool


class Dog(BaseModel):
    kind: Literal["dog"]
    name: str = Field(max_length=10)
    breed: str = Field(max_length=12)


class PetOwner(BaseModel):
    name: str = Field(max_length=12)
    pet: Cat | Dog


class Level(enum.IntEnum):
    low = 1
    mid = 2
    high = 3


class Alarm(BaseModel):
    label: str = Field(max_length=12)
    level: Level
    version: Literal["v1"]


class Member(BaseModel):
    name: str = Field(max_length=12)
    email: str = Field(max_length=24, json_schema_extra={"format": "email"})


class Team(BaseModel):
    name: str = Field(min_length=2, max_length=12)
    members: list[Member] = Field(min_length=1, max_length=2)
    lead: Member | None = None


class Inventory(BaseModel):
    counts: dict[str, Annotated[int, Field(ge=0, le=999)]] = Field(max_length=2)


PARSE_CASES: list[tuple[type[BaseModel], str]] = [
    (City, "Describe a big city as JSON."),
    (Shirt, "Describe a shirt for sale as JSON."),
    (Event, "Describe a concert: its title, the day and the time it starts."),
    (Meeting, "Schedule a meeting: give its topic and when it happens."),
    (Server, "Give the address and port of a web server."),
    (Ticket, "Open a support ticket with an id."),
    (Contact, "Give me the contact details of a colleague."),
    (Bookmark, "Bookmark a web page: its title and URL."),
    (PostalAddress, "Give me a city and its zip code."),
    (ShoppingList, "Write a short shopping list."),
    (Resident, "Who lives where? Give a name and a street address."),
    (Order, "Write a small fruit order as JSON."),
    (Measurement, "Give a measurement: what is measured and its value."),
    (Book, "Describe a famous book as JSON."),
    (Weather, "What is the weather like in Madrid?"),
    (Task, "Add a task to my to-do list."),
    (Point, "Give a labelled point on a plane."),
    (Grid, "Write a small grid of numbers."),
    (PetOwner, "Describe a pet owner and their pet."),
    (Alarm, "Set an alarm with a label and a level."),
    (Team, "Describe a small team and its members."),
    (Inventory, "Count the fruit in a basket."),
]


# ---- the stack ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack():
    serve = ServeStack(
        [
            *ENGINE_FLAGS,
            "--num-prefill-workers", "1",
            "--num-decode-workers", "1",
            "--api-key", API_KEY,
            "--local-prefill-threshold", "0",
            "--disable-uvicorn-access-log",
            # a CPU engine step can keep a worker silent for seconds on a busy machine
            "--worker-health-timeout", "30",
        ]
    )  # fmt: skip
    try:
        yield serve.ready()
    finally:
        serve.stop_checked()


@pytest.fixture(scope="module")
def local_router(stack):
    """A second router over the same workers that prefills every prompt on decode."""
    router = local_prefill_router(stack, MAX_MODEL_LEN)
    try:
        yield router.ready()
    finally:
        router.stop()


def _client(url: str, api_key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, timeout=BOUND_S, max_retries=0)


@pytest.fixture(scope="module")
def client(stack):
    return _client(stack.url)


@pytest.fixture(scope="module")
def local_client(local_router):
    return _client(local_router.url)


def _all(calls: list, parallel: int = PARALLEL) -> list:
    """Run the zero-argument `calls` `parallel` at a time; their results in order, or the
    first exception."""
    with ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(call) for call in calls]
        deadline = time.monotonic() + BOUND_S
        return [future.result(timeout=max(deadline - time.monotonic(), 1.0)) for future in futures]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _schema_checker():
    """The formats of the shared checker, with RFC 3339 `time` (jsonschema checks only
    draft 3's offset-less time) and `uri` (which it checks only with an optional package)."""
    checker = format_checker()

    @checker.checks("time", raises=ValueError)
    def _time(value: object) -> bool:
        if isinstance(value, str) and not re.fullmatch(
            r"([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)", value
        ):
            raise ValueError(f"not an RFC 3339 full-time: {value!r}")
        return True

    @checker.checks("uri", raises=ValueError)
    def _uri(value: object) -> bool:
        if isinstance(value, str) and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s]+", value):
            raise ValueError(f"not an RFC 3986 URI: {value!r}")
        return True

    return checker


def assert_follows(text: str, schema: dict[str, Any]) -> None:
    import jsonschema

    jsonschema.validate(json.loads(text), schema, format_checker=_schema_checker())


# ---- 1. parse() with Pydantic models -------------------------------------------------


def test_parse_returns_an_instance_of_every_pydantic_model(client):
    def parse(model: type[BaseModel], prompt: str):
        return client.chat.completions.parse(
            model=MODEL,
            messages=_user(prompt),
            response_format=model,
            temperature=0,
            max_tokens=MAX_JSON_TOKENS,
        )

    completions = _all([lambda m=m, p=p: parse(m, p) for m, p in PARSE_CASES])
    assert len(completions) >= 20
    for (model, _), completion in zip(PARSE_CASES, completions, strict=True):
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", (model.__name__, choice.message.content)
        assert isinstance(choice.message.parsed, model), (model.__name__, choice.message.content)
        # the raw text also follows the model's own (not strict-mode) schema, formats included
        assert_follows(choice.message.content, model.model_json_schema())


# ---- 2. regex, choice, the older fields, json_object, /v1/completions ----------------


def test_100_sampled_outputs_each_match_the_regex(client):
    def sample(seed: int):
        return client.chat.completions.create(
            model=MODEL,
            messages=_user("Give me a phone number."),
            n=10,
            temperature=1.0,
            seed=seed,
            max_tokens=30,
            extra_body={"structured_outputs": {"regex": PHONE}},
        )

    choices = [c for result in _all([lambda s=s: sample(s) for s in range(10)]) for c in result.choices]
    assert len(choices) == 100
    for choice in choices:
        assert re.fullmatch(PHONE, choice.message.content), choice.message.content
        assert choice.finish_reason == "stop"
    assert len({c.message.content for c in choices}) > 10  # sampled, not one answer repeated


def test_100_sampled_outputs_are_each_one_of_the_choices(client):
    def sample(seed: int):
        return client.chat.completions.create(
            model=MODEL,
            messages=_user("Name a European capital."),
            n=10,
            temperature=1.0,
            seed=seed,
            max_tokens=8,
            extra_body={"structured_outputs": {"choice": CITIES}},
        )

    choices = [c for result in _all([lambda s=s: sample(s) for s in range(10)]) for c in result.choices]
    assert len(choices) == 100
    for choice in choices:
        assert choice.message.content in CITIES
        assert choice.finish_reason == "stop"
    assert len({c.message.content for c in choices}) > 1


def test_the_older_guided_fields_still_constrain_the_output(client):
    def chat(prompt: str, **extra: Any):
        return client.chat.completions.create(
            model=MODEL, messages=_user(prompt), temperature=0, max_tokens=30, extra_body=extra
        )

    phone, city = _all(
        [
            lambda: chat("Give me a phone number.", guided_regex=PHONE),
            lambda: chat("Which city is the capital of Italy?", guided_choice=CITIES),
        ]
    )
    assert re.fullmatch(PHONE, phone.choices[0].message.content)
    assert city.choices[0].message.content in CITIES
    assert {phone.choices[0].finish_reason, city.choices[0].finish_reason} == {"stop"}


def test_json_object_gives_parseable_json_objects(client):
    prompts = [
        "Describe a person with a name and an age as a JSON object.",
        "Give me a JSON object with a key and a value.",
    ]
    results = _all(
        [
            lambda p=p: client.chat.completions.create(
                model=MODEL,
                messages=_user(p),
                response_format={"type": "json_object"},
                temperature=0,
                max_tokens=MAX_JSON_TOKENS,
            )
            for p in prompts
        ]
    )
    for result in results:
        choice = result.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content), dict)


def test_completions_follow_structured_outputs_json(client):
    schema = City.model_json_schema()
    result = client.completions.create(
        model=MODEL,
        prompt="A city described as JSON, with its name, country and population:",
        temperature=0,
        max_tokens=MAX_JSON_TOKENS,
        extra_body={"structured_outputs": {"json": schema}},
    )
    choice = result.choices[0]
    assert choice.finish_reason == "stop", choice.text
    assert_follows(choice.text, schema)


# ---- 3. the same greedy output on both prefill paths ---------------------------------

LARK = r"""
start: "The answer is " ANSWER "."
ANSWER: "yes" | "no" | "maybe"
"""
BOTH_PATHS: list[tuple[str, dict[str, Any]]] = [
    ("Describe a pet owner and their pet.", {"structured_outputs": {"json": PetOwner.model_json_schema()}}),
    ("Give me a phone number.", {"structured_outputs": {"regex": PHONE}}),
    ("Which city is the capital of France?", {"structured_outputs": {"choice": CITIES}}),
    ("Is the sky blue?", {"structured_outputs": {"grammar": LARK}}),
]


def test_both_prefill_paths_give_the_same_greedy_constrained_text(stack, local_router, client, local_client):
    def answers(api: openai.OpenAI) -> list[tuple[str, str]]:
        results = _all(
            [
                lambda p=p, e=e: api.chat.completions.create(
                    model=MODEL, messages=_user(p), temperature=0, max_tokens=MAX_JSON_TOKENS, extra_body=e
                )
                for p, e in BOTH_PATHS
            ]
        )
        return [(r.choices[0].message.content, r.choices[0].finish_reason) for r in results]

    remote_before = metric(stack.url, "pdserve_router_prefill_decisions_total", decision="remote")
    local_before = metric(local_router.url, "pdserve_router_prefill_decisions_total", decision="local")
    disaggregated = answers(client)
    aggregated = answers(local_client)
    assert disaggregated == aggregated
    assert [finish for _, finish in disaggregated] == ["stop"] * len(BOTH_PATHS)
    json_text, phone, city, sentence = (text for text, _ in disaggregated)
    assert_follows(json_text, PetOwner.model_json_schema())
    assert re.fullmatch(PHONE, phone) and city in CITIES
    assert re.fullmatch(r"The answer is (yes|no|maybe)\.", sentence)
    # each went the way its router sends it
    remote = metric(stack.url, "pdserve_router_prefill_decisions_total", decision="remote")
    assert remote - remote_before == len(BOTH_PATHS)
    local = metric(local_router.url, "pdserve_router_prefill_decisions_total", decision="local")
    assert local - local_before == len(BOTH_PATHS)


# ---- 4. streaming ---------------------------------------------------------------------


def test_a_streamed_constrained_answer_equals_the_unstreamed_one(client):
    messages = _user("Write a small fruit order as JSON.")
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "Order", "schema": Order.model_json_schema(), "strict": True},
    }

    def create(stream: bool):
        result = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            max_tokens=MAX_JSON_TOKENS,
            response_format=response_format,
            stream=stream,
        )
        return list(result) if stream else result

    def sdk_stream():
        with client.chat.completions.stream(
            model=MODEL, messages=messages, response_format=Order, temperature=0, max_tokens=MAX_JSON_TOKENS
        ) as stream:
            return stream.get_final_completion()

    def sdk_parse():
        return client.chat.completions.parse(
            model=MODEL, messages=messages, response_format=Order, temperature=0, max_tokens=MAX_JSON_TOKENS
        )

    whole, chunks, streamed_parse, parsed = _all(
        [lambda: create(False), lambda: create(True), sdk_stream, sdk_parse]
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2  # it came in pieces
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert streamed == whole.choices[0].message.content
    assert_follows(streamed, Order.model_json_schema())
    # the SDK's streaming parser reads the object parse() reads
    assert isinstance(streamed_parse.choices[0].message.parsed, Order)
    assert streamed_parse.choices[0].message.parsed == parsed.choices[0].message.parsed


# ---- 5. constraints the engine cannot compile ----------------------------------------

BAD = [
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "properties": 5}}}},
        "response_format", "invalid JSON schema",
    ),
    (
        {"extra_body": {"structured_outputs": {"json": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}},
        "structured_outputs.json", 'JSON schema uses keywords the grammar engine does not support: ["uniqueItems"]',
    ),
    ({"extra_body": {"structured_outputs": {"regex": "a("}}}, "structured_outputs.regex", "invalid regex"),
    ({"extra_body": {"guided_grammar": 'start: "a" (b'}}, "guided_grammar", "grammar syntax error"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param", "says"), BAD, ids=["schema", "uniqueItems", "regex", "grammar"])
def test_a_constraint_that_does_not_compile_is_a_400_naming_the_problem(client, fields, param, says):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=_user("hi"), max_tokens=4, **fields)
    error = refused.value
    assert error.status_code == 400
    assert error.param == param, error.body
    assert says in error.message, error.message


# ---- the structured-output benchmark against the stack -------------------------------


@pytest.mark.parametrize("backend", ["openai-chat", "openai"])
def test_bench_serve_json_dataset_counts_every_valid_answer(stack, tmp_path, backend):
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps(City.model_json_schema()))
    argv = [
        "bench", "serve", "--base-url", stack.url, "--api-key", API_KEY, "--backend", backend,
        "--dataset-name", "json", "--json-schema-path", str(schema), "--num-prompts", "3",
        "--json-output-len", str(MAX_JSON_TOKENS), "--ready-check-timeout-sec", "30", "--disable-tqdm",
        "--save-result", "--save-detailed", "--result-dir", str(tmp_path), "--result-filename", "run.json",
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "run.json").read_text())
    assert result["completed"] == 3 and result["failed"] == 0
    assert result["num_structured_outputs"] == 3
    assert result["num_valid_structured_outputs"] == 3, result["generated_texts"]
    assert result["correct_rate(%)"] == 100.0
