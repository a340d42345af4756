"""The step message rank 0 sends the other ranks: msgpack arrays, validated on arrival."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from common.distributed import step_message


def test_a_step_arrives_with_its_arrays_and_scalars_unchanged():
    arrays = {"input_ids": np.array([5, 7, 9], dtype=np.int64), "seq_lens": np.array([3], dtype=np.int32)}
    op, decoded, scalars = step_message.decode(step_message.encode_step(arrays, {"width": 2}))
    assert op == step_message.STEP and scalars == {"width": 2}
    assert decoded["input_ids"].dtype == np.int64 and decoded["input_ids"].tolist() == [5, 7, 9]
    assert decoded["seq_lens"].dtype == np.int32 and decoded["seq_lens"].tolist() == [3]
    decoded["input_ids"][0] = 1  # writable, as torch.from_numpy needs


def test_shutdown_is_its_own_op():
    assert step_message.decode(step_message.encode_shutdown())[0] == step_message.SHUTDOWN


@pytest.mark.parametrize(
    "body",
    [
        {"op": "exec", "code": "x"},
        {"op": "step", "scalars": {"width": "2"}, "arrays": {}},
        {"op": "step", "scalars": {}, "arrays": {"ids": ["float64", b"\0" * 8]}},
        {"op": "step", "scalars": {}, "arrays": {"ids": ["int64", b"\0" * 7]}},
        [1, 2],
    ],
)
def test_malformed_messages_are_refused(body):
    with pytest.raises(ValueError, match="step"):
        step_message.decode(msgpack.packb(body))
