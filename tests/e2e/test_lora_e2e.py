"""LoRA adapters through the whole system and the real `openai` client: `pdserve serve` on
loopback (one prefill worker, one decode worker, the router; the embedded SmolLM2 on CPU)
with --enable-lora --max-loras 2 --max-cpu-loras 4, two adapters made here with peft and
served by --lora-modules, and --allow-runtime-lora-updating.

Chat under each adapter and the base model; a third adapter loaded at run time while
eight streams run, then an adapter unloaded while streams under it run: no request
fails, and /v1/models is right after each. Bad input: an unknown adapter is vLLM's 404;
an adapter of a rank above --max-lora-rank, a missing folder, a malformed
adapter_config.json and a target module the model lacks are each refused at load (400)
with nothing changed. Output parity with peft is tests/lora/test_peft_parity.py's."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.harness.stack import ServeStack
from tests.lora.peft_adapters import AdapterSpec, make_adapters

MODEL = "SmolLM2-135M-Instruct"
ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECS = (
    AdapterSpec("sql", 8, 16, ("q_proj", "v_proj"), seed=11),
    AdapterSpec("chat", 8, 16, ALL_SEVEN, seed=12),
    AdapterSpec("math", 16, 16, ("o_proj", "down_proj"), seed=13),  # loaded at run time
    AdapterSpec("huge", 32, 32, ("q_proj",), seed=14),  # above --max-lora-rank 16
)
STREAMS = ["sql", "chat", MODEL, "chat", "sql", MODEL, "chat", "sql"]  # eight at once
# enough engine steps that the streams still run when the load and then the unload have
# each waited for the decode worker's next turn
STREAM_TOKENS = 24
TIMEOUT_S = 300  # a request under a third adapter waits for a slot (--max-loras 2) on a busy CPU


@pytest.fixture(scope="module")
def adapters(hf_smollm2, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    folders = make_adapters(hf_smollm2, root, SPECS, b_std=0.005)  # small B: answers stay sane
    # refused at load: no folder; adapter_config.json that is not JSON; a module the model lacks
    folders["missing"] = root / "no-such-adapter"
    malformed = shutil.copytree(folders["sql"], root / "malformed")
    (malformed / "adapter_config.json").write_text('{"r": 8, "lora_alpha": ', encoding="utf-8")
    foreign = shutil.copytree(folders["sql"], root / "foreign")
    config = json.loads((foreign / "adapter_config.json").read_text(encoding="utf-8"))
    config["target_modules"] = ["c_attn"]  # GPT-2's fused attention projection
    (foreign / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return {**folders, "malformed": malformed, "foreign": foreign}


@pytest.fixture(scope="module")
def stack(adapters):
    serve = ServeStack(
        [
            "--dtype", "float32", "--device", "cpu", "--max-model-len", "512",
            "--num-gpu-blocks-override", "128",
            "--num-prefill-workers", "1", "--num-decode-workers", "1",
            "--enable-lora", "--max-loras", "2", "--max-cpu-loras", "4",
            "--lora-modules", f"sql={adapters['sql']}",
            json.dumps({"name": "chat", "path": str(adapters["chat"]), "base_model_name": MODEL}),
            "--allow-runtime-lora-updating",
            "--disable-uvicorn-access-log",
            "--worker-health-timeout", "30",  # a CPU step can keep a worker silent on a busy machine
        ]
    )  # fmt: skip
    try:
        yield serve.ready()
    finally:
        serve.stop_checked()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="none", timeout=TIMEOUT_S, max_retries=0)


def model_ids(client: openai.OpenAI) -> list[str]:
    return [m.id for m in client.models.list().data]


def chat(client: openai.OpenAI, model: str, max_tokens: int = 8):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a color."}],
        temperature=0,
        max_tokens=max_tokens,
    )


def load(stack, name: str, path: Path) -> httpx.Response:
    body = {"lora_name": name, "lora_path": str(path)}
    return httpx.post(stack.url + "/v1/load_lora_adapter", json=body, timeout=TIMEOUT_S)


def unload(stack, name: str) -> httpx.Response:
    return httpx.post(stack.url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=TIMEOUT_S)


def test_models_lists_the_adapters_with_their_folders_and_parent(stack, adapters):
    cards = httpx.get(stack.url + "/v1/models", timeout=10).json()["data"]
    assert [c["id"] for c in cards] == [MODEL, "sql", "chat"]
    for card in cards[1:]:
        assert card["root"] == str(adapters[card["id"]]) and card["parent"] == MODEL
        assert card["max_model_len"] is None


def test_chat_runs_under_each_adapter_and_the_base_model(client):
    for model in ("sql", "chat", MODEL):
        answer = chat(client, model)
        assert answer.model == model
        choice = answer.choices[0]
        assert choice.finish_reason in ("stop", "length") and choice.message.content
        assert answer.usage.completion_tokens > 0


def test_a_runtime_load_and_an_unload_under_traffic_fail_no_request(stack, client, adapters):
    first_chunk = [threading.Event() for _ in STREAMS]
    done = [threading.Event() for _ in STREAMS]

    def stream(i: int) -> tuple[str | None, str]:
        try:
            chunks = client.chat.completions.create(
                model=STREAMS[i],
                messages=[{"role": "user", "content": f"Tell me a story about the number {i}."}],
                temperature=0,
                max_tokens=STREAM_TOKENS,
                stream=True,
                extra_body={"ignore_eos": True},  # every stream runs its full length
            )
            finish, text = None, ""
            for chunk in chunks:
                first_chunk[i].set()
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
            return finish, text
        finally:
            first_chunk[i].set()
            done[i].set()

    with ThreadPoolExecutor(len(STREAMS)) as pool:
        futures = [pool.submit(stream, i) for i in range(len(STREAMS))]
        for event in first_chunk:
            assert event.wait(TIMEOUT_S), "a stream did not start"

        loaded = load(stack, "math", adapters["math"])
        assert loaded.status_code == 200, loaded.text
        assert loaded.text == "Success: LoRA adapter 'math' added successfully."
        assert model_ids(client) == [MODEL, "sql", "chat", "math"]

        chat_running = [not done[i].is_set() for i, model in enumerate(STREAMS) if model == "chat"]
        removed = unload(stack, "chat")
        assert removed.status_code == 200, removed.text
        assert model_ids(client) == [MODEL, "sql", "math"]
        assert any(chat_running), "the chat streams ended before the unload; raise STREAM_TOKENS"

        under_math = chat(client, "math", max_tokens=4)
        assert under_math.model == "math" and under_math.choices[0].finish_reason in ("stop", "length")
        results = [future.result(timeout=TIMEOUT_S) for future in futures]

    for model, (finish, text) in zip(STREAMS, results, strict=True):
        assert finish == "length" and text, (model, finish, text)  # chat's streams too
    with pytest.raises(openai.NotFoundError):
        chat(client, "chat")


def test_an_unknown_adapter_is_vllms_404(client):
    with pytest.raises(openai.NotFoundError) as unknown:
        chat(client, "no-such-adapter")
    assert unknown.value.body == {
        "message": "The model `no-such-adapter` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


@pytest.mark.parametrize(
    "name, says",
    [
        ("huge", "--max-lora-rank"),
        ("missing", "is not a folder"),
        ("malformed", "is not valid JSON"),
        ("foreign", "c_attn"),
    ],
)
def test_a_bad_adapter_is_refused_at_load_and_changes_nothing(stack, client, adapters, name, says):
    before = model_ids(client)
    refused = load(stack, f"bad-{name}", adapters[name])
    assert refused.status_code == 400, refused.text
    assert says in refused.json()["error"]["message"]
    assert model_ids(client) == before
    with pytest.raises(openai.NotFoundError):
        chat(client, f"bad-{name}", max_tokens=2)
    answer = chat(client, "sql", max_tokens=4)  # the good adapters still serve
    assert answer.model == "sql" and answer.choices[0].finish_reason in ("stop", "length")
