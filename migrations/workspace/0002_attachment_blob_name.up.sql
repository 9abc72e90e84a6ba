-- Each upload attempt writes its bytes to a file of its own, named after the
-- attachment id and the attempt, and the row records that name, so attempts
-- of one idempotency key never remove or replace each other's files. Rows
-- written before this migration have NULL: their file is named after the id.
ALTER TABLE workspace.attachments ADD COLUMN blob_name text;
