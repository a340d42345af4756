"""Tensor parallelism: the shard plan, the process group, the ranks' processes and their steps.

shard_plan is torch-free (the CLI checks --tensor-parallel-size against a model with it);
the other modules need torch.
"""
