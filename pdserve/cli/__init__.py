"""The `pdserve` subcommands, one module each."""
