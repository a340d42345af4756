"""Benchmarks behind `pdserve bench`: kernels (kernels.py) and the inputs they run on."""
