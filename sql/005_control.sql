-- The psql control plane: ask for a sweep, retry a batch's failed documents,
-- cancel a batch. Each raises a clear error for an unknown batch or one in the
-- wrong state, and notifies so that running listeners react at once.


-- Ask every running listener to sweep now. Notifies channel batch_sweep with
-- an empty payload.
CREATE OR REPLACE FUNCTION request_sweep() RETURNS void
LANGUAGE sql AS $$
    SELECT pg_notify('batch_sweep', '');
$$;


-- Raise unless the batch exists; return its current status.
CREATE OR REPLACE FUNCTION extraction_batches_status_of(p_batch_id uuid) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
BEGIN
    IF p_batch_id IS NULL THEN
        RAISE EXCEPTION 'batch id must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT b.status INTO v_status FROM extraction_batches b WHERE b.id = p_batch_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'batch % does not exist', p_batch_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v_status;
END;
$$;


-- Put the batch's failed documents back to uploaded with their attempts reset,
-- and reopen the batch (a terminal batch becomes queued again). Notifies
-- batch_work through the document and batch triggers. Returns the number of
-- documents requeued.
CREATE OR REPLACE FUNCTION requeue_batch(p_batch_id uuid) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_status text := extraction_batches_status_of(p_batch_id);
    v_requeued integer;
BEGIN
    IF v_status = 'uploading' THEN
        RAISE EXCEPTION 'batch % is still uploading, queue it instead', p_batch_id
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;

    WITH picked AS (
        SELECT d.id FROM documents d
        WHERE d.batch_id = p_batch_id AND d.status = 'failed'
        ORDER BY d.id
        FOR NO KEY UPDATE
    ),
    requeued AS (
        UPDATE documents d
        SET status = 'uploaded', attempts = 0, error = NULL, result = NULL,
            processed_at = NULL, available_at = now(), updated_at = now()
        FROM picked
        WHERE d.id = picked.id
        RETURNING 1
    )
    SELECT count(*)::integer INTO v_requeued FROM requeued;

    IF v_requeued = 0 THEN
        RAISE EXCEPTION 'batch % (%) has no failed documents to requeue',
            p_batch_id, v_status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;

    UPDATE extraction_batches b
    SET failed_count = b.failed_count - v_requeued,
        status = CASE
            WHEN b.status IN ('completed', 'partially_completed', 'failed', 'cancelled')
                THEN 'queued'
            ELSE b.status
        END,
        completed_at = NULL,
        error = NULL,
        updated_at = now()
    WHERE b.id = p_batch_id;
    RETURN v_requeued;
END;
$$;


-- Fail the batch's unprocessed documents (uploaded, or processing: their
-- leases are revoked, so a late completion is refused and charges nothing)
-- with the error 'cancelled', and close the batch as cancelled. Notifies
-- batch_finished through the extraction_batches_notify_finished trigger.
-- Returns the number of documents cancelled.
CREATE OR REPLACE FUNCTION cancel_batch(p_batch_id uuid) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_status text := extraction_batches_status_of(p_batch_id);
    v_cancelled integer;
    v_late integer;
BEGIN
    IF v_status IN ('completed', 'partially_completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'batch % is already %', p_batch_id, v_status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;

    v_cancelled := documents_cancel(p_batch_id, false);

    UPDATE extraction_batches b
    SET failed_count = b.failed_count + v_cancelled,
        status = 'cancelled',
        completed_at = now(),
        error = 'cancelled',
        updated_at = now()
    WHERE b.id = p_batch_id
      AND b.status NOT IN ('completed', 'partially_completed', 'failed', 'cancelled')
    RETURNING b.status INTO v_status;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'batch % finished while it was being cancelled', p_batch_id
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;

    -- Now that the batch row is locked no insert can reach it; cancel the
    -- documents committed between the first pass and the lock.
    v_late := documents_cancel(p_batch_id, true);
    IF v_late > 0 THEN
        UPDATE extraction_batches b
        SET failed_count = b.failed_count + v_late
        WHERE b.id = p_batch_id;
    END IF;
    RETURN v_cancelled + v_late;
END;
$$;


-- Fail a batch's uploaded and processing documents as cancelled; with
-- p_skip_locked, leave alone those another transaction holds.
CREATE OR REPLACE FUNCTION documents_cancel(p_batch_id uuid, p_skip_locked boolean)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_ids uuid[];
    v_count integer;
BEGIN
    IF p_skip_locked THEN
        SELECT array_agg(d.id) INTO v_ids FROM (
            SELECT d.id FROM documents d
            WHERE d.batch_id = p_batch_id AND d.status IN ('uploaded', 'processing')
            ORDER BY d.id
            FOR NO KEY UPDATE SKIP LOCKED
        ) AS d;
    ELSE
        SELECT array_agg(d.id) INTO v_ids FROM (
            SELECT d.id FROM documents d
            WHERE d.batch_id = p_batch_id AND d.status IN ('uploaded', 'processing')
            ORDER BY d.id
            FOR NO KEY UPDATE
        ) AS d;
    END IF;

    UPDATE documents d
    SET status = 'failed', error = 'cancelled', processed_at = now(),
        lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
        updated_at = now()
    WHERE d.id = ANY (v_ids) AND d.status IN ('uploaded', 'processing');
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;
