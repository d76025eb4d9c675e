"""`selfheal simulate` and `selfheal up --demo`: the control-plane side of a fleet simulation
(processes, registration, releases, policy, outcomes read from PostgreSQL). The fleet itself
is sim/fleet/. See docs/simulator.md."""
