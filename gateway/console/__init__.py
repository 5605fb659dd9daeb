"""The operator web console at ``/console`` (see :mod:`gateway.console.routes`)."""

from gateway.console.routes import setup_console

__all__ = ["setup_console"]
