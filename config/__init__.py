"""Settings: what Tether reads from the environment and TOML; imports nothing of Tether's."""

from config.settings import Settings, SettingsError, WebhookConfig, load_settings

__all__ = ["Settings", "SettingsError", "WebhookConfig", "load_settings"]
