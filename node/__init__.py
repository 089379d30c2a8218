"""maglev-lb node: config models, Maglev table, controller, HTTP API and CLI."""

__version__ = "0.1.0"
