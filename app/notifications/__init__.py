"""Notifications (signed webhooks to ops and tenants) and decision-service feedback, both
written to the outbox in the transaction that causes them and delivered, with retries, by
the worker (`delivery.deliver_due`). Their commands (`selfheal notify ...`) are
app/cli/notifications.py.

Kept free of imports on purpose: importing one module of the package (the command line
imports `service` when a `notify` command runs) should not pay for httpx and the delivery
machinery it does not use."""
