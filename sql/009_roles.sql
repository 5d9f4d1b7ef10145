-- Least privilege, created only when asked: as a role that may create roles
-- and owns these tables (the one that ran `listener migrate`),
--
--     SELECT listener_create_roles('listener_worker', 'listener_app');
--
-- creates both roles (NOLOGIN; grant them to login roles, or ALTER ROLE ...
-- LOGIN PASSWORD) and gives them exactly this:
--
-- The listener role may EXECUTE the processing functions (claim_batch,
-- finish_documents, extend_leases, release_documents, recover_expired_leases,
-- repair_batches, sweep_candidates, request_sweep) and the read-only reports
-- (listener_status, listener_check), and has the table rights those functions
-- run with: SELECT and UPDATE of the processing columns of documents and
-- extraction_batches, SELECT, INSERT and UPDATE of usage. It cannot insert,
-- delete or truncate anything, change a document's content or owner, drop or
-- alter an object, requeue or cancel a batch, or prune.
--
-- The application role may INSERT batches (id, user_id, status) and
-- documents (id, batch_id, user_id, file_name, content, storage_url), read
-- both tables, and queue (uploading -> queued) and cancel the batches it
-- inserted, through app_queue_batch and app_cancel_batch. It cannot read or
-- change usage, call any other function of this project, or update or delete
-- a row. A batch belongs to the role that inserted it
-- (extraction_batches.created_by, which the application cannot set): several
-- applications sharing one database each get a role of their own and cannot
-- touch each other's batches. Telling the end users of one application apart
-- is that application's job: the database sees one role per application.
-- Known shortcoming: without row-level security both roles read every batch
-- and document, and an application may add documents to another's batch.
--
-- EXECUTE on this project's functions is revoked from PUBLIC by
-- listener_create_roles only, so nothing changes for a database that never
-- calls it. Run it again after a migration that adds functions: new
-- functions are executable by PUBLIC until it does.


-- Who inserted each batch: its owner for app_queue_batch and app_cancel_batch.
ALTER TABLE extraction_batches
    ADD COLUMN IF NOT EXISTS created_by text NOT NULL DEFAULT current_user;

-- Counting an application's documents updates extraction_batches, which the
-- application may not update itself: the trigger runs with its owner's rights.
ALTER FUNCTION documents_count_inserted() SECURITY DEFINER;


-- Return the role the caller acts as. Inside a SECURITY DEFINER function
-- current_user is the definer; the role setting still holds the caller's SET
-- ROLE ('none' when there was none, and then the caller is session_user).
CREATE OR REPLACE FUNCTION listener_calling_role() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE current_setting('role')
               WHEN 'none' THEN session_user::text
               ELSE current_setting('role')
           END;
$$;


-- Raise unless the batch exists and the calling role inserted it; return its
-- status, the batch row locked.
CREATE OR REPLACE FUNCTION app_own_batch(p_batch_id uuid) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_batch record;
    v_caller text := listener_calling_role();
BEGIN
    IF p_batch_id IS NULL THEN
        RAISE EXCEPTION 'batch id must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT b.status, b.created_by INTO v_batch
    FROM extraction_batches b
    WHERE b.id = p_batch_id
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'batch % does not exist', p_batch_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF v_batch.created_by IS DISTINCT FROM v_caller THEN
        RAISE EXCEPTION 'batch % belongs to another role, not to %', p_batch_id, v_caller
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN v_batch.status;
END;
$$;


-- Queue a batch the caller inserted as uploading: its documents become
-- claimable, and batch_work is notified. Returns the new status.
CREATE OR REPLACE FUNCTION app_queue_batch(p_batch_id uuid) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_status text := app_own_batch(p_batch_id);
BEGIN
    IF v_status <> 'uploading' THEN
        RAISE EXCEPTION 'batch % is %, only an uploading batch can be queued',
            p_batch_id, v_status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE extraction_batches b
    SET status = 'queued', updated_at = now()
    WHERE b.id = p_batch_id;
    RETURN 'queued';
END;
$$;


-- Cancel a batch the caller inserted (cancel_batch). Returns the number of
-- documents cancelled.
CREATE OR REPLACE FUNCTION app_cancel_batch(p_batch_id uuid) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM app_own_batch(p_batch_id);
    RETURN cancel_batch(p_batch_id);
END;
$$;


-- Create (if missing) and grant the listener and application roles; see the
-- top of this file. Needs CREATEROLE (or superuser) and ownership of the
-- tables. Idempotent. Identifiers are quoted with format('%I'), never spliced.
CREATE OR REPLACE FUNCTION listener_create_roles(
    p_listener_role text DEFAULT 'listener_worker',
    p_app_role text DEFAULT 'listener_app'
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_schema text := current_schema();
    v_function regprocedure;
    v_role text;
    v_listener_functions text[] := ARRAY[
        'claim_batch', 'finish_documents', 'extend_leases', 'release_documents',
        'recover_expired_leases', 'repair_batches', 'sweep_candidates',
        'request_sweep', 'listener_status', 'listener_check',
        -- called by the ones above, with the caller's rights
        'extraction_batches_add_outcomes', 'claim_batch_quota',
        'documents_fail_over_quota'];
    v_app_functions text[] := ARRAY['app_queue_batch', 'app_cancel_batch'];
BEGIN
    IF p_listener_role IS NULL OR p_app_role IS NULL
       OR p_listener_role = p_app_role THEN
        RAISE EXCEPTION 'listener_create_roles needs two different role names'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    FOREACH v_role IN ARRAY ARRAY[p_listener_role, p_app_role] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
        END IF;
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', v_schema, v_role);
    END LOOP;

    -- Every function of this project, whatever its arguments, executable only
    -- by the roles granted below (and by owners and superusers).
    FOR v_function IN
        SELECT p.oid::regprocedure
        FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        LEFT JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
        WHERE n.nspname = v_schema
          AND d.objid IS NULL
          AND p.prorettype <> 'trigger'::regtype
          AND p.proname = ANY (v_listener_functions || v_app_functions || ARRAY[
              'extraction_batches_status_of', 'requeue_batch', 'cancel_batch',
              'documents_cancel', 'listener_prune', 'listener_prune_chunk',
              'listener_create_roles', 'listener_calling_role', 'app_own_batch'])
    LOOP
        EXECUTE format('REVOKE ALL ON ROUTINE %s FROM PUBLIC', v_function);
    END LOOP;

    FOR v_function IN
        SELECT p.oid::regprocedure
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = v_schema AND p.proname = ANY (v_listener_functions)
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', v_function, p_listener_role);
    END LOOP;
    FOR v_function IN
        SELECT p.oid::regprocedure
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = v_schema AND p.proname = ANY (v_app_functions)
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', v_function, p_app_role);
    END LOOP;

    -- The listener: the columns its functions read and change, nothing more.
    EXECUTE format(
        'GRANT SELECT ON extraction_batches, documents, user_usage, '
        'listener_usage_ledger TO %I', p_listener_role);
    EXECUTE format(
        'GRANT UPDATE (status, attempts, result, error, processed_at, available_at, '
        'lease_owner, lease_token, lease_expires_at, updated_at) ON documents TO %I',
        p_listener_role);
    EXECUTE format(
        'GRANT UPDATE (status, total_documents, completed_count, failed_count, '
        'completed_at, error, updated_at) ON extraction_batches TO %I',
        p_listener_role);
    EXECUTE format(
        'GRANT INSERT (user_id, documents_processed), UPDATE (documents_processed) '
        'ON user_usage TO %I', p_listener_role);

    -- The application: insert and read its work, nothing of usage.
    EXECUTE format('GRANT SELECT ON extraction_batches, documents TO %I', p_app_role);
    EXECUTE format('GRANT INSERT (id, user_id, status) ON extraction_batches TO %I',
                   p_app_role);
    EXECUTE format(
        'GRANT INSERT (id, batch_id, user_id, file_name, content, storage_url) '
        'ON documents TO %I', p_app_role);
    EXECUTE format('REVOKE ALL ON user_usage, listener_usage_ledger FROM %I',
                   p_app_role);
END;
$$;


-- Functions with their owner's rights: callable only by the roles granted
-- them, and resolving names in this schema only, never in one a caller
-- controls.
DO $$
DECLARE
    v_function text;
BEGIN
    FOREACH v_function IN ARRAY ARRAY[
        'documents_count_inserted()', 'app_queue_batch(uuid)',
        'app_cancel_batch(uuid)']
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp',
                       v_function, current_schema());
    END LOOP;
    REVOKE ALL ON FUNCTION app_queue_batch(uuid) FROM PUBLIC;
    REVOKE ALL ON FUNCTION app_cancel_batch(uuid) FROM PUBLIC;
    REVOKE ALL ON FUNCTION listener_create_roles(text, text) FROM PUBLIC;
    REVOKE ALL ON FUNCTION app_own_batch(uuid) FROM PUBLIC;
END;
$$;
