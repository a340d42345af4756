"""LoRA adapters at the router, as vLLM serves them: the seven flags (and how `pdserve
serve` hands them on), /v1/models listing each adapter with its parent, a request naming
an adapter in `model` (hashed under it and sent with it to both workers), vLLM's 404 for
an unknown one, and the runtime endpoints /v1/load_lora_adapter and
/v1/unload_lora_adapter (404 unless allowed; fanned out to every worker; a refusal rolls
back the workers that took it). Scripted workers stand in for real ones; the real engine
is in tests/e2e/test_lora_e2e.py."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from types import SimpleNamespace

import httpx
import pytest
import zmq

from common.config.arg_parser import PdserveArgumentParser
from common.config.lora_config import LoRAConfig, LoRAModulePath
from common.lora.lora_request import LoRARequest
from common.protocol import (
    GenerateRequest,
    LoadLoRA,
    LoadReport,
    LoRAResult,
    ProtocolError,
    UnloadLoRA,
    decode_message,
    encode_message,
)
from router.app import create_app
from router.cli import add_router_args, config_from_args
from router.config import RouterConfig
from router.orchestrator import Orchestrator
from router.prefix_index import PrefixIndex, request_block_hashes
from tests.router.app_harness import (
    SERVED_NAMES,
    assert_openai_error,
    embedded_tokenizer,
    running_router,
    served_model,
)
from tests.router.fake_worker import EOS, FakeWorker

MODULES = [
    LoRAModulePath("sql", "/adapters/sql"),
    LoRAModulePath("chat", "/adapters/chat", base_model_name=SERVED_NAMES[1]),
    LoRAModulePath("other", "/adapters/other", base_model_name="not-served-here"),
]
LORA = LoRAConfig(enable_lora=True, max_loras=2, max_cpu_loras=4, lora_modules=list(MODULES))


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


# -- flags ---------------------------------------------------------------------------------


def _router_config(argv: list[str]) -> RouterConfig:
    parser = PdserveArgumentParser(prog="pdserve router")
    add_router_args(parser)
    return config_from_args(parser.parse_args(["--decode-workers", "tcp://127.0.0.1:9", *argv]))[0]


def test_the_router_takes_all_seven_lora_flags():
    config = _router_config(
        ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "32", "--max-cpu-loras", "4",
         "--lora-dtype", "bfloat16", "--fully-sharded-loras", "--lora-modules", "sql=/adapters/sql"]
    )  # fmt: skip
    assert config.lora == LoRAConfig(
        enable_lora=True, max_loras=2, max_lora_rank=32, max_cpu_loras=4, lora_dtype="bfloat16",
        fully_sharded_loras=True, lora_modules=[LoRAModulePath("sql", "/adapters/sql")],
    )  # fmt: skip
    assert not config.allow_runtime_lora_updating
    assert _router_config([]).lora == LoRAConfig()  # vLLM's defaults: off, 1 adapter, rank 16


def test_lora_modules_take_name_path_a_json_object_and_a_json_list_in_order():
    config = _router_config(
        ["--enable-lora", "--lora-modules", "a=/p/a",
         '{"name": "b", "path": "/p/b", "base_model_name": "smollm2"}',
         "--lora-modules", '[{"name": "c", "path": "/p/c"}, {"name": "d", "path": "/p/d"}]']
    )  # fmt: skip
    assert config.lora.lora_modules == [
        LoRAModulePath("a", "/p/a"),
        LoRAModulePath("b", "/p/b", "smollm2"),
        LoRAModulePath("c", "/p/c"),
        LoRAModulePath("d", "/p/d"),
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--enable-lora", "--lora-modules", "no-equals-sign"],
        ["--enable-lora", "--lora-modules", "=/path"],
        ["--enable-lora", "--lora-modules", '{"name": "a"}'],
        ["--enable-lora", "--lora-modules", '{"name": "a", "path": "/p", "rank": 8}'],
        ["--enable-lora", "--lora-modules", "{not json"],
        ["--max-lora-rank", "7"],
        ["--max-loras", "0"],
        ["--lora-dtype", "float64"],
    ],
)
def test_bad_lora_flags_stop_the_parse(argv):
    with pytest.raises(SystemExit):
        _router_config(argv)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--lora-modules", "a=/p"], "--lora-modules needs --enable-lora"),
        (["--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"], "--max-cpu-loras"),
        (["--enable-lora", "--lora-modules", "a=/p", "a=/q"], "more than once"),
    ],
)
def test_lora_flags_that_do_not_fit_together_are_refused(argv, words):
    with pytest.raises(ValueError, match=words):
        _router_config(argv)


@pytest.mark.parametrize("value, allowed", [("1", True), ("True", True), (" true ", True), ("0", False),
                                            ("yes", False), ("", False)])  # fmt: skip
def test_runtime_updating_follows_vllms_environment_variable(monkeypatch, value, allowed):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", value)
    assert _router_config([]).allow_runtime_lora_updating is allowed
    assert _router_config(["--allow-runtime-lora-updating"]).allow_runtime_lora_updating


def test_serve_hands_the_lora_flags_to_the_workers_and_the_router():
    from pdserve.cli.serve import register, router_argv, worker_argv

    parser = PdserveArgumentParser(prog="pdserve")
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["serve", "--enable-lora", "--max-loras", "2", "--max-cpu-loras", "4", "--max-lora-rank", "32",
         "--lora-dtype", "float16", "--fully-sharded-loras", "--allow-runtime-lora-updating",
         "--lora-modules", "a=/p/a", '{"name": "b", "path": "/p/b", "base_model_name": "m"}']
    )  # fmt: skip
    lora_words = [
        "--enable-lora", "--lora-modules", '{"name": "a", "path": "/p/a"}',
        '{"name": "b", "path": "/p/b", "base_model_name": "m"}', "--max-loras", "2", "--max-lora-rank", "32",
        "--max-cpu-loras", "4", "--lora-dtype", "float16", "--fully-sharded-loras",
    ]  # fmt: skip
    workers = worker_argv(args)
    assert _sublist(lora_words, workers) and "--allow-runtime-lora-updating" not in workers
    router = router_argv(args, [], ["tcp://127.0.0.1:9"], 8000)
    assert _sublist(lora_words, router) and "--allow-runtime-lora-updating" in router
    parsed = PdserveArgumentParser(prog="pdserve router")
    add_router_args(parsed)
    config = config_from_args(parsed.parse_args(router))[0]  # the router parses what serve wrote
    assert config.lora.lora_modules == [LoRAModulePath("a", "/p/a"), LoRAModulePath("b", "/p/b", "m")]
    assert config.allow_runtime_lora_updating


def _sublist(part: list[str], whole: list[str]) -> bool:
    return any(whole[i : i + len(part)] == part for i in range(len(whole) - len(part) + 1))


# -- the wire ------------------------------------------------------------------------------


WIRE_LORA = {"name": "sql", "path": "/adapters/sql", "id": 1}


@pytest.mark.parametrize(
    "message",
    [
        GenerateRequest("r", [1, 2], {}, lora=dict(WIRE_LORA)),
        LoadLoRA("lora-1", dict(WIRE_LORA)),
        UnloadLoRA("lora-2", "sql"),
        LoRAResult("lora-1", True),
        LoRAResult("lora-1", False, 400, "rank 64 is above --max-lora-rank 16"),
        LoadReport("w", "decode", "e", 1, 0, 0, 0.5, loras=["sql", "chat"]),
    ],
)
def test_lora_messages_round_trip(message):
    assert decode_message(encode_message(message)) == message


@pytest.mark.parametrize(
    "body",
    [
        {"type": "generate", "request_id": "r", "prompt_token_ids": [1], "sampling_params": {},
         "lora": {"name": "sql", "path": "/p"}},
        {"type": "generate", "request_id": "r", "prompt_token_ids": [1], "sampling_params": {},
         "lora": {**WIRE_LORA, "id": 0}},
        {"type": "generate", "request_id": "r", "prompt_token_ids": [1], "sampling_params": {}, "lora": "sql"},
        {"type": "load_lora", "request_id": "r", "lora": {**WIRE_LORA, "name": ""}},
        {"type": "load_lora", "request_id": "r", "lora": {**WIRE_LORA, "extra": 1}},
        {"type": "load_lora", "request_id": "r"},
        {"type": "unload_lora", "request_id": "r", "lora_name": ""},
        {"type": "unload_lora", "request_id": "r", "lora_name": 3},
        {"type": "lora_result", "request_id": "r", "ok": 1},
        {"type": "lora_result", "request_id": "r", "ok": False, "code": "400"},
        {"type": "load", "worker_id": "w", "role": "decode", "num_running": 0, "num_waiting": 0,
         "num_queued_prefill_tokens": 0, "kv_cache_usage": 0.0, "loras": "sql"},
        {"type": "load", "worker_id": "w", "role": "decode", "num_running": 0, "num_waiting": 0,
         "num_queued_prefill_tokens": 0, "kv_cache_usage": 0.0, "loras": [1]},
        {"type": "load", "worker_id": "w", "role": "decode", "num_running": 0, "num_waiting": 0,
         "num_queued_prefill_tokens": 0, "kv_cache_usage": 0.0, "loras": ["a"] * 1025},
    ],
)  # fmt: skip
def test_malformed_lora_messages_are_refused(body):
    import msgpack

    with pytest.raises(ProtocolError):
        decode_message(msgpack.packb(body, use_bin_type=True))


def test_a_prompt_under_an_adapter_is_hashed_under_it_for_routing():
    pool = SimpleNamespace(prefix_index=PrefixIndex(), block_size=8, hash_algo="sha256")
    orchestrator = Orchestrator(pool, RouterConfig(decode_workers=["tcp://127.0.0.1:9"]))
    prompt = list(range(40))
    sql, chat = LoRARequest("sql", "/adapters/sql", 1), LoRARequest("chat", "/adapters/chat", 2)
    under_sql = orchestrator._block_hashes(prompt, None, sql)
    assert under_sql == request_block_hashes(prompt, 8, "sha256", lora=("sql", "/adapters/sql"))
    base, under_chat = (
        orchestrator._block_hashes(prompt, None),
        orchestrator._block_hashes(prompt, None, chat),
    )
    assert len(under_sql) == 5 and not {*under_sql} & {*base} and not {*under_sql} & {*under_chat}


# -- serving adapters ------------------------------------------------------------------------


def test_models_lists_each_adapter_after_the_base_model_with_its_folder_and_parent(tokenizer):
    with running_router(served_model(tokenizer), [FakeWorker()], lora=LORA) as live:
        body = httpx.get(live.url + "/v1/models", timeout=5).json()
        one = httpx.get(live.url + "/v1/models/chat", timeout=5).json()
    cards = body["data"]
    assert [c["id"] for c in cards] == [*SERVED_NAMES, "sql", "chat", "other"]
    adapters = {c["id"]: c for c in cards[len(SERVED_NAMES) :]}
    for module in MODULES:
        card = adapters[module.name]
        assert card["object"] == "model" and card["owned_by"] == "pdserve"
        assert card["root"] == module.path and card["max_model_len"] is None
        assert isinstance(card["created"], int)
        (permission,) = card["permission"]
        assert permission["object"] == "model_permission" and permission["allow_sampling"] is True
    # vLLM's rule: the given base model when it is served here, else the first served name
    assert [adapters[n]["parent"] for n in ("sql", "chat", "other")] == [SERVED_NAMES[0], SERVED_NAMES[1],
                                                                         SERVED_NAMES[0]]  # fmt: skip
    assert one == {**adapters["chat"], "permission": one["permission"]}


def test_a_request_naming_an_adapter_runs_under_it_on_both_workers(tokenizer):
    decode, prefill = (
        FakeWorker(script=lambda p: [42, EOS]),
        FakeWorker(role="prefill", script=lambda p: [42, EOS]),
    )
    with running_router(
        served_model(tokenizer), [decode], [prefill], lora=LORA, local_prefill_threshold=0
    ) as live:
        chat = httpx.post(live.url + "/v1/chat/completions", timeout=10,
                          json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        base = httpx.post(
            live.url + "/v1/completions", json={"model": SERVED_NAMES[0], "prompt": "hi"}, timeout=10
        )
    assert chat.status_code == 200 and base.status_code == 200, (chat.text, base.text)
    assert chat.json()["model"] == "chat"  # answered under the adapter's name, as vLLM does
    to_prefill, to_decode = prefill.messages(GenerateRequest), decode.messages(GenerateRequest)
    assert to_prefill[0].lora == to_decode[0].lora == {"name": "chat", "path": "/adapters/chat", "id": 2}
    assert to_prefill[1].lora is None and to_decode[1].lora is None


def test_an_unknown_adapter_is_404_with_vllms_body(tokenizer):
    with running_router(served_model(tokenizer), [FakeWorker()], lora=LORA) as live:
        unknown = httpx.post(live.url + "/v1/completions", json={"model": "nope", "prompt": "hi"}, timeout=10)
        card = httpx.get(live.url + "/v1/models/nope", timeout=5)
    assert unknown.json() == {
        "error": {"message": "The model `nope` does not exist.", "type": "NotFoundError", "param": "model",
                  "code": 404}
    }  # fmt: skip
    assert unknown.status_code == 404
    assert_openai_error(card, 404)


def test_without_enable_lora_an_adapter_name_is_an_unknown_model(tokenizer):
    with running_router(served_model(tokenizer), [FakeWorker()]) as live:
        models = httpx.get(live.url + "/v1/models", timeout=5).json()
        answer = httpx.post(live.url + "/v1/completions", json={"model": "sql", "prompt": "hi"}, timeout=10)
    assert [m["id"] for m in models["data"]] == SERVED_NAMES
    assert assert_openai_error(answer, 404)["message"] == "The model `sql` does not exist."


def test_an_adapter_may_not_take_a_served_model_name(tokenizer):
    lora = LoRAConfig(enable_lora=True, lora_modules=[LoRAModulePath(SERVED_NAMES[1], "/p")])
    with pytest.raises(ValueError, match="served model name"):
        create_app(RouterConfig(decode_workers=["tcp://127.0.0.1:9"], lora=lora), served_model(tokenizer))


# -- runtime loading -------------------------------------------------------------------------


@dataclass
class LoRAWorker(FakeWorker):
    """A scripted worker that also answers load_lora and unload_lora, as the engine would."""

    refusal: tuple[int, str] | None = None  # answer every load_lora with this error

    def __post_init__(self) -> None:
        super().__post_init__()
        self.held: list[str] = []

    def _take(self, sock: zmq.Socket, identity: bytes, payload: bytes) -> None:
        message = decode_message(payload)
        if isinstance(message, LoadLoRA):
            answer = self._load(message)
        elif isinstance(message, UnloadLoRA):
            held = message.lora_name in self.held
            self.held = [n for n in self.held if n != message.lora_name]
            answer = LoRAResult(message.request_id, held, 200 if held else 404, "" if held else "not held")
        else:
            super()._take(sock, identity, payload)
            return
        with self._lock:
            self.received.append(message)
        self._send(sock, identity, answer)

    def _load(self, message: LoadLoRA) -> LoRAResult:
        if self.refusal is not None:
            return LoRAResult(message.request_id, False, *self.refusal)
        self.held.append(message.lora["name"])
        return LoRAResult(message.request_id, True)


def _load(live, **body) -> httpx.Response:
    return httpx.post(live.url + "/v1/load_lora_adapter", json=body, timeout=10)


def _unload(live, **body) -> httpx.Response:
    return httpx.post(live.url + "/v1/unload_lora_adapter", json=body, timeout=10)


def _model_ids(live) -> list[str]:
    return [m["id"] for m in httpx.get(live.url + "/v1/models", timeout=5).json()["data"]]


def test_the_runtime_endpoints_do_not_exist_unless_allowed(tokenizer):
    with running_router(served_model(tokenizer), [LoRAWorker()], lora=LORA) as live:
        for answer in (_load(live, lora_name="x", lora_path="/p"), _unload(live, lora_name="sql")):
            assert_openai_error(answer, 404)
        assert _model_ids(live)[-3:] == ["sql", "chat", "other"]


def test_a_runtime_load_reaches_every_worker_and_serves_the_adapter_under_the_next_id(tokenizer):
    decode, prefill = (
        LoRAWorker(script=lambda p: [42, EOS]),
        LoRAWorker(role="prefill", script=lambda p: [42, EOS]),
    )
    with running_router(served_model(tokenizer), [decode], [prefill], lora=LORA,
                        allow_runtime_lora_updating=True, local_prefill_threshold=0) as live:  # fmt: skip
        loaded = _load(live, lora_name="math", lora_path="/adapters/math")
        ids_after_load = _model_ids(live)
        answer = httpx.post(live.url + "/v1/completions", json={"model": "math", "prompt": "1+1"}, timeout=10)
        again = _load(live, lora_name="math", lora_path="/elsewhere")
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'math' added successfully."
    assert loaded.headers["content-type"].startswith("text/plain")
    assert ids_after_load == [*SERVED_NAMES, "sql", "chat", "other", "math"]
    math = {"name": "math", "path": "/adapters/math", "id": 4}  # after the three --lora-modules
    assert (
        [m.lora for m in decode.messages(LoadLoRA)] == [math] == [m.lora for m in prefill.messages(LoadLoRA)]
    )
    assert answer.status_code == 200, answer.text
    assert decode.messages(GenerateRequest)[-1].lora == math == prefill.messages(GenerateRequest)[-1].lora
    error = assert_openai_error(again, 400)
    assert error["message"] == "The lora adapter 'math' has already been loaded."
    assert error["type"] == "InvalidUserInput"
    assert len(decode.messages(LoadLoRA)) == 1  # a refused name never reaches the workers


def test_a_load_one_worker_refuses_fails_with_its_words_and_leaves_nothing_loaded(tokenizer):
    good, refusing = LoRAWorker(), LoRAWorker(refusal=(400, "LoRA rank 64 is above --max-lora-rank 16"))
    with running_router(served_model(tokenizer), [good, refusing], lora=LORA,
                        allow_runtime_lora_updating=True) as live:  # fmt: skip
        before = _model_ids(live)
        refused = _load(live, lora_name="big", lora_path="/adapters/big")
        after = _model_ids(live)
        asked = httpx.post(live.url + "/v1/completions", json={"model": "big", "prompt": "hi"}, timeout=10)
        assert good.wait_for(lambda: good.messages(UnloadLoRA))
    assert assert_openai_error(refused, 400)["message"] == "LoRA rank 64 is above --max-lora-rank 16"
    assert after == before and "big" not in after
    assert assert_openai_error(asked, 404)["message"] == "The model `big` does not exist."
    assert [m.lora_name for m in good.messages(UnloadLoRA)] == ["big"] and good.held == []
    assert refusing.messages(UnloadLoRA) == []  # it never held it


def test_a_worker_finding_no_adapter_at_the_path_gives_its_404(tokenizer):
    worker = LoRAWorker(refusal=(404, "No adapter found at /adapters/none"))
    with running_router(
        served_model(tokenizer), [worker], lora=LORA, allow_runtime_lora_updating=True
    ) as live:
        answer = _load(live, lora_name="none", lora_path="/adapters/none")
    assert assert_openai_error(answer, 404)["message"] == "No adapter found at /adapters/none"


@pytest.mark.parametrize(
    "body",
    [{}, {"lora_name": "x"}, {"lora_path": "/p"}, {"lora_name": "", "lora_path": "/p"}],
)
def test_a_load_without_a_name_and_a_path_is_400(tokenizer, body):
    with running_router(
        served_model(tokenizer), [LoRAWorker()], lora=LORA, allow_runtime_lora_updating=True
    ) as live:
        error = assert_openai_error(_load(live, **body), 400)
        bad_type = assert_openai_error(_load(live, lora_name=3, lora_path="/p"), 400)
    assert error["message"] == "Both 'lora_name' and 'lora_path' must be provided."
    assert bad_type["param"] == "lora_name"


def test_an_unload_stops_new_requests_at_once_and_reaches_every_worker(tokenizer):
    decode, prefill = LoRAWorker(), LoRAWorker(role="prefill")
    with running_router(served_model(tokenizer), [decode], [prefill], lora=LORA,
                        allow_runtime_lora_updating=True) as live:  # fmt: skip
        removed = _unload(live, lora_name="sql")
        ids = _model_ids(live)
        asked = httpx.post(live.url + "/v1/completions", json={"model": "sql", "prompt": "hi"}, timeout=10)
        twice = _unload(live, lora_name="sql")
        by_id = _unload(live, lora_int_id=2)
        nothing = _unload(live)
        reloaded = _load(live, lora_name="sql", lora_path="/adapters/sql")
        ids_after_reload = _model_ids(live)
    assert removed.status_code == 200 and removed.text == "Success: LoRA adapter 'sql' removed successfully."
    assert ids == [*SERVED_NAMES, "chat", "other"]
    assert assert_openai_error(asked, 404)["message"] == "The model `sql` does not exist."
    assert [m.lora_name for m in decode.messages(UnloadLoRA)][:1] == ["sql"]
    assert [m.lora_name for m in prefill.messages(UnloadLoRA)][:1] == ["sql"]
    error = assert_openai_error(twice, 404)
    assert error["message"] == "The lora adapter 'sql' cannot be found." and error["type"] == "NotFoundError"
    assert by_id.text == "Success: LoRA adapter 'chat' removed successfully."
    assert assert_openai_error(nothing, 400)["type"] == "InvalidUserInput"
    assert reloaded.status_code == 200 and ids_after_reload == [*SERVED_NAMES, "other", "sql"]
    assert decode.messages(LoadLoRA)[-1].lora["id"] == 4  # ids are never given twice


def test_runtime_loading_without_enable_lora_is_refused(tokenizer):
    with running_router(served_model(tokenizer), [LoRAWorker()], allow_runtime_lora_updating=True) as live:
        answer = _load(live, lora_name="x", lora_path="/p")
    assert "--enable-lora" in assert_openai_error(answer, 400)["message"]


def test_argparse_namespace_of_lora_modules_is_not_mutated_by_serve():
    """serve writes --lora-modules as JSON for its children without touching its own values."""
    from pdserve.cli.serve import _as_written

    args = argparse.Namespace(lora_modules=[LoRAModulePath("a", "/p")])
    assert _as_written(args).lora_modules == ['{"name": "a", "path": "/p"}']
    assert args.lora_modules == [LoRAModulePath("a", "/p")]
