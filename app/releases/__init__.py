"""Signed plugin releases: the signing key and statements (signing.py), the plugin_releases
table (repository.py), adding releases (service.py) and their commands (cli.py).

Deliberately empty of imports: `app.cli` loads `app.releases.cli` at start-up, and a plugin
client may embed `signing` alone."""
