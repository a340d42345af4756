"""The LoRA adapters the router serves: name -> (name, path, id), and each one's parent.

With --enable-lora, every --lora-modules entry is served under its name from the start,
with ids 1, 2, 3 ... in the order given; an adapter loaded at run time
(/v1/load_lora_adapter) takes the next id. An id is never given twice, not even after
its adapter is unloaded: the workers key their device slots and the KV events'
`lora_id` by it, so a reused id could name an old adapter's weights. A request whose
`model` is an adapter's name runs under it (common/openai_api/served_model.py reads this
registry as a plain mapping); without --enable-lora the registry is empty and every
adapter name is an unknown model (404), as vLLM answers.

A runtime load first reserves the name (a second load of it is refused while the first
is still asking the workers) and publishes the adapter only once the workers took it;
an unload takes it out first, so no new request starts under it. Everything here runs
on the router's event loop; request preparation reads it from a thread pool, which a
dict lookup allows. Torch-free.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.config.lora_config import LoRAModulePath
from common.lora.lora_request import LoRARequest


@dataclass(frozen=True)
class ServedAdapter:
    lora: LoRARequest
    base_model_name: str | None = None  # its parent in /v1/models; None: the first served name


class LoRAAdapters(Mapping[str, LoRARequest]):
    """The served adapters by name (a Mapping of name -> LoRARequest)."""

    def __init__(self, modules: Sequence[LoRAModulePath] = (), base_names: Sequence[str] = ()) -> None:
        """`modules`: the --lora-modules entries; ValueError when one takes a base model's name."""
        self._served: dict[str, ServedAdapter] = {}
        self._reserved: set[str] = set()  # runtime loads still asking the workers
        self._last_id = 0
        self._base_names = frozenset(base_names)
        for module in modules:
            if module.name in self._base_names:
                raise ValueError(
                    f"--lora-modules names an adapter {module.name!r}, which is a served model name "
                    "(--served-model-name); give the adapter a name of its own"
                )
            # as vLLM: a base_model_name that is not served here leaves the first served name the parent
            base = module.base_model_name if module.base_model_name in self._base_names else None
            self._served[module.name] = ServedAdapter(
                LoRARequest(module.name, module.path, self._next_id()), base
            )

    # -- the mapping requests read ---------------------------------------------------------

    def __getitem__(self, name: str) -> LoRARequest:
        return self._served[name].lora

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._served))

    def __len__(self) -> int:
        return len(self._served)

    def adapters(self) -> list[ServedAdapter]:
        return list(self._served.values())

    # -- runtime loading and unloading -------------------------------------------------------

    def refusal(self, name: str) -> str | None:
        """Why `name` cannot be loaded now (vLLM's words where vLLM refuses it); None if it can."""
        if name in self._served or name in self._reserved:
            return f"The lora adapter '{name}' has already been loaded."
        if name in self._base_names:
            return f"'{name}' is the name of a served base model; give the adapter a name of its own."
        return None

    def reserve(self, name: str, path: str) -> LoRARequest:
        """The adapter to load as `name`, with the next id; its name stays taken until
        publish() or release(). ValueError with refusal()'s reason."""
        reason = self.refusal(name)
        if reason is not None:
            raise ValueError(reason)
        lora = LoRARequest(name, path, self._next_id())  # its own ValueError for a bad name or path
        self._reserved.add(name)
        return lora

    def publish(self, lora: LoRARequest, base_model_name: str | None = None) -> None:
        """Serve a reserved adapter: requests may name it from now on."""
        self._reserved.discard(lora.name)
        self._served[lora.name] = ServedAdapter(lora, base_model_name)

    def release(self, name: str) -> None:
        """Give up a reservation (the workers refused the adapter)."""
        self._reserved.discard(name)

    def remove(self, name: str) -> LoRARequest | None:
        """Stop serving `name`; the adapter it was, or None when none is served by that name."""
        served = self._served.pop(name, None)
        return None if served is None else served.lora

    def name_of_id(self, lora_id: int) -> str | None:
        return next((name for name, s in self._served.items() if s.lora.id == lora_id), None)

    def _next_id(self) -> int:
        self._last_id += 1
        return self._last_id


def model_card(adapter: ServedAdapter, parent: str, created: int) -> dict[str, Any]:
    """An adapter's /v1/models entry, shaped as vLLM's: its root is its folder, its parent the
    base model it was made for, and it has no context length of its own."""
    lora = adapter.lora
    return {
        "id": lora.name,
        "object": "model",
        "created": created,
        "owned_by": "pdserve",
        "root": lora.path,
        "parent": adapter.base_model_name or parent,
        "max_model_len": None,
        "permission": [model_permission(created)],
    }


def model_permission(created: int) -> dict[str, Any]:
    """vLLM's ModelPermission with its defaults (no one reads it, but clients parse it)."""
    return {
        "id": f"modelperm-{uuid.uuid4().hex}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
