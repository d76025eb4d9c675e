-- The outbox due index with and without dead rows (issue 11, item 4; migration 0018).
-- Run on a scratch database migrated to head (it writes 200,000 outbox rows, and leaves the
-- index as migration 0018 defines it):
--   createdb scratch && DATABASE_URL=postgresql://.../scratch selfheal migrate
--   psql -d scratch -f bench/outbox_due_index.sql
-- Prints the index size and the due query's plan with dead rows left out (0018), then the same
-- with the index as it was before (dead rows in it).
INSERT INTO outbox (kind, topic, payload, attempts, next_attempt_at, dead_at)
SELECT 'notification', 'escalated', '{}'::jsonb, 12, now() - interval '1 day',
       now() - interval '1 hour'
FROM generate_series(1, 200000);
INSERT INTO outbox (kind, topic, payload)
SELECT 'notification', 'escalated', '{}'::jsonb FROM generate_series(1, 20);
VACUUM ANALYZE outbox;

\set due 'SELECT id FROM outbox WHERE delivered_at IS NULL AND dead_at IS NULL AND next_attempt_at <= now() AND (false OR kind = ''notification'') ORDER BY next_attempt_at, id LIMIT 100 FOR UPDATE SKIP LOCKED'

SELECT pg_size_pretty(pg_relation_size('ix_outbox_due')) AS index_without_dead_rows;
EXPLAIN (ANALYZE, BUFFERS, TIMING OFF, SUMMARY OFF) :due;

BEGIN;
DROP INDEX ix_outbox_due;
CREATE INDEX ix_outbox_due ON outbox (next_attempt_at) WHERE delivered_at IS NULL;
ANALYZE outbox;
SELECT pg_size_pretty(pg_relation_size('ix_outbox_due')) AS index_with_dead_rows;
EXPLAIN (ANALYZE, BUFFERS, TIMING OFF, SUMMARY OFF) :due;
ROLLBACK;
