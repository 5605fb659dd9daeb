"""Channel adapters (Telegram, Slack, webhooks, HTTP chat): inbound normalisation and outbound
delivery. They know their platform and the ledger, nothing about workers.

The channels arrive with the channels issue; this package holds no adapter yet.
"""
