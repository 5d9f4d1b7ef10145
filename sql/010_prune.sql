-- Table growth: delete finished batches, with their documents, once they are
-- older than a cutoff, in chunks small enough never to hold up the listener.
--
--     listener prune --older-than 30d           (the command line)
--     CALL listener_prune('30 days');           (psql; commits every chunk)
--
-- Only terminal batches whose completed_at is before the cutoff go. Rows are
-- taken with FOR UPDATE SKIP LOCKED: a batch someone is requeueing or
-- inserting into is left for the next run, and nothing the listener works on
-- (open batches, their documents) is ever locked. The completed documents
-- deleted stay accounted for in listener_usage_ledger, so listener_check()
-- still compares usage exactly.
--
-- Updates and HOT (measured with pg_stat_user_tables, PostgreSQL 15, 60,000
-- documents): claim and finish change documents.status, on which every
-- partial index of documents depends, so they can never be HOT. No index
-- covers lease_expires_at, so a heartbeat could be, given room on its page:
-- at fillfactor 100 none was (0 of 60,000), at 90 19% were. Heartbeats come
-- once per lease/3 per document in flight, a small share of all updates, so
-- documents keeps fillfactor 100 rather than leave a tenth of every page of
-- the finished history empty. A batch's counter updates touch no indexed
-- column and are HOT already (984 of the 1,000 possible at fillfactor 100,
-- 998 at 90): not worth a table option either. The index below adds no
-- non-HOT update: reaching completed_at also changes status.


-- Finished batches by age, for pruning: the open ones never enter it.
CREATE INDEX IF NOT EXISTS extraction_batches_finished_idx
    ON extraction_batches (completed_at)
    WHERE completed_at IS NOT NULL;

-- Like the counting triggers (008): deletes under session_replication_role =
-- replica must still reach the usage ledger, or listener_check() would see
-- deleted completed documents as usage charged for nothing.
ALTER TABLE documents ENABLE ALWAYS TRIGGER documents_ledger_deleted;
ALTER TABLE user_usage ENABLE ALWAYS TRIGGER user_usage_ledger_decreased;
ALTER TABLE user_usage ENABLE ALWAYS TRIGGER user_usage_ledger_deleted;


-- Delete one chunk: up to p_max_batches finished batches that completed
-- before p_cutoff, oldest first, and stop adding batches once their
-- documents reach p_max_documents (one batch at least, whatever its size).
-- Returns what was deleted; 0 batches when nothing unlocked is left.
CREATE OR REPLACE FUNCTION listener_prune_chunk(
    p_cutoff timestamptz,
    p_max_batches integer DEFAULT 1000,
    p_max_documents integer DEFAULT 100000
) RETURNS TABLE (batches integer, documents bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_ids uuid[];
BEGIN
    IF p_cutoff IS NULL OR p_cutoff > now() OR p_max_batches IS NULL
       OR p_max_batches < 1 OR p_max_documents IS NULL OR p_max_documents < 1 THEN
        RAISE EXCEPTION 'listener_prune_chunk needs a cutoff in the past, '
            'p_max_batches >= 1 and p_max_documents >= 1'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    WITH locked AS (
        SELECT b.id, b.completed_at, b.total_documents
        FROM extraction_batches b
        WHERE b.completed_at < p_cutoff
          AND b.status IN ('completed', 'partially_completed', 'failed', 'cancelled')
        ORDER BY b.completed_at
        LIMIT p_max_batches
        FOR UPDATE SKIP LOCKED
    ),
    running AS (
        SELECT l.id,
               sum(l.total_documents) OVER (ORDER BY l.completed_at, l.id)
                   - l.total_documents AS before_this
        FROM locked l
    )
    SELECT array_agg(r.id) INTO v_ids
    FROM running r
    WHERE r.before_this < p_max_documents;

    -- requeue_batch locks a batch's documents before the batch: leave a batch
    -- any of whose documents someone holds rather than wait (and deadlock).
    IF v_ids IS NOT NULL THEN
        WITH held AS (
            SELECT d.batch_id
            FROM documents d
            WHERE d.batch_id = ANY (v_ids)
            FOR UPDATE SKIP LOCKED
        ),
        counted AS (
            SELECT h.batch_id, count(*) AS n FROM held h GROUP BY h.batch_id
        )
        SELECT array_agg(i.id) INTO v_ids
        FROM unnest(v_ids) AS i (id)
        LEFT JOIN counted c ON c.batch_id = i.id
        WHERE coalesce(c.n, 0) = (
            SELECT count(*) FROM documents d WHERE d.batch_id = i.id
        );
    END IF;

    IF v_ids IS NULL THEN
        batches := 0;
        documents := 0;
        RETURN NEXT;
        RETURN;
    END IF;

    -- The documents first, so their count is known; the batches then have
    -- none left to cascade to.
    WITH gone AS (
        DELETE FROM documents d WHERE d.batch_id = ANY (v_ids) RETURNING 1
    )
    SELECT count(*) INTO documents FROM gone;
    DELETE FROM extraction_batches b WHERE b.id = ANY (v_ids);
    GET DIAGNOSTICS batches = ROW_COUNT;
    RETURN NEXT;
END;
$$;


-- Delete every finished batch older than p_older_than, one chunk per
-- transaction. CALL it outside a transaction block (psql's default): it
-- commits after each chunk, so locks and the WAL of one chunk are released
-- before the next. Reports the totals in its INOUT arguments.
CREATE OR REPLACE PROCEDURE listener_prune(
    p_older_than interval,
    p_max_batches integer DEFAULT 1000,
    INOUT deleted_batches bigint DEFAULT 0,
    INOUT deleted_documents bigint DEFAULT 0
)
LANGUAGE plpgsql AS $$
DECLARE
    v_cutoff timestamptz;
    v_chunk record;
BEGIN
    IF p_older_than IS NULL OR p_older_than < interval '0' THEN
        RAISE EXCEPTION 'listener_prune needs an age >= 0, not %',
            coalesce(p_older_than::text, 'null')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_cutoff := now() - p_older_than;
    deleted_batches := 0;
    deleted_documents := 0;
    LOOP
        SELECT * INTO v_chunk FROM listener_prune_chunk(v_cutoff, p_max_batches);
        EXIT WHEN v_chunk.batches = 0;
        deleted_batches := deleted_batches + v_chunk.batches;
        deleted_documents := deleted_documents + v_chunk.documents;
        COMMIT;
    END LOOP;
END;
$$;
