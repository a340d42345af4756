"""An engine with --tensor-parallel-size N on CPU (gloo): same greedy tokens as one process.

Each test starts real rank processes; the hang_guard fixture bounds every test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from common.config.engine_config import EngineConfig
from common.engine.engine_setup import resolve_engine_config
from common.engine.llm_engine import LLMEngine
from common.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return engine.generate(prompts, params)


def tp_engine(model: str, tp: int, **kwargs) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model=model, tensor_parallel_size=tp, seed=0, **kwargs))


def test_smollm2_greedy_outputs_with_two_ranks_equal_one_process(smollm2_model, smollm2_source, hang_guard):
    # 9 query / 3 KV heads: the two ranks hold 1 and 2 KV groups
    prompts = [
        [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407],
        [504, 3458, 282, 4649, 314],
        list(range(1000, 1040)),  # longer than a block: several blocks per request
    ]
    model, model_config = smollm2_model
    single = LLMEngine.from_config(
        EngineConfig(max_model_len=512, seed=0), model=model, model_config=model_config
    )
    expected = generate(single, prompts)
    engine = tp_engine(str(smollm2_source.path), 2, max_model_len=512)
    try:
        assert generate(engine, prompts) == expected
    finally:
        engine.shutdown()


@pytest.mark.parametrize("tp", [2, 4])
def test_tiny_llama_greedy_outputs_with_tp_ranks_equal_one_process(tiny_tp_folder, tp, hang_guard):
    # TP=4 replicates each of the 2 KV heads on 2 ranks and pads the vocabulary (62 rows)
    folder = str(tiny_tp_folder.path)
    prompts = [[3, 14, 15, 9, 26, 5], [35, 8], list(range(40))]
    single = tp_engine(folder, 1, block_size=4, enable_chunked_prefill=True, max_num_batched_tokens=24)
    expected = generate(single, prompts)
    engine = tp_engine(folder, tp, block_size=4, enable_chunked_prefill=True, max_num_batched_tokens=24)
    try:
        # chunked prefill (24-token budget) mixes prefill chunks and decodes in one step
        assert generate(engine, prompts) == expected
        sampled = SamplingParams(temperature=0.8, seed=7, max_tokens=8)
        assert generate(engine, prompts, sampled) == generate(single, prompts, sampled)
    finally:
        engine.shutdown()
    assert [p.poll() for p in engine.executor.rank_processes] == [0] * (tp - 1)


def test_a_size_that_does_not_split_the_model_is_refused_before_loading(smollm2_model):
    _, model_config = smollm2_model
    with pytest.raises(ValueError, match="--tensor-parallel-size 4 does not fit .* 3 KV heads"):
        resolve_engine_config(EngineConfig(tensor_parallel_size=4), model_config, torch.device("cpu"))


def test_ranks_exit_when_the_engine_process_is_killed(tiny_tp_folder, tmp_path, hang_guard):
    script = textwrap.dedent(
        f"""
        import time
        from common.config.engine_config import EngineConfig
        from common.engine.llm_engine import LLMEngine
        engine = LLMEngine.from_config(EngineConfig(model={str(tiny_tp_folder.path)!r}, tensor_parallel_size=2))
        print(" ".join(str(p.pid) for p in engine.executor.rank_processes), flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 1 and alive(pids[0])
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in pids)


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return os.path.exists(f"/proc/{pid}")
