"""Built-in agents (the default ``TETHER_AGENT_MODULES``): importing this registers them."""

from worker.agents import demo, llm

__all__ = ["demo", "llm"]
