"""The prefill worker: the producer of KV blocks. producer.py tells how it lives (prefill-only
requests, the first token, exporting and leasing the blocks, freeing them on notice or
expiry); role.py is the Role it runs the shared serving loop with; cli.py is `pdserve prefill`."""
