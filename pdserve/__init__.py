"""pdserve's one door: the `pdserve` command line (cli/) and the benchmarks (bench/).

The only package that may import every other one; nothing imports it. Kept free of
imports so that loading one subcommand loads nothing else.
"""
