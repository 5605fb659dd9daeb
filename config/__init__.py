"""Settings: what Tether reads from the environment and TOML; imports nothing of Tether's."""

from config.settings import Settings, SettingsError, WebhookConfig, load_settings
from config.token import load_or_create_operator_token, read_operator_token

__all__ = [
    "Settings",
    "SettingsError",
    "WebhookConfig",
    "load_or_create_operator_token",
    "load_settings",
    "read_operator_token",
]
