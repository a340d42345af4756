"""Turn a batch of next-token logits into chosen tokens, one row per request.

Order of processing, as vLLM applies it:
  0. rows under a grammar (structured outputs) lose every token their grammar does not
     allow next: the batch's bitmask is filled from the requests' matchers on the CPU,
     while the GPU still runs the forward, and applied to those rows on the device;
  1. logprobs are taken from the model's raw logits (vLLM's default
     `logprobs_mode=raw_logprobs`): what a client sees is the model's distribution,
     not the one after penalties, bias or temperature;
  2. logit_bias, then min_tokens (EOS and stop token ids masked while a request has
     fewer than min_tokens outputs);
  3. repetition penalty over prompt + output tokens (positive logits divided,
     negative multiplied), frequency and presence penalties over output tokens;
  4. greedy rows take the argmax here;
  5. the other rows: temperature, top-k, top-p, min-p, then one draw from the
     remaining distribution.

A draw is argmax(probs / E) with E ~ Exp(1) per token (an exact sample of `probs`).
A request with a seed draws E from a generator seeded with (seed, number of outputs
so far), so its tokens depend on nothing else: not on the batch it shares, and not on
a preemption that recomputes it. Other rows share the engine's generator.

Every step is vectorised over the batch; Python loops run only over the rows that
ask for something rare (a logit_bias, penalties, a seed, logprobs). On CUDA the small
per-row tensors travel through pinned memory without blocking, so the host waits for the
GPU only where it reads the chosen tokens (and logprobs) back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from common.engine.outputs import SampledToken, TokenLogprobs
from common.sampling_params import SamplingParams
from common.structured_output.apply_bitmask import apply_token_bitmask_
from common.structured_output.matcher import allocate_bitmask, bitmask_width, fill_bitmasks

_MASK64 = (1 << 64) - 1


class SamplingRequest(Protocol):
    """What the sampler reads of a request (common.engine.request.Request has it)."""

    sampling_params: SamplingParams
    all_token_ids: list[int]
    eos_token_id: int | None
    active_grammar: Any  # the GrammarMatcher of the next token, or None for free text

    @property
    def num_prompt_tokens(self) -> int: ...


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._bitmask: torch.Tensor | None = None  # grammar rows' bitmask, reused step to step

    def __call__(self, logits: torch.Tensor, requests: Sequence[SamplingRequest]) -> list[SampledToken]:
        """Pick one token per row of `logits` ([n, V] fp32) for requests[i]."""
        logits = self.apply_grammars(logits, requests)
        params = [r.sampling_params for r in requests]
        want_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
        want_rows = _to_device(want_logprobs, logits.device) if want_logprobs else None
        raw_logprobs = torch.log_softmax(logits[want_rows], dim=-1) if want_logprobs else None

        token_ids = self._choose(process_logits(logits, requests), requests, params)

        logprobs: list[TokenLogprobs | None] = [None] * len(requests)
        if raw_logprobs is not None:
            ks = [params[i].logprobs or 0 for i in want_logprobs]
            entries = _token_logprobs(raw_logprobs, token_ids[want_rows], ks)
            for i, entry in zip(want_logprobs, entries, strict=True):
                logprobs[i] = entry
        return [SampledToken(t, lp) for t, lp in zip(token_ids.tolist(), logprobs, strict=True)]

    def sample_token_ids(self, logits: torch.Tensor, requests: Sequence[SamplingRequest]) -> torch.Tensor:
        """The chosen token of each row ([n] int64), left where the logits are: the host does
        not wait for it (no logprobs here)."""
        logits = self.apply_grammars(logits, requests)
        return self._choose(process_logits(logits, requests), requests, [r.sampling_params for r in requests])

    def apply_grammars(self, logits: torch.Tensor, requests: Sequence[SamplingRequest]) -> torch.Tensor:
        """Step 0: `logits` with the tokens each constrained row's grammar forbids at -inf
        (a copy; `logits` itself when no row has a grammar)."""
        rows = [i for i, r in enumerate(requests) if r.active_grammar is not None]
        if not rows:
            return logits
        vocab_size = requests[rows[0]].active_grammar.vocab_size
        bitmask = self._bitmask
        if bitmask is None or bitmask.shape[0] < len(rows) or bitmask.shape[1] != bitmask_width(vocab_size):
            bitmask = allocate_bitmask(max(len(rows), 8), vocab_size)
            if logits.device.type == "cuda":
                bitmask = bitmask.pin_memory()
            self._bitmask = bitmask
        bitmask = bitmask[: len(rows)]
        fill_bitmasks([(requests[i].active_grammar, j) for j, i in enumerate(rows)], bitmask)
        logits = logits.clone()  # the caller's tensor stays the model's output
        indices = None if len(rows) == len(requests) else _to_device(rows, logits.device)
        apply_token_bitmask_(logits, _host_to_device(bitmask, logits.device), indices)
        return logits

    # -- choosing --------------------------------------------------------------------

    def _choose(
        self, logits: torch.Tensor, requests: Sequence[SamplingRequest], params: list[SamplingParams]
    ) -> torch.Tensor:
        token_ids = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:
            return token_ids
        device = logits.device
        rows = _to_device(random_rows, device)
        sub_params = [params[i] for i in random_rows]
        x = logits[rows]
        temperature = _to_device([p.temperature for p in sub_params], device, x.dtype)
        x = x / temperature.unsqueeze(1)
        x = _apply_top_k_top_p(x, sub_params)
        probs = torch.softmax(x, dim=-1)
        probs = _apply_min_p(probs, sub_params)
        noise = self._exponential_noise(probs, [requests[i] for i in random_rows])
        token_ids[rows] = (probs / noise).argmax(dim=-1)
        return token_ids

    def _exponential_noise(self, probs: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self._generator(probs.device))
        for j, request in enumerate(requests):
            seed = request.sampling_params.seed
            if seed is None:
                continue
            num_outputs = len(request.all_token_ids) - request.num_prompt_tokens
            generator = torch.Generator(device=probs.device)
            generator.manual_seed(_mix_seed(seed, num_outputs))
            noise[j].exponential_(generator=generator)
        return noise

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator


def can_sample_ahead(params: SamplingParams, num_output_tokens: int, num_unknown: int) -> bool:
    """Whether a request's next token may be chosen on the GPU without the host waiting for
    it, while `num_unknown` of its latest tokens are not known to the host yet (the host
    knows `num_output_tokens` outputs). Logprobs are read back at once; penalties, a seeded
    draw and min_tokens below its count read the request's own outputs. A grammar does too,
    but only at sampling, which a step launched ahead leaves until its input tokens are in
    (ModelRunner.launch): its forward still runs ahead."""
    if params.logprobs is not None:
        return False
    if num_unknown == 0:
        return True
    return params.seed is None and not _has_penalty(params) and num_output_tokens >= params.min_tokens


def process_logits(logits: torch.Tensor, requests: Sequence[SamplingRequest]) -> torch.Tensor:
    """Steps 2-3: logit_bias, min_tokens, penalties. Greedy rows take the argmax of this.

    Returns `logits` itself when no row asks for any of them, else a processed copy.
    """
    params = [r.sampling_params for r in requests]
    bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
    min_tokens_rows = [
        i for i, (p, r) in enumerate(zip(params, requests, strict=True)) if _in_min_tokens(p, r)
    ]
    penalty_rows = [i for i, p in enumerate(params) if _has_penalty(p)]
    if not (bias_rows or min_tokens_rows or penalty_rows):
        return logits
    logits = logits.clone()  # the caller's tensor stays the model's output
    if bias_rows:
        _apply_logit_bias(logits, [(i, params[i].logit_bias) for i in bias_rows])
    if min_tokens_rows:
        _mask_stop_tokens(logits, [(i, requests[i]) for i in min_tokens_rows])
    if penalty_rows:
        rows = _to_device(penalty_rows, logits.device)
        logits[rows] = _apply_penalties(logits[rows], [requests[i] for i in penalty_rows])
    return logits


def _in_min_tokens(params: SamplingParams, request: SamplingRequest) -> bool:
    return (
        params.min_tokens > 0 and len(request.all_token_ids) - request.num_prompt_tokens < params.min_tokens
    )


def _has_penalty(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
    )


def _apply_logit_bias(logits: torch.Tensor, biases: list[tuple[int, dict[int, float]]]) -> None:
    rows, cols, values = [], [], []
    for row, bias in biases:
        for token_id, value in bias.items():
            rows.append(row)
            cols.append(int(token_id))
            values.append(float(value))
    device = logits.device
    logits.index_put_(
        (_to_device(rows, device), _to_device(cols, device)),
        _to_device(values, device, logits.dtype),
        accumulate=True,
    )


def _mask_stop_tokens(logits: torch.Tensor, rows: list[tuple[int, SamplingRequest]]) -> None:
    row_idx, col_idx = [], []
    for row, request in rows:
        stop_ids = list(request.sampling_params.stop_token_ids)
        if request.eos_token_id is not None and not request.sampling_params.ignore_eos:
            stop_ids.append(request.eos_token_id)
        row_idx.extend([row] * len(stop_ids))
        col_idx.extend(stop_ids)
    if row_idx:
        device = logits.device
        logits[_to_device(row_idx, device), _to_device(col_idx, device)] = float("-inf")


def _apply_penalties(logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    """Penalise rows of `logits` ([m, V]) by the tokens their requests have seen."""
    m, vocab = logits.shape
    device = logits.device
    prompts = [r.all_token_ids[: r.num_prompt_tokens] for r in requests]
    outputs = [r.all_token_ids[r.num_prompt_tokens :] for r in requests]
    # counts over V + 1 columns: the last one soaks up the padding
    output_counts = _token_counts(outputs, vocab, device)
    prompt_seen = _token_counts(prompts, vocab, device) > 0
    output_seen = output_counts > 0

    params = [r.sampling_params for r in requests]
    repetition = _to_device([p.repetition_penalty for p in params], device).unsqueeze(1)
    frequency = _to_device([p.frequency_penalty for p in params], device).unsqueeze(1)
    presence = _to_device([p.presence_penalty for p in params], device).unsqueeze(1)

    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(prompt_seen | output_seen, penalised, logits)
    logits = logits - frequency * output_counts.to(logits.dtype)
    return logits - presence * output_seen.to(logits.dtype)


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    width = max((len(t) for t in token_lists), default=0)
    padded = torch.full((len(token_lists), max(width, 1)), vocab, dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if tokens:
            padded[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    padded = _host_to_device(padded, device)
    counts = torch.zeros(len(token_lists), vocab + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.int32))
    return counts[:, :vocab]


def _apply_top_k_top_p(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k, then outside its top-p nucleus."""
    vocab = x.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    use_k = any(k < vocab for k in top_k)
    use_p = any(p < 1.0 for p in top_p)
    if not (use_k or use_p):
        return x
    device = x.device
    k = _to_device(top_k, device).unsqueeze(1)
    if not use_p:
        # top-k alone: the k-th largest value is the cut, no full sort needed
        kth = x.topk(max(top_k), dim=-1).values.gather(1, k - 1)
        return x.masked_fill(x < kth, float("-inf"))
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
    if use_k:
        rank = torch.arange(vocab, device=device).unsqueeze(0)
        sorted_x = sorted_x.masked_fill(rank >= k, float("-inf"))
    probs = sorted_x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    p = _to_device(top_p, device, x.dtype).unsqueeze(1)
    # the most likely token always stays: the mass before it is 0 < top_p
    sorted_x = sorted_x.masked_fill(mass_before >= p, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def _apply_min_p(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    min_p = [p.min_p for p in params]
    if not any(v > 0 for v in min_p):
        return probs
    threshold = _to_device(min_p, probs.device, probs.dtype).unsqueeze(1)
    threshold = threshold * probs.max(dim=-1, keepdim=True).values
    return probs.masked_fill(probs < threshold, 0.0)


def _token_logprobs(
    raw_logprobs: torch.Tensor,  # [m, V], the rows that asked for logprobs
    token_ids: torch.Tensor,  # [m]
    ks: list[int],  # how many top logprobs each row wants
) -> list[TokenLogprobs]:
    chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1))  # [m, 1]
    # rank 1 = the most likely; ties with the chosen token count as ahead of it, as in vLLM
    ranks = (raw_logprobs >= chosen).sum(dim=-1)
    max_k = max(ks)
    if max_k > 0:
        top = raw_logprobs.topk(max_k, dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    else:
        top_values = top_ids = [[] for _ in ks]
    result = []
    for j, (token_id, logprob, rank, k) in enumerate(
        zip(token_ids.tolist(), chosen.squeeze(1).tolist(), ranks.tolist(), ks, strict=True)
    ):
        top_j = list(zip(top_ids[j][:k], top_values[j][:k], strict=True))
        result.append(TokenLogprobs(token_id=token_id, logprob=logprob, rank=rank, top=top_j))
    return result


def _to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a tensor on `device`."""
    return _host_to_device(torch.tensor(values, dtype=dtype), device)


def _host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # On CUDA through pinned memory without blocking: a copy from pageable memory would
    # wait for the forward still running on the GPU, a host sync in the middle of a step.
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _mix_seed(seed: int, step: int) -> int:
    """A 64-bit generator seed from (request seed, output index): splitmix64 finaliser."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
