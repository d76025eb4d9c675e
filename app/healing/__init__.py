"""The healing loop: decide, gate, stage, apply, verify, roll back (engine.py)."""
