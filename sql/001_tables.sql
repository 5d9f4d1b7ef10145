-- Tables of the public contract: batches, their documents, and per-user usage.
-- Counters on extraction_batches belong to the database: triggers below keep
-- total_documents, and the processing functions keep completed/failed counts.

CREATE TABLE IF NOT EXISTS extraction_batches (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id text NOT NULL,
    status text NOT NULL DEFAULT 'queued',
    total_documents integer NOT NULL DEFAULT 0,
    completed_count integer NOT NULL DEFAULT 0,
    failed_count integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    error text,
    CONSTRAINT extraction_batches_status_check CHECK (
        status IN (
            'uploading', 'queued', 'processing',
            'completed', 'partially_completed', 'failed', 'cancelled'
        )
    ),
    CONSTRAINT extraction_batches_counts_check CHECK (
        completed_count >= 0
        AND failed_count >= 0
        AND completed_count + failed_count <= total_documents
    ),
    CONSTRAINT extraction_batches_completed_at_check CHECK (
        (completed_at IS NOT NULL)
        = (status IN ('completed', 'partially_completed', 'failed', 'cancelled'))
    )
);

-- Open batches are few; finished ones pile up. Claiming and sweeping read
-- only this index, so their cost follows the open work, not the history.
CREATE INDEX IF NOT EXISTS extraction_batches_open_idx
    ON extraction_batches (created_at)
    WHERE status IN ('queued', 'processing');

-- A version-7 UUID (RFC 9562): 48 bits of Unix milliseconds, then random
-- bits. Documents uploaded together get neighbouring keys, so claiming and
-- finishing them touches a few pages of documents_pkey, not one random page
-- per document: with 1,000,000 documents of history that cost a full-page
-- image in the WAL per claimed document after every checkpoint (benchmark 3).
CREATE OR REPLACE FUNCTION documents_new_id() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(
                        floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint
                    ) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid;
$$;

CREATE TABLE IF NOT EXISTS documents (
    id uuid PRIMARY KEY DEFAULT documents_new_id(),
    batch_id uuid NOT NULL
        CONSTRAINT documents_batch_id_fkey
        REFERENCES extraction_batches (id) ON DELETE CASCADE,
    user_id text NOT NULL,
    file_name text NOT NULL,
    content bytea,
    storage_url text,
    status text NOT NULL DEFAULT 'uploaded',
    attempts integer NOT NULL DEFAULT 0,
    result jsonb,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    -- When an uploaded document may next be claimed (retry backoff).
    available_at timestamptz NOT NULL DEFAULT now(),
    -- The lease of a processing document: who holds it, until when, and the
    -- fencing token every later state change must present.
    lease_owner text,
    lease_token uuid,
    lease_expires_at timestamptz,
    CONSTRAINT documents_status_check CHECK (
        status IN ('uploaded', 'processing', 'completed', 'failed')
    ),
    CONSTRAINT documents_attempts_check CHECK (attempts >= 0),
    CONSTRAINT documents_lease_check CHECK (
        (status = 'processing')
        = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)
    )
);

-- Per-batch counting, repair and cascading deletes.
CREATE INDEX IF NOT EXISTS documents_batch_id_status_idx
    ON documents (batch_id, status);

-- The waiting work: what claim_batch reads.
CREATE INDEX IF NOT EXISTS documents_uploaded_idx
    ON documents (batch_id, available_at)
    WHERE status = 'uploaded';

-- Live leases: per batch for fairness, per user for quota, expiry for the
-- sweep. One index rather than one per use: every claim adds an entry to
-- each, and index maintenance is most of what a claim costs (benchmark 1).
-- Per-user and expiry lookups read it whole, which is cheap: it holds only
-- the documents in flight. lease_expires_at is in no index, so a heartbeat
-- that extends leases can update its rows in place (HOT).
CREATE INDEX IF NOT EXISTS documents_processing_idx
    ON documents (batch_id, user_id)
    WHERE status = 'processing';

CREATE TABLE IF NOT EXISTS user_usage (
    user_id text PRIMARY KEY,
    documents_processed integer NOT NULL DEFAULT 0,
    documents_limit integer,
    CONSTRAINT user_usage_documents_processed_check CHECK (documents_processed >= 0),
    CONSTRAINT user_usage_documents_limit_check CHECK (
        documents_limit IS NULL OR documents_limit >= 0
    )
);


-- Start every batch with zero counts, whatever the inserter wrote.
CREATE OR REPLACE FUNCTION extraction_batches_reset_counts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.total_documents := 0;
    NEW.completed_count := 0;
    NEW.failed_count := 0;
    IF NEW.status IN ('completed', 'partially_completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'a new batch cannot start as %', NEW.status
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.completed_at := NULL;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS extraction_batches_reset_counts ON extraction_batches;
CREATE TRIGGER extraction_batches_reset_counts
    BEFORE INSERT ON extraction_batches
    FOR EACH ROW EXECUTE FUNCTION extraction_batches_reset_counts();


-- Count inserted documents into their batches, one UPDATE per statement.
-- The UPDATE re-checks the batch's state under its row lock, so a batch
-- that turns terminal concurrently cannot receive a document, and a batch
-- receiving one cannot turn terminal before the insert commits.
CREATE OR REPLACE FUNCTION documents_count_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_batches integer;
    v_counted integer;
    v_bad record;
BEGIN
    IF EXISTS (SELECT 1 FROM new_documents WHERE status <> 'uploaded') THEN
        RAISE EXCEPTION 'documents must be inserted as uploaded'
            USING ERRCODE = 'check_violation';
    END IF;

    SELECT count(DISTINCT batch_id) INTO v_batches FROM new_documents;

    WITH added AS (
        SELECT batch_id, count(*)::integer AS n
        FROM new_documents
        GROUP BY batch_id
    )
    UPDATE extraction_batches b
    SET total_documents = b.total_documents + added.n,
        updated_at = now()
    FROM added
    WHERE b.id = added.batch_id
      AND b.status IN ('uploading', 'queued', 'processing');
    GET DIAGNOSTICS v_counted = ROW_COUNT;

    IF v_counted < v_batches THEN
        SELECT b.id, b.status INTO v_bad
        FROM extraction_batches b
        WHERE b.id IN (SELECT batch_id FROM new_documents)
          AND b.status NOT IN ('uploading', 'queued', 'processing')
        LIMIT 1;
        RAISE EXCEPTION 'batch % is already %, it takes no more documents',
            v_bad.id, v_bad.status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS documents_count_inserted ON documents;
CREATE TRIGGER documents_count_inserted
    AFTER INSERT ON documents
    REFERENCING NEW TABLE AS new_documents
    FOR EACH STATEMENT EXECUTE FUNCTION documents_count_inserted();


-- Take deleted documents out of their batches' counts.
CREATE OR REPLACE FUNCTION documents_count_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH removed AS (
        SELECT batch_id,
               count(*)::integer AS n,
               count(*) FILTER (WHERE status = 'completed')::integer AS completed,
               count(*) FILTER (WHERE status = 'failed')::integer AS failed
        FROM old_documents
        GROUP BY batch_id
    )
    UPDATE extraction_batches b
    SET total_documents = b.total_documents - removed.n,
        completed_count = b.completed_count - removed.completed,
        failed_count = b.failed_count - removed.failed,
        updated_at = now()
    FROM removed
    WHERE b.id = removed.batch_id;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS documents_count_deleted ON documents;
CREATE TRIGGER documents_count_deleted
    AFTER DELETE ON documents
    REFERENCING OLD TABLE AS old_documents
    FOR EACH STATEMENT EXECUTE FUNCTION documents_count_deleted();


-- Notify batch_finished once per batch that reaches a terminal state.
-- Payload: {"batch_id", "status", "total_documents", "completed_count",
-- "failed_count"} as JSON; it stays far below NOTIFY's 8000-byte limit.
-- A row trigger with a WHEN clause: it runs only for the closing update, so
-- the many counter updates of a running batch cost nothing extra.
CREATE OR REPLACE FUNCTION extraction_batches_notify_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('batch_finished', json_build_object(
        'batch_id', NEW.id,
        'status', NEW.status,
        'total_documents', NEW.total_documents,
        'completed_count', NEW.completed_count,
        'failed_count', NEW.failed_count
    )::text);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS extraction_batches_notify_finished ON extraction_batches;
CREATE TRIGGER extraction_batches_notify_finished
    AFTER UPDATE OF status ON extraction_batches
    FOR EACH ROW
    WHEN (
        NEW.status IN ('completed', 'partially_completed', 'failed', 'cancelled')
        AND OLD.status NOT IN ('completed', 'partially_completed', 'failed', 'cancelled')
    )
    EXECUTE FUNCTION extraction_batches_notify_finished();
