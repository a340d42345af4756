"""--response-role names the role of chat answers, whole and in the first streamed chunk of
each choice (a fake worker answers)."""

from __future__ import annotations

import json
from dataclasses import replace

import httpx

from tests.router.app_harness import embedded_tokenizer, running_router, served_model, sse_events
from tests.router.fake_worker import EOS, FakeWorker


def test_whole_and_streamed_answers_carry_the_response_role():
    tokenizer = embedded_tokenizer()
    reply = [*tokenizer.encode("Hello there", add_special_tokens=False), EOS]
    worker = FakeWorker(script=lambda prompt: reply, token_interval_s=0.002)
    served = replace(served_model(tokenizer), response_role="narrator")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "n": 2}
    with running_router(served, [worker]) as live, httpx.Client(base_url=live.url, timeout=10) as http:
        whole = http.post("/v1/chat/completions", json=body)
        streamed = http.post("/v1/chat/completions", json={**body, "stream": True})
    assert whole.status_code == 200 and streamed.status_code == 200, (whole.text, streamed.text)
    assert [c["message"]["role"] for c in whole.json()["choices"]] == ["narrator", "narrator"]
    chunks = [json.loads(e) for e in sse_events(streamed) if e != "[DONE]"]
    roles = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            roles.setdefault(choice["index"], []).append(choice["delta"].get("role"))
    assert sorted(roles) == [0, 1]
    for seen in roles.values():  # the first chunk of each choice names the role, no other does
        assert seen[0] == "narrator" and not any(seen[1:])
