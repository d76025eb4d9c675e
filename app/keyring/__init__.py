"""SELFHEAL_SECRET_KEY rotation: every stored secret (plugin signing secrets, notification
endpoint secrets) sealed again under the current key, while the previous keys
(SELFHEAL_SECRET_KEY_PREVIOUS) keep what is not yet rotated readable. `service.py` holds the
procedure, `repository.py` its SQL; `selfheal secrets rotate-key` (app/cli/secrets.py) runs it."""
