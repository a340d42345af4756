"""The decode worker: the consumer of KV blocks. consumer.py tells how it lives (admitting
requests with kv_transfer_params, the remote-KV wait, pulls of only the missing blocks,
recompute or fail); role.py is the Role it runs the shared serving loop with; cli.py is
`pdserve decode`."""
