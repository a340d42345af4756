"""Start a prefill worker (`pdserve prefill`): it runs chunked prefill for the prompts routers
send it over ZMQ, answers each with its first token and the kv_transfer_params a decode
worker pulls the KV blocks with, and holds the blocks until then (or until their lease
runs out). Example: pdserve prefill --kv-transfer-config
'{"kv_connector":"NixlConnector","kv_role":"kv_producer"}'. Without --kv-transfer-config it
uses NixlConnector where nixl is installed, else TcpConnector.
"""

from common.worker.worker_command import worker_command


def _load_role():  # the role's engine and connectors are imported only when the worker starts
    from prefill_worker.role import PREFILL_ROLE

    return PREFILL_ROLE


register = worker_command("prefill", __doc__, _load_role)
