"""Stand-ins for the services selfheal talks to, run as real HTTP servers in end-to-end
tests and demos: the reference decision service ("SIRA") and the staging runner.

They import nothing from app/ on purpose: they play outside services, so they must not share
our schemas and hide a contract mismatch."""
