"""--api-key (one key or several, also from $PDSERVE_API_KEY / $VLLM_API_KEY, compared in
constant time), and who may reach /metrics and /health (--metrics-access,
--health-access), against the router app on a real uvicorn server."""

from __future__ import annotations

import hmac

import httpx
import pytest

from common.config.arg_parser import PdserveArgumentParser
from router import dependencies
from router.cli import add_router_args, config_from_args
from router.config import RouterConfig
from tests.router.app_harness import assert_openai_error, embedded_tokenizer, running_router, served_model
from tests.router.fake_worker import FakeWorker

KEYS = ["sk-first-0123456789", "sk-second-9876543210"]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def guarded(tokenizer):
    """Both keys accepted; /metrics and /health need one."""
    with running_router(
        served_model(tokenizer), [FakeWorker()], api_key=KEYS, metrics_access="api-key", health_access="api-key",
        wait_healthy=False,
    ) as live:  # fmt: skip
        yield live


def test_every_configured_key_is_accepted_and_no_other(guarded):
    for key in KEYS:
        assert httpx.get(guarded.url + "/v1/models", headers=_bearer(key), timeout=10).status_code == 200
    for header in [_bearer(KEYS[0][:-1]), _bearer(KEYS[0] + "x"), {"Authorization": "Bearer"}, {}]:
        assert_openai_error(httpx.get(guarded.url + "/v1/models", headers=header, timeout=10), 401)


@pytest.mark.parametrize("path", ["/metrics", "/health", "/ping"])
def test_metrics_and_health_can_require_the_key(guarded, path):
    assert_openai_error(httpx.get(guarded.url + path, timeout=10), 401)
    assert httpx.get(guarded.url + path, headers=_bearer(KEYS[1]), timeout=10).status_code in (200, 503)


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_tokenize_needs_the_key_when_one_is_set(guarded, path):
    body = {"prompt": "hello"} if path == "/tokenize" else {"tokens": [1, 2]}
    assert_openai_error(httpx.post(guarded.url + path, json=body, timeout=10), 401)
    assert httpx.post(guarded.url + path, json=body, headers=_bearer(KEYS[0]), timeout=10).status_code == 200


def test_version_stays_open(guarded):
    assert httpx.get(guarded.url + "/version", timeout=10).status_code == 200


def test_metrics_can_be_disabled_while_health_stays_public(tokenizer):
    with running_router(served_model(tokenizer), [FakeWorker()], metrics_access="disabled") as live:
        assert_openai_error(httpx.get(live.url + "/metrics", timeout=10), 404)
        assert httpx.get(live.url + "/health", timeout=10).status_code == 200
        assert httpx.get(live.url + "/v1/models", timeout=10).status_code == 200  # no key set


def test_by_default_metrics_and_health_are_public_as_in_vllm(tokenizer):
    with running_router(served_model(tokenizer), [FakeWorker()], api_key="sk-only") as live:
        assert httpx.get(live.url + "/metrics", timeout=10).status_code == 200
        assert httpx.get(live.url + "/health", timeout=10).status_code == 200
        assert_openai_error(httpx.get(live.url + "/v1/models", timeout=10), 401)


def test_every_key_is_compared_whatever_the_answer(monkeypatch):
    """No early exit: the time taken does not tell which key (or how much of one) matched."""
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(dependencies.hmac, "compare_digest", counting)
    keys = ["k-one", "k-two", "k-three"]
    assert dependencies.api_key_matches("k-one", keys)
    assert not dependencies.api_key_matches("k-on", keys)
    assert len(compared) == 6
    assert all(len(a) == len(b) == 32 for a, b in compared)  # digests: the key length does not show


def _router_args(argv: list[str]):
    parser = PdserveArgumentParser(prog="pdserve router")
    add_router_args(parser)
    return parser.parse_args(["--decode-workers", "tcp://127.0.0.1:1", *argv])


def test_keys_come_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert config_from_args(_router_args([]))[0].api_keys == []
    assert config_from_args(_router_args(["--api-key", "a1", "b2"]))[0].api_keys == ["a1", "b2"]
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert config_from_args(_router_args([]))[0].api_keys == ["from-vllm"]
    monkeypatch.setenv("PDSERVE_API_KEY", "p1, p2")
    assert config_from_args(_router_args([]))[0].api_keys == ["p1", "p2"]
    assert config_from_args(_router_args(["--api-key", "flag"]))[0].api_keys == ["flag"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"metrics_access": "api-key"}, "needs --api-key"),
        ({"health_access": "disabled"}, "public or api-key"),
        ({"metrics_access": "open"}, "must be one of"),
        ({"api_key": ["good", "has space"]}, "no spaces"),
        ({"max_log_len": -1}, "--max-log-len"),
    ],
)
def test_inconsistent_access_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(decode_workers=["tcp://127.0.0.1:1"], **fields).validate()
