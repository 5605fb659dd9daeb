"""Built-in agents (the default ``TETHER_AGENT_MODULES``): importing this registers them."""

from worker.agents import demo

__all__ = ["demo"]
