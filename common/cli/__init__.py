"""The `pdserve` command line: main.py dispatches to one module per subcommand.

Kept free of imports so that loading one subcommand loads nothing else.
"""
