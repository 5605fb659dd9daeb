"""The aiohttp app: channel endpoints, operator API, console, health. Imports ledger and config;
never imports worker; nothing imports gateway except the `tether` composition root."""

from gateway.app import create_app

__all__ = ["create_app"]
