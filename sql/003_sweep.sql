-- Recovery of missed and abandoned work, for `listener sweep`, the listener's
-- periodic sweep and psql. Every function here finds its work from the tables
-- alone and skips rows another sweep has locked, so sweeps may overlap.


-- Put documents whose lease expired (their worker died or was cut off) back
-- to uploaded, or fail them once p_max_attempts tries have started, with an
-- error that says the worker was lost. Returns how many of each.
CREATE OR REPLACE FUNCTION recover_expired_leases(p_max_attempts integer DEFAULT 3)
RETURNS TABLE (requeued integer, failed integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_batch_ids uuid[];
    v_failed integer[];
    v_requeued integer;
    v_failed_total integer;
BEGIN
    IF p_max_attempts IS NULL OR p_max_attempts < 1 THEN
        RAISE EXCEPTION 'recover_expired_leases needs p_max_attempts >= 1, not %',
            coalesce(p_max_attempts::text, 'null')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    WITH expired AS (
        SELECT d.id
        FROM documents d
        WHERE d.status = 'processing' AND d.lease_expires_at < now()
        ORDER BY d.id
        FOR NO KEY UPDATE SKIP LOCKED
    ),
    recovered AS (
        UPDATE documents d
        SET status = CASE WHEN d.attempts >= p_max_attempts THEN 'failed'
                          ELSE 'uploaded' END,
            error = format('worker %s was lost (lease expired) on attempt %s of %s',
                           d.lease_owner, d.attempts, p_max_attempts),
            processed_at = CASE WHEN d.attempts >= p_max_attempts THEN now() END,
            available_at = now(),
            lease_owner = NULL,
            lease_token = NULL,
            lease_expires_at = NULL,
            updated_at = now()
        FROM expired e
        WHERE d.id = e.id
        RETURNING d.batch_id, d.status
    ),
    per_batch AS (
        SELECT r.batch_id,
               count(*) FILTER (WHERE r.status = 'failed')::integer AS failed,
               count(*) FILTER (WHERE r.status = 'uploaded')::integer AS requeued
        FROM recovered r
        GROUP BY r.batch_id
    )
    SELECT array_agg(p.batch_id) FILTER (WHERE p.failed > 0),
           array_agg(p.failed) FILTER (WHERE p.failed > 0),
           coalesce(sum(p.requeued), 0)::integer,
           coalesce(sum(p.failed), 0)::integer
    INTO v_batch_ids, v_failed, v_requeued, v_failed_total
    FROM per_batch p;

    IF v_batch_ids IS NOT NULL THEN
        PERFORM extraction_batches_add_outcomes(
            v_batch_ids, array_fill(0, ARRAY[cardinality(v_batch_ids)]), v_failed);
    END IF;

    requeued := v_requeued;
    failed := v_failed_total;
    RETURN NEXT;
END;
$$;


-- Close open batches whose documents are all terminal but whose status is not
-- (counters changed by hand, a function interrupted by a bug): recount their
-- documents and give them the terminal status the counts call for. Returns the
-- number of batches closed.
CREATE OR REPLACE FUNCTION repair_batches() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_batch record;
    v_closed integer := 0;
BEGIN
    FOR v_batch IN
        SELECT b.id
        FROM extraction_batches b
        WHERE b.status IN ('queued', 'processing')
          AND b.total_documents > 0
          AND NOT EXISTS (
              SELECT 1 FROM documents d
              WHERE d.batch_id = b.id AND d.status IN ('uploaded', 'processing')
          )
        ORDER BY b.id
    LOOP
        -- Under the batch lock no document can be added, requeued or claimed.
        PERFORM 1 FROM extraction_batches b
        WHERE b.id = v_batch.id AND b.status IN ('queued', 'processing')
        FOR NO KEY UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;

        CONTINUE WHEN EXISTS (
            SELECT 1 FROM documents d
            WHERE d.batch_id = v_batch.id AND d.status IN ('uploaded', 'processing')
        );

        WITH counted AS (
            SELECT count(*)::integer AS total,
                   count(*) FILTER (WHERE d.status = 'completed')::integer AS completed,
                   count(*) FILTER (WHERE d.status = 'failed')::integer AS failed
            FROM documents d
            WHERE d.batch_id = v_batch.id
        )
        UPDATE extraction_batches b
        SET total_documents = c.total,
            completed_count = c.completed,
            failed_count = c.failed,
            status = CASE
                WHEN c.failed = 0 AND c.total > 0 THEN 'completed'
                WHEN c.completed = 0 THEN 'failed'
                ELSE 'partially_completed'
            END,
            error = CASE
                WHEN c.total = 0 THEN 'batch has no documents'
                WHEN c.completed = 0 THEN format('all %s documents failed', c.failed)
                WHEN c.failed > 0
                    THEN format('%s of %s documents failed', c.failed, c.total)
                ELSE b.error
            END,
            completed_at = now(),
            updated_at = now()
        FROM counted c
        WHERE b.id = v_batch.id;
        v_closed := v_closed + 1;
    END LOOP;
    RETURN v_closed;
END;
$$;


-- The batches a sweep should serve, oldest created_at first: queued ones
-- (including those no notification ever announced) and processing ones with
-- uploaded documents that are due.
CREATE OR REPLACE FUNCTION sweep_candidates(p_max_batches integer DEFAULT 10)
RETURNS TABLE (batch_id uuid, status text, created_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT b.id, b.status, b.created_at
    FROM extraction_batches b
    WHERE b.status IN ('queued', 'processing')
      -- The first due document in available_at order, as in claim_batch: only
      -- documents_uploaded_idx gives it cheaply, whatever the statistics say.
      AND (b.status = 'queued' OR (
              SELECT d.available_at FROM documents d
              WHERE d.batch_id = b.id AND d.status = 'uploaded'
              ORDER BY d.available_at
              LIMIT 1
          ) <= now())
    ORDER BY b.created_at, b.id
    LIMIT p_max_batches;
$$;
