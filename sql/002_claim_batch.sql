-- Claiming, completing, failing and leasing documents.
--
-- Locks are always taken in the same order, documents, then user_usage, then
-- extraction_batches, and by id within each table, so that concurrent workers
-- wait on each other but never deadlock.


-- Add finished documents to their batches' counters and close every batch
-- whose documents are now all terminal. The UPDATE re-reads each batch row
-- under its lock, so when the last two documents of a batch finish at the same
-- moment on two connections, the second one sees the first one's counts and
-- exactly one of them closes the batch. Closing notifies batch_finished through
-- the extraction_batches_notify_finished trigger.
CREATE OR REPLACE FUNCTION extraction_batches_add_outcomes(
    p_batch_ids uuid[],
    p_completed integer[],
    p_failed integer[]
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1
    FROM extraction_batches
    WHERE id = ANY (p_batch_ids)
    ORDER BY id
    FOR NO KEY UPDATE;

    WITH delta AS (
        SELECT id, sum(completed)::integer AS completed, sum(failed)::integer AS failed
        FROM unnest(p_batch_ids, p_completed, p_failed) AS d (id, completed, failed)
        GROUP BY id
    ),
    counted AS (
        SELECT b.id,
               b.completed_count + delta.completed AS completed,
               b.failed_count + delta.failed AS failed,
               b.status IN ('queued', 'processing')
                   AND b.completed_count + delta.completed + b.failed_count
                       + delta.failed >= b.total_documents AS closes
        FROM extraction_batches b
        JOIN delta ON delta.id = b.id
    )
    UPDATE extraction_batches b
    SET completed_count = counted.completed,
        failed_count = counted.failed,
        status = CASE
            WHEN NOT counted.closes THEN b.status
            WHEN counted.failed = 0 THEN 'completed'
            WHEN counted.completed = 0 THEN 'failed'
            ELSE 'partially_completed'
        END,
        completed_at = CASE WHEN counted.closes THEN now() ELSE b.completed_at END,
        error = CASE
            WHEN NOT counted.closes OR counted.failed = 0 THEN b.error
            WHEN counted.completed = 0
                THEN format('all %s documents failed', counted.failed)
            ELSE format('%s of %s documents failed',
                        counted.failed, counted.completed + counted.failed)
        END,
        updated_at = now()
    FROM counted
    WHERE b.id = counted.id;
END;
$$;


-- Take the next unit of work for one worker: up to p_max_docs due documents
-- of one batch (or of p_batch_id only), moved to processing under a fresh
-- lease whose token every later change must present.
--
-- Batches are served fewest-documents-in-flight first, then oldest first, so
-- a worker that has just taken a slice of a huge batch turns to a small batch
-- queued after it before taking the next slice. A queued batch without
-- documents is closed as failed. Documents beyond their user's remaining
-- quota are failed here, without ever reaching an extractor; documents in
-- flight count against the quota, so concurrent claims cannot overshoot it;
-- documents that only in-flight ones keep from their quota stay uploaded.
-- Documents whose content is over p_max_content_bytes (null: no limit) fail
-- here too, so their content never reaches a worker's memory.
CREATE OR REPLACE FUNCTION claim_batch(
    p_worker text,
    p_max_docs integer DEFAULT 100,
    p_lease_seconds double precision DEFAULT 60,
    p_batch_id uuid DEFAULT NULL,
    p_max_content_bytes bigint DEFAULT NULL
) RETURNS TABLE (
    lease_token uuid,
    lease_expires_at timestamptz,
    document_id uuid,
    batch_id uuid,
    user_id text,
    file_name text,
    content bytea,
    storage_url text,
    attempt integer
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_batch record;
    v_token uuid := gen_random_uuid();
    v_expires timestamptz;
    v_ids uuid[];
    v_users text[];
    v_over uuid[];
    v_deferred uuid[];
    v_oversized uuid[];
    v_claimed integer;
BEGIN
    IF p_worker IS NULL OR p_max_docs IS NULL OR p_max_docs < 1
       OR p_lease_seconds IS NULL OR p_lease_seconds <= 0 THEN
        RAISE EXCEPTION 'claim_batch needs a worker, p_max_docs >= 1 and p_lease_seconds > 0'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_max_content_bytes < 0 THEN
        RAISE EXCEPTION 'claim_batch needs p_max_content_bytes >= 0 or null, not %',
            p_max_content_bytes
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_expires := now() + make_interval(secs => p_lease_seconds);

    FOR v_batch IN
        -- Per-batch subqueries, each an index range of one open batch: an
        -- aggregate over every processing document was rescanned per batch,
        -- and a bare EXISTS let stale statistics pick a sequential scan.
        -- "First due document in available_at order" only has a cheap plan
        -- on documents_uploaded_idx, whatever the statistics say.
        SELECT b.id, b.status, b.total_documents
        FROM extraction_batches b
        CROSS JOIN LATERAL (
            SELECT count(*) AS n
            FROM documents f
            WHERE f.batch_id = b.id AND f.status = 'processing'
        ) AS in_flight
        WHERE b.status IN ('queued', 'processing')
          AND (p_batch_id IS NULL OR b.id = p_batch_id)
          AND (
              (b.status = 'queued' AND b.total_documents = 0)
              OR (
                  SELECT u.available_at FROM documents u
                  WHERE u.batch_id = b.id AND u.status = 'uploaded'
                  ORDER BY u.available_at
                  LIMIT 1
              ) <= now()
          )
        ORDER BY in_flight.n, b.created_at, b.id
    LOOP
        IF v_batch.total_documents = 0 THEN
            -- Skip the batch while an upload into it is still uncommitted.
            PERFORM 1 FROM extraction_batches b
            WHERE b.id = v_batch.id AND b.status = 'queued' AND b.total_documents = 0
            FOR NO KEY UPDATE SKIP LOCKED;
            IF FOUND THEN
                UPDATE extraction_batches b
                SET status = 'failed', error = 'batch has no documents',
                    completed_at = now(), updated_at = now()
                WHERE b.id = v_batch.id;
            END IF;
            CONTINUE;
        END IF;

        -- Each pass claims documents or fails at least one over quota.
        LOOP
            SELECT array_agg(s.id ORDER BY s.available_at),
                   array_agg(s.user_id ORDER BY s.available_at)
            INTO v_ids, v_users
            FROM (
                SELECT d.id, d.user_id, d.available_at
                FROM documents d
                WHERE d.batch_id = v_batch.id
                  AND d.status = 'uploaded'
                  AND d.available_at <= now()
                ORDER BY d.available_at
                LIMIT p_max_docs
                FOR NO KEY UPDATE SKIP LOCKED
            ) AS s;
            EXIT WHEN v_ids IS NULL;

            -- octet_length of a bytea reads its size from the TOAST header,
            -- so an oversized document's content is never loaded, here or in
            -- the worker.
            v_oversized := NULL;
            IF p_max_content_bytes IS NOT NULL THEN
                WITH failed AS (
                    UPDATE documents d
                    SET status = 'failed',
                        error = format(
                            'content is %s bytes, over the limit of %s bytes',
                            octet_length(d.content), p_max_content_bytes),
                        processed_at = now(),
                        updated_at = now()
                    WHERE d.id = ANY (v_ids)
                      AND octet_length(d.content) > p_max_content_bytes
                    RETURNING d.id
                )
                SELECT array_agg(f.id) INTO v_oversized FROM failed f;
                IF v_oversized IS NOT NULL THEN
                    SELECT array_agg(p.id ORDER BY p.ord),
                           array_agg(p.user_id ORDER BY p.ord)
                    INTO v_ids, v_users
                    FROM unnest(v_ids, v_users) WITH ORDINALITY AS p (id, user_id, ord)
                    WHERE NOT (p.id = ANY (v_oversized));
                END IF;
            END IF;
            IF v_ids IS NULL THEN
                -- All of them were oversized; the batch may have more.
                PERFORM extraction_batches_add_outcomes(
                    ARRAY[v_batch.id], ARRAY[0], ARRAY[cardinality(v_oversized)]);
                CONTINUE;
            END IF;

            SELECT array_agg(q.document_id) FILTER (WHERE q.over),
                   array_agg(q.document_id) FILTER (WHERE NOT q.over)
            INTO v_over, v_deferred
            FROM claim_batch_quota(v_ids, v_users) AS q;
            IF v_over IS NOT NULL THEN
                PERFORM documents_fail_over_quota(v_over);
            END IF;
            -- After the quota's usage locks: documents, usage, then batches.
            IF v_oversized IS NOT NULL THEN
                PERFORM extraction_batches_add_outcomes(
                    ARRAY[v_batch.id], ARRAY[0], ARRAY[cardinality(v_oversized)]);
            END IF;

            RETURN QUERY
            WITH claimed AS (
                UPDATE documents d
                SET status = 'processing',
                    attempts = d.attempts + 1,
                    lease_owner = p_worker,
                    lease_token = v_token,
                    lease_expires_at = v_expires,
                    updated_at = now()
                WHERE d.id = ANY (v_ids)
                  AND NOT (d.id = ANY (coalesce(v_over, '{}')))
                  AND NOT (d.id = ANY (coalesce(v_deferred, '{}')))
                RETURNING d.id, d.batch_id, d.user_id, d.file_name, d.content,
                          d.storage_url, d.attempts, d.available_at
            )
            SELECT v_token, v_expires, c.id, c.batch_id, c.user_id, c.file_name,
                   c.content, c.storage_url, c.attempts
            FROM claimed c
            ORDER BY c.available_at;
            GET DIAGNOSTICS v_claimed = ROW_COUNT;

            IF v_claimed > 0 THEN
                UPDATE extraction_batches b
                SET status = 'processing', updated_at = now()
                WHERE b.id = v_batch.id AND b.status = 'queued';
                RETURN;
            END IF;
            -- Only documents waiting for quota held by documents in flight.
            EXIT WHEN v_over IS NULL AND v_oversized IS NULL;
        END LOOP;
    END LOOP;
END;
$$;


-- Sort out the picked documents that their users' quotas do not allow now:
-- over = true when the user's charged documents already reach the limit (the
-- document fails), false when only documents in flight fill it (the document
-- waits: if one in flight fails, its quota comes back). Locks the usage rows
-- of limited users first, then counts in a new snapshot, so a concurrent claim
-- for the same user is seen once it has committed.
CREATE OR REPLACE FUNCTION claim_batch_quota(
    p_ids uuid[],
    p_users text[]
) RETURNS TABLE (document_id uuid, over boolean)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1
    FROM user_usage u
    WHERE u.user_id = ANY (p_users) AND u.documents_limit IS NOT NULL
    ORDER BY u.user_id
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;

    RETURN QUERY
    SELECT r.id, u.documents_processed >= u.documents_limit
    FROM (
        SELECT p.id, p.user_id,
               row_number() OVER (PARTITION BY p.user_id ORDER BY p.ord) AS rank
        FROM unnest(p_ids, p_users) WITH ORDINALITY AS p (id, user_id, ord)
    ) AS r
    JOIN user_usage u ON u.user_id = r.user_id AND u.documents_limit IS NOT NULL
    WHERE r.rank > u.documents_limit - u.documents_processed - (
        SELECT count(*) FROM documents f
        WHERE f.user_id = u.user_id AND f.status = 'processing'
    );
END;
$$;


-- Fail documents whose user has no quota left, without an attempt.
CREATE OR REPLACE FUNCTION documents_fail_over_quota(p_ids uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_batch_ids uuid[];
    v_failed integer[];
BEGIN
    WITH failed AS (
        UPDATE documents d
        SET status = 'failed',
            error = format('quota exhausted: user %s has used %s of %s documents',
                           u.user_id, u.documents_processed, u.documents_limit),
            processed_at = now(),
            updated_at = now()
        FROM user_usage u
        WHERE d.id = ANY (p_ids) AND u.user_id = d.user_id
        RETURNING d.batch_id
    )
    SELECT array_agg(f.batch_id), array_agg(f.n)
    INTO v_batch_ids, v_failed
    FROM (SELECT batch_id, count(*)::integer AS n FROM failed GROUP BY batch_id) AS f;

    PERFORM extraction_batches_add_outcomes(
        v_batch_ids, array_fill(0, ARRAY[cardinality(v_batch_ids)]), v_failed);
END;
$$;


-- Record the outcomes of many documents in one call and one transaction.
--
-- p_outcomes[i] is 'completed' (p_results->i-1 is stored and the user is
-- charged once), 'failed' (permanent), or 'error' (retried after
-- p_retry_delay * 2^(attempt-1) seconds, at most p_retry_cap, until
-- p_max_attempts tries have started; then failed with p_errors[i]).
-- A document whose lease token no longer matches is left untouched and
-- reported as 'stale': its lease was lost and someone else may hold it.
-- Returns one row per input: completed, failed, retrying or stale, and for a
-- retry when the document is due again.
CREATE OR REPLACE FUNCTION finish_documents(
    p_document_ids uuid[],
    p_lease_tokens uuid[],
    p_outcomes text[],
    p_results jsonb,
    p_errors text[],
    p_max_attempts integer DEFAULT 3,
    p_retry_delay double precision DEFAULT 5,
    p_retry_cap double precision DEFAULT 300
) RETURNS TABLE (document_id uuid, outcome text, available_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_ids uuid[];
    v_batch_ids uuid[];
    v_finals text[];
    v_due timestamptz[];
BEGIN
    -- A null maximum would retry forever, a null delay would make the
    -- document due at null, and arrays of different lengths would pair a
    -- document with another one's outcome or result.
    IF p_max_attempts IS NULL OR p_max_attempts < 1
       OR p_retry_delay IS NULL OR NOT p_retry_delay BETWEEN 0 AND 1e9
       OR p_retry_cap IS NULL OR NOT p_retry_cap BETWEEN 0 AND 1e9 THEN
        RAISE EXCEPTION 'finish_documents needs p_max_attempts >= 1 and retry delay '
            'and cap between 0 and 1e9 seconds, not %, %, %',
            p_max_attempts, p_retry_delay, p_retry_cap
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(p_lease_tokens) IS DISTINCT FROM cardinality(p_document_ids)
       OR cardinality(p_outcomes) IS DISTINCT FROM cardinality(p_document_ids)
       OR (p_errors IS NOT NULL
           AND cardinality(p_errors) <> cardinality(p_document_ids))
       OR jsonb_typeof(p_results) IS DISTINCT FROM 'array'
       OR jsonb_array_length(p_results) <> cardinality(p_document_ids) THEN
        RAISE EXCEPTION 'finish_documents needs one lease token, outcome, error '
            'and result (p_results a JSON array) per document'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (
        SELECT 1 FROM unnest(p_outcomes) AS o (outcome)
        WHERE o.outcome IS NULL OR o.outcome NOT IN ('completed', 'failed', 'error')
    ) THEN
        RAISE EXCEPTION 'finish_documents outcomes must be completed, failed or error'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    WITH input AS (
        SELECT i.id, i.token, i.outcome, i.error, p_results -> (i.ord::integer - 1) AS result
        FROM unnest(p_document_ids, p_lease_tokens, p_outcomes, p_errors)
             WITH ORDINALITY AS i (id, token, outcome, error, ord)
    ),
    -- One primary-key probe per input row, locked in id order: the locking
    -- subquery cannot be flattened into a join, so no statistics can turn
    -- this into a scan of documents once per input row (they did: a table
    -- analysed before its first claim has no processing rows and no leases).
    -- A matching lease token means processing (documents_lease_check).
    live AS (
        SELECT d.id, d.attempts, input.outcome, input.error, input.result
        FROM (SELECT * FROM input ORDER BY input.id) AS input
        CROSS JOIN LATERAL (
            SELECT d.id, d.attempts
            FROM documents d
            WHERE d.id = input.id AND d.lease_token = input.token
              AND d.lease_expires_at IS NOT NULL
            FOR NO KEY UPDATE
        ) AS d
    ),
    decided AS (
        SELECT live.*,
               CASE
                   WHEN live.outcome = 'completed' THEN 'completed'
                   WHEN live.outcome = 'failed' OR live.attempts >= p_max_attempts
                       THEN 'failed'
                   ELSE 'retrying'
               END AS final
        FROM live
    ),
    changed AS (
        UPDATE documents d
        SET status = CASE x.final WHEN 'retrying' THEN 'uploaded' ELSE x.final END,
            result = CASE x.final WHEN 'completed' THEN x.result END,
            error = CASE x.final WHEN 'completed' THEN NULL ELSE x.error END,
            processed_at = CASE x.final WHEN 'retrying' THEN NULL ELSE now() END,
            available_at = CASE x.final
                WHEN 'retrying' THEN now() + make_interval(secs => least(
                    p_retry_cap, p_retry_delay * power(2, greatest(x.attempts - 1, 0))))
                ELSE d.available_at
            END,
            lease_owner = NULL,
            lease_token = NULL,
            lease_expires_at = NULL,
            updated_at = now()
        FROM decided x
        WHERE d.id = x.id
        RETURNING d.id, d.batch_id, d.user_id, x.final, d.available_at
    ),
    charged AS (
        INSERT INTO user_usage AS u (user_id, documents_processed)
        SELECT c.user_id, count(*)
        FROM changed c
        WHERE c.final = 'completed'
        GROUP BY c.user_id
        ORDER BY c.user_id
        ON CONFLICT (user_id) DO UPDATE
        SET documents_processed = u.documents_processed + excluded.documents_processed
        RETURNING 1
    )
    SELECT array_agg(c.id), array_agg(c.batch_id), array_agg(c.final),
           array_agg(c.available_at)
    INTO v_ids, v_batch_ids, v_finals, v_due
    FROM changed c;

    IF v_ids IS NOT NULL THEN
        PERFORM extraction_batches_add_outcomes(
            array_agg(t.batch_id),
            array_agg(t.completed),
            array_agg(t.failed))
        FROM (
            SELECT f.batch_id,
                   count(*) FILTER (WHERE f.final = 'completed')::integer AS completed,
                   count(*) FILTER (WHERE f.final = 'failed')::integer AS failed
            FROM unnest(v_batch_ids, v_finals) AS f (batch_id, final)
            WHERE f.final <> 'retrying'
            GROUP BY f.batch_id
        ) AS t
        HAVING count(*) > 0;
    END IF;

    RETURN QUERY
    SELECT i.id,
           coalesce(f.final, 'stale'),
           CASE f.final WHEN 'retrying' THEN f.due END
    FROM unnest(p_document_ids) WITH ORDINALITY AS i (id, ord)
    LEFT JOIN unnest(v_ids, v_finals, v_due) AS f (id, final, due) ON f.id = i.id
    ORDER BY i.ord;
END;
$$;


-- Extend the leases that the caller still holds; returns the documents whose
-- lease was extended. A document missing from the result was lost.
CREATE OR REPLACE FUNCTION extend_leases(
    p_document_ids uuid[],
    p_lease_tokens uuid[],
    p_lease_seconds double precision
) RETURNS SETOF uuid
LANGUAGE sql AS $$
    -- Primary-key probes locked in id order, as in finish_documents.
    WITH held AS (
        SELECT d.id
        FROM (
            SELECT * FROM unnest(p_document_ids, p_lease_tokens) AS h (id, token)
            ORDER BY h.id
        ) AS h
        CROSS JOIN LATERAL (
            SELECT d.id FROM documents d
            WHERE d.id = h.id AND d.lease_token = h.token
              AND d.lease_expires_at IS NOT NULL
            FOR NO KEY UPDATE
        ) AS d
    )
    UPDATE documents d
    SET lease_expires_at = now() + make_interval(secs => p_lease_seconds)
    FROM held
    WHERE d.id = held.id
    RETURNING d.id;
$$;


-- Hand claimed documents straight back to uploaded without waiting for the
-- lease to expire. p_unstarted: the extractor was never called for them, so
-- their claim does not count as an attempt. A started document that has had
-- p_max_attempts tries (null: no limit) fails instead, as recover_expired_leases
-- fails one whose worker died: otherwise a document whose extraction outlasts
-- every shutdown grace would be tried again after each restart, for ever.
-- Returns how many were released or failed.
CREATE OR REPLACE FUNCTION release_documents(
    p_document_ids uuid[],
    p_lease_tokens uuid[],
    p_unstarted boolean DEFAULT true,
    p_max_attempts integer DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_handled integer;
    v_batch_ids uuid[];
    v_failed integer[];
BEGIN
    IF p_unstarted IS NULL OR p_max_attempts < 1 THEN
        RAISE EXCEPTION 'release_documents needs p_unstarted true or false and '
            'p_max_attempts >= 1 or null'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- Primary-key probes locked in id order, as in finish_documents.
    WITH held AS (
        SELECT d.id
        FROM (
            SELECT * FROM unnest(p_document_ids, p_lease_tokens) AS r (id, token)
            ORDER BY r.id
        ) AS r
        CROSS JOIN LATERAL (
            SELECT d.id FROM documents d
            WHERE d.id = r.id AND d.lease_token = r.token
              AND d.lease_expires_at IS NOT NULL
            FOR NO KEY UPDATE
        ) AS d
    ),
    released AS (
        UPDATE documents d
        SET status = CASE WHEN NOT p_unstarted AND d.attempts >= p_max_attempts
                          THEN 'failed' ELSE 'uploaded' END,
            attempts = CASE WHEN p_unstarted THEN greatest(d.attempts - 1, 0)
                            ELSE d.attempts END,
            error = CASE WHEN NOT p_unstarted AND d.attempts >= p_max_attempts
                THEN format('worker %s stopped during attempt %s of %s',
                            d.lease_owner, d.attempts, p_max_attempts)
                ELSE d.error END,
            processed_at = CASE WHEN NOT p_unstarted AND d.attempts >= p_max_attempts
                                THEN now() END,
            available_at = now(),
            lease_owner = NULL,
            lease_token = NULL,
            lease_expires_at = NULL,
            updated_at = now()
        FROM held
        WHERE d.id = held.id
        RETURNING d.batch_id, d.status
    ),
    per_batch AS (
        SELECT r.batch_id, count(*) FILTER (WHERE r.status = 'failed') AS failed,
               count(*) AS handled
        FROM released r
        GROUP BY r.batch_id
    )
    SELECT coalesce(sum(p.handled), 0)::integer,
           array_agg(p.batch_id) FILTER (WHERE p.failed > 0),
           array_agg(p.failed::integer) FILTER (WHERE p.failed > 0)
    INTO v_handled, v_batch_ids, v_failed
    FROM per_batch p;

    IF v_batch_ids IS NOT NULL THEN
        PERFORM extraction_batches_add_outcomes(
            v_batch_ids, array_fill(0, ARRAY[cardinality(v_batch_ids)]), v_failed);
    END IF;
    RETURN v_handled;
END;
$$;
