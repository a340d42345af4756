"""The JSON examples of docs/operators.md and docs/deployment.md are configs pdserve
accepts: each ```json block goes through the project's own parsers, as
--kv-transfer-config or --kv-events-config of the worker role it is written for."""

from __future__ import annotations

import json
import re

import pytest

from common.config.kv_events_config import KVEventsConfig
from common.config.kv_transfer_config import KVTransferConfig
from common.worker.role import kv_transfer_config_for
from decode_worker.role import DECODE_ROLE
from prefill_worker.role import PREFILL_ROLE
from tests.deploy.deploy_files import REPO

DOCS = [REPO / "docs" / "operators.md", REPO / "docs" / "deployment.md"]
_JSON_BLOCK = re.compile(r"^```json\n(.*?)^```", re.DOTALL | re.MULTILINE)
_ROLES = {"kv_producer": PREFILL_ROLE, "kv_consumer": DECODE_ROLE, "kv_both": DECODE_ROLE}


def json_examples() -> list[tuple[str, dict]]:
    examples = []
    for path in DOCS:
        for i, match in enumerate(_JSON_BLOCK.finditer(path.read_text())):
            examples.append((f"{path.name}#{i}", json.loads(match.group(1))))
    return examples


def kind_of(example: dict) -> str:
    transfer = {"kv_connector", "kv_role"} & set(example)
    events = {"enable_kv_cache_events", "endpoint", "publisher"} & set(example)
    assert bool(transfer) != bool(events), f"cannot tell which flag this example is for: {example}"
    return "transfer" if transfer else "events"


EXAMPLES = json_examples()


def test_operators_page_has_examples_of_both_flags():
    kinds = [kind_of(example) for _, example in EXAMPLES]
    assert kinds.count("transfer") >= 4 and kinds.count("events") >= 2


@pytest.mark.parametrize(("where", "example"), EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_example_is_a_config_pdserve_accepts(where, example):
    if kind_of(example) == "events":
        config = KVEventsConfig.from_dict(example)
        assert config.publisher == ("zmq" if config.enable_kv_cache_events else "null")
        return
    config = KVTransferConfig.from_dict(example)
    role = _ROLES[config.kv_role]
    completed = kv_transfer_config_for(config, role)
    assert completed.kv_connector == example["kv_connector"]


def test_a_misspelled_field_in_an_example_would_be_caught():
    with pytest.raises(ValueError, match="kv_rol"):
        KVTransferConfig.from_dict({"kv_connector": "NixlConnector", "kv_rol": "kv_producer"})
