-- The consistency checker: listener_check() returns one row per violation of
-- the invariants the processing functions keep. `listener check` prints them;
-- from psql: SELECT * FROM listener_check();
--
-- Usage is compared exactly: a user's documents_processed must equal the
-- documents of theirs that are completed now, plus the completed ones deleted
-- since (listener_usage_ledger.completed_deleted, kept by a trigger, so prune
-- and an application's own deletes leave the history accountable), plus the
-- changes made to usage by hand that can be told from charges
-- (listener_usage_ledger.usage_adjusted: every decrease, e.g. a monthly reset,
-- and every deleted usage row). A charge only ever raises usage, so a raise by
-- hand cannot be told from one: it shows as usage_overcharged, which the
-- caller can silence with p_report_usage_excess => false. TRUNCATE fires no
-- row or delete trigger: truncating documents or user_usage leaves the ledger
-- behind, and it must be truncated with them.


CREATE TABLE IF NOT EXISTS listener_usage_ledger (
    user_id text PRIMARY KEY,
    completed_deleted bigint NOT NULL DEFAULT 0,
    usage_adjusted bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- A database migrated before this file may hold history the ledger never saw
-- (documents deleted by hand, usage edited): take what is there now as the
-- starting point, once, when the ledger is new.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM listener_usage_ledger)
       AND NOT EXISTS (
           SELECT 1 FROM pg_trigger
           WHERE tgname = 'documents_ledger_deleted'
             AND tgrelid = 'documents'::regclass
       ) THEN
        INSERT INTO listener_usage_ledger (user_id, usage_adjusted)
        SELECT coalesce(u.user_id, c.user_id),
               coalesce(u.documents_processed, 0) - coalesce(c.n, 0)
        FROM user_usage u
        FULL JOIN (
            SELECT d.user_id, count(*) AS n
            FROM documents d
            WHERE d.status = 'completed'
            GROUP BY d.user_id
        ) AS c ON c.user_id = u.user_id
        WHERE coalesce(u.documents_processed, 0) <> coalesce(c.n, 0);
    END IF;
END;
$$;


-- Count the completed documents that a statement deleted into the ledger.
CREATE OR REPLACE FUNCTION documents_ledger_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    INSERT INTO listener_usage_ledger AS l (user_id, completed_deleted)
    SELECT o.user_id, count(*)
    FROM old_documents o
    WHERE o.status = 'completed'
    GROUP BY o.user_id
    ORDER BY o.user_id
    ON CONFLICT (user_id) DO UPDATE
    SET completed_deleted = l.completed_deleted + excluded.completed_deleted,
        updated_at = now();
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS documents_ledger_deleted ON documents;
CREATE TRIGGER documents_ledger_deleted
    AFTER DELETE ON documents
    REFERENCING OLD TABLE AS old_documents
    FOR EACH STATEMENT EXECUTE FUNCTION documents_ledger_deleted();


-- Record a decrease of usage (never a charge) or a deleted usage row.
CREATE OR REPLACE FUNCTION user_usage_ledger_adjusted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_delta bigint;
BEGIN
    IF TG_OP = 'DELETE' THEN
        v_delta := -OLD.documents_processed;
    ELSE
        v_delta := NEW.documents_processed - OLD.documents_processed;
    END IF;
    INSERT INTO listener_usage_ledger AS l (user_id, usage_adjusted)
    VALUES (OLD.user_id, v_delta)
    ON CONFLICT (user_id) DO UPDATE
    SET usage_adjusted = l.usage_adjusted + excluded.usage_adjusted,
        updated_at = now();
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS user_usage_ledger_decreased ON user_usage;
CREATE TRIGGER user_usage_ledger_decreased
    AFTER UPDATE OF documents_processed ON user_usage
    FOR EACH ROW
    WHEN (NEW.documents_processed < OLD.documents_processed)
    EXECUTE FUNCTION user_usage_ledger_adjusted();

DROP TRIGGER IF EXISTS user_usage_ledger_deleted ON user_usage;
CREATE TRIGGER user_usage_ledger_deleted
    AFTER DELETE ON user_usage
    FOR EACH ROW
    WHEN (OLD.documents_processed <> 0)
    EXECUTE FUNCTION user_usage_ledger_adjusted();


-- Return one row per violation, in one snapshot (a STABLE function sees the
-- snapshot of the query that calls it), so concurrent work cannot make the
-- counts of two tables disagree in the report. Invariants:
--   batch_counts               total/completed/failed counters differ from the
--                              batch's documents
--   terminal_batch_unfinished  a terminal batch holds uploaded or processing
--                              documents
--   open_batch_finished        a batch not yet terminal has documents, all of
--                              them completed or failed
--   completed_at_while_open    completed_at is set on a batch not yet terminal
--   completed_at_missing       a terminal batch has no completed_at
--   lease_expired              a processing document's lease expired more than
--                              p_lease_grace_seconds ago: its worker is gone and
--                              no sweep has recovered it
--   attempts_exceeded          a document has started more than p_max_attempts tries
--   usage_undercharged         a user was charged for fewer documents than they
--                              have completed (see the ledger note above)
--   usage_overcharged          a user was charged for more (reported when
--                              p_report_usage_excess)
-- Reads every batch and document: its cost follows the history kept, so run
-- it as a check, not in a loop.
CREATE OR REPLACE FUNCTION listener_check(
    p_max_attempts integer DEFAULT 3,
    p_lease_grace_seconds double precision DEFAULT 120,
    p_report_usage_excess boolean DEFAULT true
) RETURNS TABLE (
    invariant text,
    batch_id uuid,
    document_id uuid,
    user_id text,
    detail text
)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_max_attempts IS NULL OR p_max_attempts < 1 THEN
        RAISE EXCEPTION 'listener_check needs p_max_attempts >= 1, not %',
            coalesce(p_max_attempts::text, 'null')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_lease_grace_seconds IS NULL OR p_lease_grace_seconds < 0
       OR p_lease_grace_seconds IN ('NaN', 'infinity') THEN
        RAISE EXCEPTION 'listener_check needs p_lease_grace_seconds >= 0, not %',
            coalesce(p_lease_grace_seconds::text, 'null')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_report_usage_excess IS NULL THEN
        RAISE EXCEPTION 'listener_check needs p_report_usage_excess true or false'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    RETURN QUERY
    WITH counted AS (
        SELECT d.batch_id,
               count(*) AS total,
               count(*) FILTER (WHERE d.status = 'completed') AS completed,
               count(*) FILTER (WHERE d.status = 'failed') AS failed,
               count(*) FILTER (WHERE d.status IN ('uploaded', 'processing'))
                   AS unfinished
        FROM documents d
        GROUP BY d.batch_id
    ),
    batches AS (
        SELECT b.id, b.user_id, b.status, b.total_documents, b.completed_count,
               b.failed_count, b.completed_at,
               b.status IN ('completed', 'partially_completed', 'failed', 'cancelled')
                   AS terminal,
               coalesce(c.total, 0) AS total,
               coalesce(c.completed, 0) AS completed,
               coalesce(c.failed, 0) AS failed,
               coalesce(c.unfinished, 0) AS unfinished
        FROM extraction_batches b
        LEFT JOIN counted c ON c.batch_id = b.id
    ),
    usage AS (
        SELECT k.user_id,
               coalesce(u.documents_processed, 0)::bigint AS charged,
               coalesce(c.n, 0) + coalesce(l.completed_deleted, 0)
                   + coalesce(l.usage_adjusted, 0) AS expected,
               coalesce(c.n, 0) AS completed_now,
               coalesce(l.completed_deleted, 0) AS completed_deleted,
               coalesce(l.usage_adjusted, 0) AS usage_adjusted
        FROM (
            SELECT u.user_id FROM user_usage u
            UNION
            SELECT d.user_id FROM documents d WHERE d.status = 'completed'
            UNION
            SELECT l.user_id FROM listener_usage_ledger l
        ) AS k
        LEFT JOIN user_usage u ON u.user_id = k.user_id
        LEFT JOIN listener_usage_ledger l ON l.user_id = k.user_id
        LEFT JOIN (
            SELECT d.user_id, count(*) AS n
            FROM documents d
            WHERE d.status = 'completed'
            GROUP BY d.user_id
        ) AS c ON c.user_id = k.user_id
    ),
    findings AS (
        SELECT 'batch_counts' AS invariant, b.id AS batch_id,
               NULL::uuid AS document_id, b.user_id,
               format('batch %s counts total %s, completed %s, failed %s; its '
                      'documents: total %s, completed %s, failed %s',
                      b.status, b.total_documents, b.completed_count,
                      b.failed_count, b.total, b.completed, b.failed) AS detail
        FROM batches b
        WHERE (b.total_documents, b.completed_count, b.failed_count)
              IS DISTINCT FROM (b.total, b.completed, b.failed)

        UNION ALL
        SELECT 'terminal_batch_unfinished', b.id, NULL, b.user_id,
               format('batch is %s but %s of its %s documents are unfinished',
                      b.status, b.unfinished, b.total)
        FROM batches b
        WHERE b.terminal AND b.unfinished > 0

        UNION ALL
        SELECT 'open_batch_finished', b.id, NULL, b.user_id,
               format('batch is %s but all %s of its documents are finished '
                      '(%s completed, %s failed)',
                      b.status, b.total, b.completed, b.failed)
        FROM batches b
        WHERE NOT b.terminal AND b.total > 0 AND b.unfinished = 0

        UNION ALL
        SELECT 'completed_at_while_open', b.id, NULL, b.user_id,
               format('batch is %s but completed_at is %s', b.status, b.completed_at)
        FROM batches b
        WHERE NOT b.terminal AND b.completed_at IS NOT NULL

        UNION ALL
        SELECT 'completed_at_missing', b.id, NULL, b.user_id,
               format('batch is %s but completed_at is null', b.status)
        FROM batches b
        WHERE b.terminal AND b.completed_at IS NULL

        UNION ALL
        SELECT 'lease_expired', d.batch_id, d.id, d.user_id,
               format('processing on attempt %s by worker %s, whose lease expired '
                      '%s s ago (grace %s s)',
                      d.attempts, d.lease_owner,
                      round(extract(epoch FROM now() - d.lease_expires_at)::numeric, 1),
                      p_lease_grace_seconds)
        FROM documents d
        WHERE d.status = 'processing'
          AND d.lease_expires_at
              < now() - make_interval(secs => p_lease_grace_seconds)

        UNION ALL
        SELECT 'attempts_exceeded', d.batch_id, d.id, d.user_id,
               format('document is %s after %s attempts, more than the maximum of %s',
                      d.status, d.attempts, p_max_attempts)
        FROM documents d
        WHERE d.attempts > p_max_attempts

        UNION ALL
        SELECT CASE WHEN u.charged < u.expected THEN 'usage_undercharged'
                    ELSE 'usage_overcharged' END,
               NULL, NULL, u.user_id,
               format('charged %s documents, expected %s (%s completed now, %s '
                      'completed and deleted, %s adjusted by hand)',
                      u.charged, u.expected, u.completed_now, u.completed_deleted,
                      u.usage_adjusted)
        FROM usage u
        WHERE u.charged < u.expected
           OR (p_report_usage_excess AND u.charged > u.expected)
    )
    SELECT f.invariant, f.batch_id, f.document_id, f.user_id, f.detail
    FROM findings f
    ORDER BY f.invariant, f.user_id, f.batch_id, f.document_id;
END;
$$;


-- Functions that run with their owner's rights resolve names in this schema
-- only, never in one a caller controls.
DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION documents_ledger_deleted() SET search_path = %I, pg_temp',
        current_schema());
    EXECUTE format(
        'ALTER FUNCTION user_usage_ledger_adjusted() SET search_path = %I, pg_temp',
        current_schema());
END;
$$;
