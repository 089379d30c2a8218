"""Subcommands of `maglev`: one module each, discovered by node.cli."""
