"""Signed plugin releases: the signing key and statements (signing.py), the plugin_releases
table (repository.py) and adding releases (service.py). Their commands (`selfheal keys ...`,
`selfheal release ...`) are app/cli/releases.py.

Deliberately empty of imports: the command line loads `app.releases.signing` at start-up and
should not pay for the service's SQLAlchemy, and a plugin client may embed `signing` alone."""
