"""The fleet simulator (`selfheal simulate`, `selfheal up --demo`): many simulated plugin
installations, each a real plugin_client.AsyncAgent talking HTTP to the control plane, the
faults a scenario injects into them, the truth of what really happened, and the figures that
compare the two. Imports plugin_client and sim.artifacts, never app/ (the control-plane side
of a run lives in app/simulation/). See docs/simulator.md."""
