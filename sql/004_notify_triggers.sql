-- Wake-up notifications on channel batch_work; the payload is the batch id as
-- text, the same for every row of a batch, so PostgreSQL folds the repeats of
-- one transaction into a single notification. Notifications are hints: a
-- listener re-reads the tables and a sweep catches whatever was missed.


-- Notify batch_work once per batch that a statement inserted documents into,
-- unless the batch is still uploading. Statement-level with a transition
-- table: 1,000 rows in one statement cost one pg_notify per batch.
CREATE OR REPLACE FUNCTION documents_notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_batch_id uuid;
BEGIN
    FOR v_batch_id IN
        SELECT DISTINCT n.batch_id
        FROM new_documents n
        JOIN extraction_batches b ON b.id = n.batch_id
        WHERE b.status IN ('queued', 'processing')
    LOOP
        PERFORM pg_notify('batch_work', v_batch_id::text);
    END LOOP;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS documents_notify_inserted ON documents;
CREATE TRIGGER documents_notify_inserted
    AFTER INSERT ON documents
    REFERENCING NEW TABLE AS new_documents
    FOR EACH STATEMENT EXECUTE FUNCTION documents_notify_inserted();


-- Notify batch_work when a document goes back to uploaded and is due now
-- (requeue_batch, a recovered lease, a document handed back at shutdown).
-- A row trigger with a WHEN clause rather than a transition table: claims
-- and completions update thousands of documents a second, and for them the
-- WHEN clause is false, so they pay neither a function call nor a capture of
-- their rows. Repeats within a transaction fold into one notification.
CREATE OR REPLACE FUNCTION documents_notify_requeued() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('batch_work', NEW.batch_id::text);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS documents_notify_requeued ON documents;
CREATE TRIGGER documents_notify_requeued
    AFTER UPDATE OF status ON documents
    FOR EACH ROW
    WHEN (
        NEW.status = 'uploaded'
        AND OLD.status <> 'uploaded'
        AND NEW.available_at <= now()
    )
    EXECUTE FUNCTION documents_notify_requeued();


-- Notify batch_work when a batch is inserted as queued or becomes queued
-- (an uploading batch being released, requeue_batch).
CREATE OR REPLACE FUNCTION extraction_batches_notify_queued() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('batch_work', NEW.id::text);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS extraction_batches_notify_queued_insert ON extraction_batches;
CREATE TRIGGER extraction_batches_notify_queued_insert
    AFTER INSERT ON extraction_batches
    FOR EACH ROW
    WHEN (NEW.status = 'queued')
    EXECUTE FUNCTION extraction_batches_notify_queued();

DROP TRIGGER IF EXISTS extraction_batches_notify_queued_update ON extraction_batches;
CREATE TRIGGER extraction_batches_notify_queued_update
    AFTER UPDATE OF status ON extraction_batches
    FOR EACH ROW
    WHEN (NEW.status = 'queued' AND OLD.status <> 'queued')
    EXECUTE FUNCTION extraction_batches_notify_queued();
