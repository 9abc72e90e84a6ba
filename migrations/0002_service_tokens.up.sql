-- Service tokens authenticate runtime workers and internal services. Only the
-- SHA-256 hash of a token is stored; the plaintext is shown once at issue.
CREATE TABLE metering.service_tokens (
    id            text PRIMARY KEY,
    name          text NOT NULL,
    token_hash    bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    -- NULL means the token acts for all accounts.
    account_id    text,
    agent_id      text,
    scopes        text[] NOT NULL,
    created_by    text NOT NULL,
    create_time   timestamptz NOT NULL,
    revoke_time   timestamptz,
    last_use_time timestamptz,
    CHECK (agent_id IS NULL OR account_id IS NOT NULL)
);

CREATE INDEX service_tokens_by_account ON metering.service_tokens (account_id, create_time DESC);
