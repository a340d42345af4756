"""The router's state that every route reads: settings, the served model and its LoRA
adapters, the worker pool, the orchestrator and the metrics. One per app, at
`app.state.router`. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from common.openai_api import ServedModel
from common.output_processor import TokenStrings
from router.admission import AdmissionControl
from router.config import RouterConfig
from router.lora_adapters import LoRAAdapters
from router.lora_updates import LoRAUpdates
from router.metrics import RouterMetrics
from router.orchestrator import Orchestrator
from router.worker_pool import WorkerPool


@dataclass
class RouterContext:
    config: RouterConfig
    served: ServedModel
    pool: WorkerPool
    orchestrator: Orchestrator
    metrics: RouterMetrics
    token_strings: TokenStrings  # token id -> text for logprobs, shared by every request
    created: int  # when the router started, for /v1/models
    admission: AdmissionControl  # generation requests in flight and queued, both bounded
    adapters: LoRAAdapters  # the LoRA adapters served by name (also `served.adapters`)
    lora_updates: LoRAUpdates  # runtime loads and unloads, on every worker
