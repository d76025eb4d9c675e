"""Notifications (signed webhooks to ops and tenants) and decision-service feedback, both
written to the outbox in the transaction that causes them and delivered, with retries, by
the worker (`delivery.deliver_due`).

Kept free of imports on purpose: `app.cli` imports `app.notifications.cli` at start-up, and
the command line should not pay for httpx and the delivery machinery it does not use."""
