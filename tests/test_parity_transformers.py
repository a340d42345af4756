"""Greedy `pdserve run-batch` output equals transformers' greedy `generate`, token for token.

On the embedded SmolLM2 GGUF, fp32 on CPU, through both /v1/completions and
/v1/chat/completions, and unchanged by the engine's settings: prefix caching on or
off, a 16-token step budget (chunked prefill), a KV cache so small that requests are
preempted and recomputed, and one request at a time versus 32 batched together.

Every request runs 48 tokens with ignore_eos (transformers with eos_token_id=None),
so each prompt compares its full 48 tokens even where the model would have ended.
"""

from __future__ import annotations

import json

import pytest
import torch

from common.config.engine_config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.tokenizer import load_tokenizer
from pdserve.cli.run_batch import run_batch, served_model_of

NUM_TOKENS = 48
MAX_MODEL_LEN = 256

COMPLETION_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a faraway kingdom,",
    "def fibonacci(n):\n    ",
    "Here is a list of three fruits:\n1.",
    "Q: What is 12 times 7?\nA:",
    "Photosynthesis is the process by which",
    "Dear Sir or Madam,\n\nI am writing to",
    "Les chats sont des animaux qui",
    "import numpy as np\n\narray = np.array([1, 2, 3])\nprint(",
    "My favourite emoji is 🌊 because",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [
        {"role": "system", "content": "You are a pirate. Answer like one."},
        {"role": "user", "content": "How are you?"},
    ],
    [{"role": "user", "content": "Explain recursion to a five-year-old."}],
    [{"role": "user", "content": "List three uses of copper."}],
    [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada!"},
        {"role": "user", "content": "What is my name?"},
    ],
    [{"role": "user", "content": "Translate 'good morning' into Spanish and German."}],
    [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Give me a Python one-liner"},
                {"type": "text", "text": "that reverses a string."},
            ],
        }
    ],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What colour is the sky?"},
    ],
    [{"role": "user", "content": "What is 2 + 2? Explain step by step."}],
]


def _greedy(body: dict) -> dict:
    return {**body, "max_tokens": NUM_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True}


def _completion_line(i: int) -> dict:
    body = _greedy({"prompt": COMPLETION_PROMPTS[i]})
    return {"custom_id": f"completion-{i}", "method": "POST", "url": "/v1/completions", "body": body}


def _chat_line(i: int) -> dict:
    body = _greedy({"messages": CHATS[i]})
    return {"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


ALL_LINES = [_completion_line(i) for i in range(len(COMPLETION_PROMPTS))] + [
    _chat_line(i) for i in range(len(CHATS))
]


def _template_messages(messages: list[dict]) -> list[dict]:
    """The messages as the server hands them to the template: text parts joined with newlines."""
    return [
        {
            **m,
            "content": "\n".join(p["text"] for p in m["content"])
            if isinstance(m["content"], list)
            else m["content"],
        }
        for m in messages
    ]


@pytest.fixture(scope="module")
def reference(hf_smollm2, hf_smollm2_tokenizer) -> dict[str, dict]:
    """transformers' prompt ids, output ids and output text for every line, by custom_id."""
    tok = hf_smollm2_tokenizer
    results = {}
    for line in ALL_LINES:
        body = line["body"]
        if "prompt" in body:
            prompt_ids = tok(body["prompt"]).input_ids
            prompt_text = body["prompt"]
        else:
            messages = _template_messages(body["messages"])
            prompt_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt_ids = tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        inputs = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = hf_smollm2.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=NUM_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=tok.pad_token_id,
            )
        output_ids = out[0, len(prompt_ids) :].tolist()
        assert len(output_ids) == NUM_TOKENS
        results[line["custom_id"]] = {
            "prompt_text": prompt_text,
            "prompt_ids": list(prompt_ids),
            "output_ids": output_ids,
            "output_text": tok.decode(output_ids, skip_special_tokens=True),
        }
    return results


@pytest.fixture(scope="module")
def tokenizer(smollm2_source):
    return load_tokenizer(smollm2_source)


def _engine(smollm2_model, **settings) -> LLMEngine:
    model, model_config = smollm2_model
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, **settings)
    return LLMEngine.from_config(config, model=model, model_config=model_config)


def _run(smollm2_model, tokenizer, lines, engine=None, **settings):
    """run-batch's lines on an engine with these settings; the output lines and engine stats."""
    engine = engine or _engine(smollm2_model, **settings)
    served = served_model_of(engine, tokenizer, "SmolLM2-135M-Instruct")
    results, complete = run_batch(engine, served, [json.dumps(line) for line in lines])
    assert complete
    return results, engine.stats()


def _assert_matches_reference(results, lines, reference):
    assert [r["custom_id"] for r in results] == [line["custom_id"] for line in lines]
    for result in results:
        assert result["error"] is None and result["response"]["status_code"] == 200, result
        body = result["response"]["body"]
        expected = reference[result["custom_id"]]
        choice = body["choices"][0]
        if body["object"] == "chat.completion":
            prompt_ids, text = body["prompt_token_ids"], choice["message"]["content"]
        else:
            prompt_ids, text = choice["prompt_token_ids"], choice["text"]
        assert prompt_ids == expected["prompt_ids"], result["custom_id"]
        assert choice["token_ids"] == expected["output_ids"], result["custom_id"]
        assert text == expected["output_text"], result["custom_id"]
        assert choice["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == NUM_TOKENS


def test_rendered_chat_prompts_equal_transformers_apply_chat_template(tokenizer, hf_smollm2_tokenizer):
    from common.openai_api import ChatCompletionRequest, ServedModel, render_chat_prompt

    served = ServedModel(["m"], MAX_MODEL_LEN, tokenizer, 49152)
    for messages in CHATS:
        for add_generation_prompt in (True, False):
            ours = render_chat_prompt(
                ChatCompletionRequest.parse(
                    {"messages": messages, "add_generation_prompt": add_generation_prompt}
                ),
                served,
            )
            theirs = hf_smollm2_tokenizer.apply_chat_template(
                _template_messages(messages), add_generation_prompt=add_generation_prompt, tokenize=False
            )
            assert ours == theirs


def test_one_request_at_a_time_and_32_batched_with_prefix_caching_match_transformers(
    smollm2_model, tokenizer, reference
):
    engine = _engine(smollm2_model, enable_prefix_caching=True)
    singles = [ALL_LINES[0], ALL_LINES[-1]]
    for line in singles:
        steps_before = engine.stats().num_steps
        results, stats = _run(smollm2_model, tokenizer, [line], engine=engine)
        _assert_matches_reference(results, [line], reference)
        assert stats.num_steps - steps_before >= NUM_TOKENS  # alone: one token a step

    # every line, and some twice; the singles' blocks are still in the prefix cache
    lines = ALL_LINES + ALL_LINES[:6] + ALL_LINES[-6:]
    assert len(lines) == 32
    steps_before = engine.stats().num_steps
    results, stats = _run(smollm2_model, tokenizer, lines, engine=engine)
    _assert_matches_reference(results, lines, reference)
    assert stats.prefix_cache_hits > 0
    assert stats.num_steps - steps_before < 2 * NUM_TOKENS  # one batch, not 32 requests one after another


def test_without_prefix_caching_the_outputs_are_the_same(smollm2_model, tokenizer, reference):
    results, stats = _run(smollm2_model, tokenizer, ALL_LINES, enable_prefix_caching=False)
    _assert_matches_reference(results, ALL_LINES, reference)
    assert stats.prefix_cache_hits == 0


def test_chunked_prefill_with_a_16_token_budget_gives_the_same_outputs(smollm2_model, tokenizer, reference):
    results, _ = _run(smollm2_model, tokenizer, ALL_LINES, max_num_batched_tokens=16)
    _assert_matches_reference(results, ALL_LINES, reference)


def test_preemption_by_recompute_gives_the_same_outputs(smollm2_model, tokenizer, reference):
    # 20 blocks of 16 tokens hold 320 tokens; the 20 requests need about 1,500 together
    results, stats = _run(smollm2_model, tokenizer, ALL_LINES, num_gpu_blocks_override=20, block_size=16)
    _assert_matches_reference(results, ALL_LINES, reference)
    assert stats.num_preemptions > 0
