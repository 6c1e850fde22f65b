"""Webhooks: the journal's events pushed to each configured endpoint, signed per Standard Webhooks,
at least once from a durable per-endpoint outbox that retries on its own schedule; never on
the mail path (docs/webhooks.md)."""
