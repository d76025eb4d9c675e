"""Real plugins (issue 7): a known-good version per installation, and artifacts served by the
control plane.

- `merchant_plugins.known_good_version` / `known_good_at`: the last version that was healthy
  for a whole health window. Rollbacks target it, never a version that has just failed, and
  regression incidents name it.
- `merchant_plugins.good_since`: the start of the installation's current healthy streak on its
  current version (NULL while an incident is open). Triggers on plugin_incidents keep it
  true for every way an incident opens or closes (detection, the healing loop, ops, psql);
  heartbeat ingest restarts it when the version changes. The worker promotes the version to
  known-good once the streak covers a whole health window and a heartbeat came after it; the
  partial index holds only the installations waiting for that, so the tick reads no others.
- `plugin_release_artifacts`: the bytes of a release, so that every API process can serve them
  to signed plugin requests (`GET /api/plugins/releases/{plugin}/{version}/artifact`) and
  the staging runner can fetch them. A CHECK ties the stored sha256 to the bytes.

Revision ID: 0008_known_good_and_artifacts
Revises: 0007_kill_switch_holds_commands
Create Date: 2026-12-04 16:00:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008_known_good_and_artifacts"
down_revision: str | None = "0007_kill_switch_holds_commands"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLOSED = "('resolved', 'rolled_back', 'failed', 'cancelled', 'ignored')"

UPGRADE = f"""
ALTER TABLE merchant_plugins
    ADD COLUMN known_good_version text,
    ADD COLUMN known_good_at timestamptz,
    ADD COLUMN good_since timestamptz;

UPDATE merchant_plugins m SET good_since = COALESCE(m.version_changed_at, m.created_at)
WHERE NOT EXISTS (SELECT 1 FROM plugin_incidents i
                  WHERE i.installation_id = m.id AND i.status NOT IN {CLOSED});

-- A new installation starts its streak at registration.
ALTER TABLE merchant_plugins ALTER COLUMN good_since SET DEFAULT now();

CREATE INDEX ix_merchant_plugins_known_good_due ON merchant_plugins (good_since)
WHERE good_since IS NOT NULL AND known_good_version IS DISTINCT FROM plugin_version;

CREATE FUNCTION selfheal_incident_opened_ends_good_streak() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE merchant_plugins SET good_since = NULL
    WHERE id = NEW.installation_id AND good_since IS NOT NULL;
    RETURN NULL;
END $$;
CREATE TRIGGER plugin_incidents_opened_ends_good_streak
AFTER INSERT ON plugin_incidents
FOR EACH ROW WHEN (NEW.installation_id IS NOT NULL AND NEW.status NOT IN {CLOSED})
EXECUTE FUNCTION selfheal_incident_opened_ends_good_streak();
ALTER TABLE plugin_incidents ENABLE ALWAYS TRIGGER plugin_incidents_opened_ends_good_streak;

CREATE FUNCTION selfheal_incident_closed_starts_good_streak() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE merchant_plugins m SET good_since = now()
    WHERE m.id = NEW.installation_id
      AND NOT EXISTS (SELECT 1 FROM plugin_incidents i
                      WHERE i.installation_id = NEW.installation_id
                        AND i.status NOT IN {CLOSED});
    RETURN NULL;
END $$;
CREATE TRIGGER plugin_incidents_closed_starts_good_streak
AFTER UPDATE OF status ON plugin_incidents
FOR EACH ROW WHEN (NEW.installation_id IS NOT NULL
                   AND OLD.status NOT IN {CLOSED} AND NEW.status IN {CLOSED})
EXECUTE FUNCTION selfheal_incident_closed_starts_good_streak();
ALTER TABLE plugin_incidents ENABLE ALWAYS TRIGGER plugin_incidents_closed_starts_good_streak;

CREATE TABLE plugin_release_artifacts (
    plugin_name text NOT NULL,
    version text NOT NULL,
    sha256 text NOT NULL,
    size_bytes bigint NOT NULL,
    content bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_plugin_release_artifacts PRIMARY KEY (plugin_name, version),
    CONSTRAINT fk_plugin_release_artifacts_plugin_name_plugin_releases FOREIGN KEY (plugin_name, version)
        REFERENCES plugin_releases (plugin_name, version),
    CONSTRAINT ck_plugin_release_artifacts_sha256_of_content
        CHECK (sha256 = encode(sha256(content), 'hex')),
    CONSTRAINT ck_plugin_release_artifacts_size CHECK (size_bytes = octet_length(content))
);
"""

DOWNGRADE = """
DROP TABLE plugin_release_artifacts;
DROP TRIGGER plugin_incidents_closed_starts_good_streak ON plugin_incidents;
DROP FUNCTION selfheal_incident_closed_starts_good_streak();
DROP TRIGGER plugin_incidents_opened_ends_good_streak ON plugin_incidents;
DROP FUNCTION selfheal_incident_opened_ends_good_streak();
DROP INDEX ix_merchant_plugins_known_good_due;
ALTER TABLE merchant_plugins
    DROP COLUMN good_since,
    DROP COLUMN known_good_at,
    DROP COLUMN known_good_version;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
