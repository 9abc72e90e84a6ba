-- The workspace schema: agents and their runtime tokens, tasks, documents,
-- messages and attachments, and the request ids that make creates safe to
-- retry. The workspace server never reads Metering's schema; it counts usage
-- through Metering's gRPC API.
--
-- Ids are text with a kind prefix (agt_, tsk_, doc_, msg_, att_), unique
-- across accounts. Every query also filters on account_id, so one account can
-- never reach another's rows by id.

CREATE SCHEMA workspace;

CREATE TABLE workspace.agents (
    id          text PRIMARY KEY,
    account_id  text NOT NULL,
    name        text NOT NULL,
    -- "user:<id>" or "agent:<id>".
    created_by  text NOT NULL,
    create_time timestamptz NOT NULL
);

CREATE INDEX agents_by_account ON workspace.agents (account_id);

-- Runtime tokens of agents. Only the SHA-256 hash of a token is stored; the
-- plaintext is returned once, by CreateAgent or RotateAgentToken. Deleting
-- the agent deletes its tokens.
CREATE TABLE workspace.agent_tokens (
    id            text PRIMARY KEY,
    agent_id      text NOT NULL REFERENCES workspace.agents (id) ON DELETE CASCADE,
    account_id    text NOT NULL,
    token_hash    bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    create_time   timestamptz NOT NULL,
    revoke_time   timestamptz,
    last_use_time timestamptz
);

CREATE INDEX agent_tokens_by_agent ON workspace.agent_tokens (agent_id);

CREATE TABLE workspace.tasks (
    id          text PRIMARY KEY,
    account_id  text NOT NULL,
    title       text NOT NULL,
    created_by  text NOT NULL,
    create_time timestamptz NOT NULL
);

CREATE INDEX tasks_by_account ON workspace.tasks (account_id);

-- Files count toward the documents limits; folders never do. doc_key is the
-- key of UpsertDocument, unique within the account when set.
CREATE TABLE workspace.documents (
    id          text PRIMARY KEY,
    account_id  text NOT NULL,
    task_id     text REFERENCES workspace.tasks (id),
    name        text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('file', 'folder')),
    doc_key     text,
    content     text NOT NULL,
    created_by  text NOT NULL,
    create_time timestamptz NOT NULL,
    update_time timestamptz NOT NULL,
    UNIQUE (account_id, doc_key)
);

CREATE INDEX documents_by_account_task ON workspace.documents (account_id, task_id);

CREATE TABLE workspace.messages (
    id          text PRIMARY KEY,
    account_id  text NOT NULL,
    task_id     text REFERENCES workspace.tasks (id),
    body        text NOT NULL,
    created_by  text NOT NULL,
    create_time timestamptz NOT NULL
);

CREATE INDEX messages_by_account ON workspace.messages (account_id);

-- The bytes of an attachment are a file named after its id in the blob
-- directory; the row is written in the same transaction that renames the
-- file into place.
CREATE TABLE workspace.attachments (
    id          text PRIMARY KEY,
    account_id  text NOT NULL,
    message_id  text NOT NULL REFERENCES workspace.messages (id),
    file_name   text NOT NULL,
    size        bigint NOT NULL CHECK (size >= 0),
    sha256      text NOT NULL,
    created_by  text NOT NULL,
    create_time timestamptz NOT NULL
);

CREATE INDEX attachments_by_message ON workspace.attachments (message_id);

-- One row per create that carried a request id (or an upload idempotency
-- key), written in the same transaction as the created row and kept after
-- the resource is deleted, so a retry returns the first result and never
-- creates or counts twice. request_hash covers the operation and the
-- request, so a request id reused for another request is detected.
-- NOTE: rows are never pruned, so a request id stays bound to its first
-- request for good.
CREATE TABLE workspace.requests (
    account_id   text NOT NULL,
    request_id   text NOT NULL,
    operation    text NOT NULL,
    request_hash bytea NOT NULL,
    resource_id  text NOT NULL,
    create_time  timestamptz NOT NULL,
    PRIMARY KEY (account_id, request_id)
);
