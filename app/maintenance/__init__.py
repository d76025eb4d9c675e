"""Maintenance windows and snoozes: while one is open, detection opens no new incident for its
tenant or installation (the check is detection's query, app/incidents/repository.py)."""
