"""The embedded SmolLM2 GGUF through our loader and paged KV cache gives transformers' logits."""

from __future__ import annotations

import pytest
import torch

from common.attention.reference import TorchAttentionBackend
from common.models.loader import load_model

PROMPTS = {
    "short": [1, 9690, 198, 2683, 359, 253],
    "long": list(range(400, 437)),  # 37 tokens: spans many KV blocks
    "repeats": [504, 504, 504, 2, 2, 17, 17, 17, 17],
}
DECODE_STEPS = 5


@pytest.fixture(scope="module")
def smollm2(smollm2_source):
    model, config = load_model(
        smollm2_source, dtype="auto", device="cpu", attn_backend=TorchAttentionBackend()
    )
    return model


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def test_gguf_config_describes_smollm2(smollm2):
    cfg = smollm2.config
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.rope_theta) == (49152, 8192, 100000.0)
    assert cfg.tie_word_embeddings and smollm2.lm_head is smollm2.embed_tokens
    assert next(smollm2.parameters()).dtype == torch.float32  # "auto" on CPU


@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_prefill_then_paged_decode_matches_transformers(
    smollm2, hf_smollm2, paged_runner, logits_close, prompt
):
    runner = paged_runner(smollm2)
    tokens = list(prompt)
    steps = [runner.step([("r", tokens)])["r"]]
    for _ in range(DECODE_STEPS):
        tokens.append(int(steps[-1][-1].argmax()))
        steps.append(runner.step([("r", tokens[-1:])])["r"])
    # One causal forward over the whole sequence gives the reference for every step.
    ours, ref = torch.cat(steps), hf_logits(hf_smollm2, tokens)
    logits_close(ours, ref)
    decoded = slice(len(prompt) - 1, None)
    assert torch.equal(ours[decoded].argmax(-1), ref[decoded].argmax(-1))


def test_two_requests_packed_in_one_forward_match_transformers(
    smollm2, hf_smollm2, paged_runner, logits_close
):
    runner = paged_runner(smollm2)
    seqs = {"a": list(PROMPTS["long"]), "b": list(PROMPTS["short"])}
    steps: dict[str, list[torch.Tensor]] = {"a": [], "b": [], "c": []}

    def run(chunks):
        for req, logits in runner.step(chunks).items():
            steps[req].append(logits)

    # Step 1: both prompts packed in one prefill.
    run(list(seqs.items()))
    # Steps 2-4: both decode together (a pure-decode batch).
    for _ in range(3):
        for req in ("a", "b"):
            seqs[req].append(int(steps[req][-1][-1].argmax()))
        run([(req, seqs[req][-1:]) for req in ("a", "b")])
    # Step 5: "a" decodes while a new request "c" prefills the first chunk of its prompt;
    # step 6: "c" prefills the rest against its cached first chunk.
    seqs["a"].append(int(steps["a"][-1][-1].argmax()))
    seqs["c"] = list(PROMPTS["repeats"])
    run([("a", seqs["a"][-1:]), ("c", seqs["c"][:5])])
    run([("c", seqs["c"][5:])])
    for req, tokens in seqs.items():
        logits_close(torch.cat(steps[req]), hf_logits(hf_smollm2, tokens))
