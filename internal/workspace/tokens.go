package workspace

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/metering/metering/internal/auth"
)

// TokenStore returns the store of the runtime tokens of agents, for the
// authenticator of the workspace server. Every runtime token has the scope
// ScopeRuntime and is bound to its agent's account.
func (s *Service) TokenStore() auth.TokenStore {
	return tokenStore{pool: s.pool}
}

// tokenStore looks up runtime tokens in workspace.agent_tokens.
type tokenStore struct {
	pool *pgxpool.Pool
}

// LookupServiceToken returns the runtime token whose SHA-256 hash is hash.
func (ts tokenStore) LookupServiceToken(ctx context.Context, hash [32]byte) (auth.ServiceToken, error) {
	const query = `
		SELECT id, account_id, agent_id, revoke_time IS NOT NULL
		FROM workspace.agent_tokens
		WHERE token_hash = $1`

	t := auth.ServiceToken{Scopes: []string{ScopeRuntime}}
	err := ts.pool.QueryRow(ctx, query, hash[:]).Scan(&t.ID, &t.AccountID, &t.AgentID, &t.Revoked)
	if errors.Is(err, pgx.ErrNoRows) {
		return auth.ServiceToken{}, auth.ErrTokenNotFound
	}
	if err != nil {
		return auth.ServiceToken{}, fmt.Errorf("look up runtime token: %w", translate(err))
	}

	return t, nil
}

// MarkServiceTokensUsed sets the last-used time of the runtime tokens with
// the ids.
func (ts tokenStore) MarkServiceTokensUsed(ctx context.Context, ids []string, at time.Time) error {
	const query = `UPDATE workspace.agent_tokens SET last_use_time = $2 WHERE id = ANY ($1)`

	if _, err := ts.pool.Exec(ctx, query, ids, at); err != nil {
		return fmt.Errorf("mark %d runtime tokens used: %w", len(ids), translate(err))
	}

	return nil
}
