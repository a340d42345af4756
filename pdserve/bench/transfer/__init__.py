"""`pdserve bench transfer`: KV-transfer throughput between two processes: a producer
process exports blocks, this process pulls them through a connector, and the bytes per
second of the pulls are printed.

    pdserve bench transfer --connectors TcpConnector NixlConnector --mib 256

A block has the default model's geometry (SmolLM2-135M in bfloat16: 30 layers, 3 KV
heads, head size 64, 16 tokens: 360 KiB) unless the flags say otherwise. A first pull
does the handshake and is not timed; every timed pull moves all blocks of one request,
from start_pull() until poll() reports it, and the last one is checked byte for byte.

On a GPU, `--gpu-table` compares the data paths between two processes sharing the
device, at Llama-3-8B shapes (32 layers, 8 KV heads, head size 128, bf16, 16-token
blocks: 2 MiB a block, 256 MiB for a 2048-token request), against a device-to-device
copy of the same bytes timed in the same process:

    pdserve bench transfer --gpu-table --tokens 2048 8192 --out logs/

Each row runs in a process of its own (UCX reads its environment once): CudaIpcConnector,
NixlConnector under several UCX_TLS settings and with NIXL's progress thread, and raw
NIXL transfers with one descriptor per block or one per layer of a block, READ and
WRITE. "xfer" is the connector's own transfer time (TransferRecord: from the start of
the data movement to its end); "wall" adds the caller's view (start_pull() until poll()
reports it, handshake excluded). Two like-for-like ratios sit beside them: "kernel" is
CudaIpcConnector's copy on CUDA events (ids upload and kernel) against copy_ on CUDA
events, and "copyh" is copy_ timed as xfer is, on host clocks (launch, then wait for its

command.py (flags, entry; torch-free to import), connector_pull.py (a producer process
and timed pulls through a connector), device_copy.py (the device-to-device reference and
the copy kernel's tiling sweep), nixl_raw.py (raw NIXL transfers), gpu_table.py (the
rows of --gpu-table, each in a process of its own, and their table).
"""
