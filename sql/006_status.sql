-- What `listener status` shows, as one jsonb object that psql users can read
-- too: SELECT jsonb_pretty(listener_status());
--
-- Every query reads a partial index of open work (batches not yet terminal,
-- documents uploaded or processing) or takes a bounded slice of an ordered
-- index (the latest failures), so the cost follows the work waiting, not the
-- history kept.


-- Batches still receiving documents are few; status lists them with the open ones.
CREATE INDEX IF NOT EXISTS extraction_batches_uploading_idx
    ON extraction_batches (created_at)
    WHERE status = 'uploading';

-- The latest failures, newest first, without reading the history of failures.
-- Building it scans the table once: on a large documents table this migration
-- holds writes to it for that long.
CREATE INDEX IF NOT EXISTS documents_failed_processed_at_idx
    ON documents (processed_at DESC NULLS LAST)
    WHERE status = 'failed';


-- Return the state of the work as jsonb with these keys:
--   generated_at                 the server's now()
--   batch_counts                 {"uploading", "queued", "processing"}: batches per state
--   batches                      up to p_max_batches open batches, oldest first, each
--                                {"id", "user_id", "status", "total_documents",
--                                "completed_count", "failed_count", "in_flight",
--                                "created_at", "age_seconds"}
--   queue                        {"due", "retry_wait", "uploading", "next_retry_at"}:
--                                uploaded documents claimable now, waiting out a retry
--                                backoff, and held in batches still uploading
--   oldest_waiting               {"document_id", "batch_id", "waiting_since",
--                                "waiting_seconds"} of the due document waiting longest
--                                for a worker, or null
--   in_flight                    {"documents", "expired", "owners": [{"owner",
--                                "documents", "nearest_expiry", "expires_in_seconds"}]}
--   recent_failures              the last p_recent_failures failed documents, newest
--                                first: {"document_id", "batch_id", "user_id",
--                                "file_name", "attempts", "error", "failed_at"}, with
--                                error cut to p_error_chars characters
--   notification_queue_usage     pg_notification_queue_usage(), 0 to 1
-- Sends no notification.
CREATE OR REPLACE FUNCTION listener_status(
    p_max_batches integer DEFAULT 50,
    p_recent_failures integer DEFAULT 10,
    p_error_chars integer DEFAULT 200
) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_now timestamptz := now();
    v_batch_counts jsonb;
    v_batches jsonb;
    v_queue jsonb;
    v_oldest jsonb;
    v_in_flight jsonb;
    v_failures jsonb;
BEGIN
    WITH open_batches AS (
        SELECT b.status FROM extraction_batches b
        WHERE b.status IN ('queued', 'processing')
        UNION ALL
        SELECT b.status FROM extraction_batches b
        WHERE b.status = 'uploading'
    )
    SELECT jsonb_build_object(
        'uploading', count(*) FILTER (WHERE o.status = 'uploading'),
        'queued', count(*) FILTER (WHERE o.status = 'queued'),
        'processing', count(*) FILTER (WHERE o.status = 'processing')
    )
    INTO v_batch_counts
    FROM open_batches o;

    WITH shown AS (
        SELECT * FROM (
            (SELECT b.* FROM extraction_batches b
             WHERE b.status IN ('queued', 'processing')
             ORDER BY b.created_at LIMIT p_max_batches)
            UNION ALL
            (SELECT b.* FROM extraction_batches b
             WHERE b.status = 'uploading'
             ORDER BY b.created_at LIMIT p_max_batches)
        ) AS s
        ORDER BY s.created_at, s.id
        LIMIT p_max_batches
    ),
    leased AS (
        SELECT d.batch_id, count(*) AS n
        FROM documents d
        WHERE d.status = 'processing' AND d.batch_id IN (SELECT id FROM shown)
        GROUP BY d.batch_id
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
        'id', s.id,
        'user_id', s.user_id,
        'status', s.status,
        'total_documents', s.total_documents,
        'completed_count', s.completed_count,
        'failed_count', s.failed_count,
        'in_flight', coalesce(l.n, 0),
        'created_at', s.created_at,
        'age_seconds', round(extract(epoch FROM v_now - s.created_at)::numeric, 3)
    ) ORDER BY s.created_at, s.id), '[]'::jsonb)
    INTO v_batches
    FROM shown s
    LEFT JOIN leased l ON l.batch_id = s.id;

    -- Group the waiting documents by batch first, then look each batch up by
    -- its key: a join would read every batch ever made.
    WITH waiting AS MATERIALIZED (
        SELECT d.batch_id,
               count(*) FILTER (WHERE d.available_at <= v_now) AS due,
               count(*) FILTER (WHERE d.available_at > v_now) AS later,
               min(d.available_at) FILTER (WHERE d.available_at > v_now) AS next_at
        FROM documents d
        WHERE d.status = 'uploaded'
        GROUP BY d.batch_id
    ),
    typed AS MATERIALIZED (
        SELECT w.*,
               (SELECT b.status = 'uploading' FROM extraction_batches b
                WHERE b.id = w.batch_id) AS held
        FROM waiting w
    )
    SELECT jsonb_build_object(
        'due', coalesce(sum(t.due) FILTER (WHERE NOT t.held), 0),
        'retry_wait', coalesce(sum(t.later) FILTER (WHERE NOT t.held), 0),
        'uploading', coalesce(sum(t.due + t.later) FILTER (WHERE t.held), 0),
        'next_retry_at', min(t.next_at) FILTER (WHERE NOT t.held)
    )
    INTO v_queue
    FROM typed t;

    SELECT jsonb_build_object(
        'document_id', d.id,
        'batch_id', d.batch_id,
        'waiting_since', d.available_at,
        'waiting_seconds', round(extract(epoch FROM v_now - d.available_at)::numeric, 3)
    )
    INTO v_oldest
    FROM documents d
    JOIN extraction_batches b ON b.id = d.batch_id
    WHERE d.status = 'uploaded'
      AND d.available_at <= v_now
      AND b.status IN ('queued', 'processing')
    ORDER BY d.available_at, d.id
    LIMIT 1;

    WITH owners AS (
        SELECT d.lease_owner AS owner,
               count(*) AS n,
               count(*) FILTER (WHERE d.lease_expires_at < v_now) AS expired,
               min(d.lease_expires_at) AS nearest
        FROM documents d
        WHERE d.status = 'processing'
        GROUP BY d.lease_owner
    )
    SELECT jsonb_build_object(
        'documents', coalesce(sum(o.n), 0),
        'expired', coalesce(sum(o.expired), 0),
        'owners', coalesce(jsonb_agg(jsonb_build_object(
            'owner', o.owner,
            'documents', o.n,
            'nearest_expiry', o.nearest,
            'expires_in_seconds',
                round(extract(epoch FROM o.nearest - v_now)::numeric, 3)
        ) ORDER BY o.n DESC, o.owner), '[]'::jsonb)
    )
    INTO v_in_flight
    FROM owners o;

    SELECT coalesce(jsonb_agg(jsonb_build_object(
        'document_id', f.id,
        'batch_id', f.batch_id,
        'user_id', f.user_id,
        'file_name', f.file_name,
        'attempts', f.attempts,
        'error', CASE WHEN length(f.error) > p_error_chars
                      THEN left(f.error, p_error_chars - 1) || '…'
                      ELSE f.error END,
        'failed_at', f.processed_at
    ) ORDER BY f.processed_at DESC, f.id), '[]'::jsonb)
    INTO v_failures
    FROM (
        SELECT d.id, d.batch_id, d.user_id, d.file_name, d.attempts, d.error,
               d.processed_at
        FROM documents d
        WHERE d.status = 'failed'
        ORDER BY d.processed_at DESC NULLS LAST
        LIMIT p_recent_failures
    ) AS f;

    RETURN jsonb_build_object(
        'generated_at', v_now,
        'batch_counts', v_batch_counts,
        'batches', v_batches,
        'queue', v_queue,
        'oldest_waiting', v_oldest,
        'in_flight', v_in_flight,
        'recent_failures', v_failures,
        'notification_queue_usage', pg_notification_queue_usage()
    );
END;
$$;
