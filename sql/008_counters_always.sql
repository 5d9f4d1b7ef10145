-- Keep the batch counters right even when triggers are suppressed.
--
-- `SET session_replication_role = replica` (bulk loads, pg_restore
-- --disable-triggers style tooling, repair sessions) skips ordinary triggers.
-- The notify triggers may be skipped: a notification is only a hint and a
-- sweep finds the work. The counting triggers may not: a batch inserted with
-- its documents would keep total_documents = 0, and claim_batch would close
-- it as "batch has no documents" while its documents wait. ENABLE ALWAYS makes
-- them fire in every session_replication_role.
--
-- Known shortcoming: on a logical-replication subscriber of these tables the
-- apply worker runs as replica too, so these triggers would count the
-- replicated documents on top of the replicated counters. The subscriber is
-- not a supported place to run listeners or insert documents.

ALTER TABLE extraction_batches ENABLE ALWAYS TRIGGER extraction_batches_reset_counts;
ALTER TABLE documents ENABLE ALWAYS TRIGGER documents_count_inserted;
ALTER TABLE documents ENABLE ALWAYS TRIGGER documents_count_deleted;
