"""Start a decode worker (`pdserve decode`): continuous batching of the requests routers send
it over ZMQ. A request with kv_transfer_params pulls the prompt blocks its own prefix cache
lacks from the prefill worker they name, while the running sequences keep decoding; a
request without them is prefilled here. Token ids stream back to the router. Example:
pdserve decode --kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}'.
Without --kv-transfer-config it uses NixlConnector where nixl is installed, else TcpConnector.
"""

from common.worker.worker_command import worker_command


def _load_role():  # the role's engine and connectors are imported only when the worker starts
    from decode_worker.role import DECODE_ROLE

    return DECODE_ROLE


register = worker_command("decode", __doc__, _load_role)
