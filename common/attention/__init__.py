"""Paged attention: the metadata a step carries and the backends that compute it.

The KV cache is one tensor per worker, [num_blocks, num_layers, 2, num_kv_heads,
block_size, head_dim] (DESIGN.md). A backend writes a step's new K/V through a slot
mapping, then attends each packed query token causally to its request's context.
"""
