"""Shared test infrastructure: what several test modules, tests/conftest.py's fixtures and the
bench/ scripts build on. No fixtures live here (pytest finds them in tests/conftest.py, which
imports their building blocks from here), no tests, and nothing imports pytest or a test
module; no test module imports another.

- settings.py: REPO, TEST_SECRET_KEY, make_settings, and settings_env (the environment that
  hands settings to a child process).
- ports.py: free_port.
- databases.py: Servers (the PostgreSQL and Redis of a session), raw psycopg connections
  (connect), databases created and dropped (create_database, drop_database, with_database,
  libpq), the session template's names and copies, clean_redis for a key prefix.
- api.py: an API instance in process (serve) or listening on loopback (serve_http).
- processes.py: descendants (a supervisor's process tree) and running_worker (a real
  `selfheal worker`).
- services.py: Server / running for the reference decision service and staging runner, and
  their tokens (SIRA_TOKEN, RUNNER_TOKEN).
- personas.py: Persona and make_user (ops users, their bearer tokens and passwords).
- dashboard.py: the ops dashboard through httpx (csrf_of, try_sign_in, sign_in, post_form).
- reads.py: the ops read side from a test: reading (a session) and rows put in place
  (add_incident, add_attempt, add_vote, add_release, add_window).
- plugins.py: signed plugin requests: signed_headers, Plugin, register, heartbeat_body,
  send_heartbeat, HEARTBEAT.
- detection.py: tick (one detection pass) and beat (a heartbeat with threshold telemetry).
- decisions.py: incident (IncidentFacts for the decision client) and DETECTED.
- healing.py: the in-process healing loop harness: healing_settings, Loop, healing_loop,
  add_release, beat, ack, enable_autopatch and the incident / attempt / command readers.
- cli.py: the `selfheal` console script as a subprocess (SELFHEAL, runner, one_json_object).
- control_plane.py: the control plane as processes at the settings given (ControlPlane,
  control_plane_processes: `selfheal api`, `selfheal worker`, the reference services) and
  simulated plugins embedding the real plugin_client (SimulatedPlugin, plugins_running).
- pgbouncer.py: a real PgBouncer in transaction pooling mode as a child process
  (running_pgbouncer, PgBouncer.through / .pool, pgbouncer_unavailable, REQUIRED).
- browser.py: the dashboard in Debian's chromium through Playwright (browser_unavailable,
  REQUIRED, launch, Shots, sign_in, submit, until_shows, text_in).
- fakes.py: fake peers on loopback: FakeControlPlane (plugin_client's control plane, with
  command and agent_options) and Receiver (a webhook receiver).
- faults.py: the fault scenarios of tests/test_faults.py and bench/faults.py (worker_kills,
  api_kills, outage with a private PostgreSQL or Redis: private_postgres, private_redis).
- artifacts.py: ReleaseSigner and the archive builders of the plugin_client tests (PLUGIN,
  canonical, plugin_files, tar_gz, tar_with, zip_bytes, release_folder).
- fuzz.py: schemathesis over the OpenAPI document for tests/test_fuzz_api.py and bench/fuzz.py
  (Fuzzer, PluginSignature, FuzzResult, api_process: a real `selfheal api`).
"""
