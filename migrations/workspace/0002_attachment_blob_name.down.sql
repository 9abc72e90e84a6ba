-- The files of attachments stored since the up migration keep their
-- per-attempt names, which the code of version 1 does not find.
ALTER TABLE workspace.attachments DROP COLUMN blob_name;
