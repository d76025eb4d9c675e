"""Seals over the history (issue 10): a chain of HMACs, under a key the database never holds,
over every row of `audit_log` and of the attempt event log; its head exported outside the
database; `selfheal audit verify` recomputes it and names the first row that no longer matches.

- seals.py: the key, a row's canonical bytes, the chain's MACs, the signed head (no I/O)
- repository.py: the SQL (reading the logs, appending seals)
- service.py: sealing (the worker's `seal` tick, `selfheal audit seal`), exporting the head,
  verifying
"""
