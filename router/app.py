"""The router's FastAPI application: the OpenAI API in front of the workers.

    served = load_served_model(ModelSettings(model=...))     # router.model_info
    app = create_app(RouterConfig(decode_workers=[...]), served)
    uvicorn.run(app, ...)                                     # or `pdserve router`

The app's lifespan connects to the workers (router.worker_pool) and disconnects on
shutdown. Routes live in router/routes/, one module per API surface; the request flow
behind them in router/orchestrator.py and router/completion_run.py. Importing this
module never imports torch (a test checks it): the router must start fast on machines
without GPU libraries.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from common.openai_api import ServedModel
from common.output_processor import TokenStrings
from router.admission import AdmissionControl, AdmissionLimits, decode_capacity
from router.config import RouterConfig
from router.context import RouterContext
from router.dependencies import endpoint_access
from router.errors import install_error_handlers
from router.http_limits import HttpLimits
from router.lora_adapters import LoRAAdapters
from router.lora_updates import LoRAUpdates
from router.metrics import RouterMetrics, WorkerPoolCollector
from router.orchestrator import Orchestrator
from router.request_id import RequestIdHeaders
from router.routes import chat, completions, health, lora_adapters, metrics, models, tokenize
from router.routes.openapi_schema import install_openapi
from router.worker_pool import WorkerPool

logger = logging.getLogger(__name__)


def create_app(config: RouterConfig, served: ServedModel) -> FastAPI:
    """The router app for `config`'s workers, serving `served` (and, with --enable-lora, the
    adapters of --lora-modules under their names); ValueError on a bad config."""
    config.validate()
    lora = config.lora
    adapters = LoRAAdapters(lora.lora_modules if lora.enable_lora else (), served.names)
    served = dataclasses.replace(served, adapters=adapters)  # requests may name an adapter
    router_metrics = RouterMetrics(served.name, served.max_model_len)
    pool = WorkerPool(config, router_metrics)
    router_metrics.add_collector(WorkerPoolCollector(pool))
    context = RouterContext(
        config=config,
        served=served,
        pool=pool,
        orchestrator=Orchestrator(pool, config, router_metrics),
        metrics=router_metrics,
        token_strings=TokenStrings(served.tokenizer),
        created=int(time.time()),
        admission=AdmissionControl(
            AdmissionLimits(
                config.max_concurrent_requests, config.max_queued_requests, config.max_queue_wait_s
            ),
            capacity=decode_capacity(pool),
            metrics=router_metrics,
        ),
        adapters=adapters,
        lora_updates=LoRAUpdates(pool, adapters, config.worker_reply_timeout_s),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(
        title="pdserve router",
        version=health.router_version(),
        lifespan=lifespan,
        dependencies=[Depends(endpoint_access)],  # API key and endpoint exposure (docs/security.md)
    )
    app.state.router = context
    install_error_handlers(app)
    install_openapi(app, config)  # request bodies and error answers documented
    for module in (completions, chat, models, health, metrics, tokenize):
        app.include_router(module.router)
    if config.allow_runtime_lora_updating:  # as vLLM, the routes do not exist otherwise (404)
        logger.warning(
            "LoRA adapters may be loaded and unloaded at run time (/v1/load_lora_adapter, "
            "/v1/unload_lora_adapter); any client with an API key can make the workers read a folder"
        )
        app.include_router(lora_adapters.router)
    # outermost last: limits run before anything reads the request
    app.add_middleware(RequestIdHeaders, always=config.enable_request_id_headers)
    app.add_middleware(
        HttpLimits, max_event_size=config.max_event_size, max_header_count=config.max_header_count
    )
    return app
