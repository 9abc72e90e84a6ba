package metering

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/metering/metering/internal/auth"
)

// ErrTokenNotFound reports an unknown service token id.
var ErrTokenNotFound = errors.New("service token not found")

// ServiceTokenInfo describes a stored service token without its secret.
type ServiceTokenInfo struct {
	ID   string
	Name string
	// AccountID is empty for a token that acts for all accounts.
	AccountID   string
	AgentID     string
	Scopes      []string
	CreatedBy   string
	CreateTime  time.Time
	RevokeTime  *time.Time
	LastUseTime *time.Time
}

// IssueTokenRequest is a validated IssueServiceToken request.
type IssueTokenRequest struct {
	Name      string
	AccountID string
	AgentID   string
	Scopes    []string
	Actor     string
}

// IssueServiceToken creates a service token and returns it with its
// plaintext, which is not stored: only its SHA-256 hash is. It returns an
// *InvalidError for a request that breaks a rule of checkTokenRequest, and
// ErrAccountNotFound for a token bound to an unknown account.
func (s *Service) IssueServiceToken(ctx context.Context, req IssueTokenRequest) (ServiceTokenInfo, string, error) {
	const query = `
		INSERT INTO metering.service_tokens (id, name, token_hash, account_id, agent_id, scopes, created_by, create_time)
		SELECT $1, $2, $3, nullif($4, ''), nullif($5, ''), $6, $7, $8
		WHERE $4 = '' OR EXISTS (SELECT 1 FROM metering.accounts WHERE id = $4)`

	if err := checkTokenRequest(req); err != nil {
		return ServiceTokenInfo{}, "", err
	}
	plaintext, hash, err := auth.GenerateServiceToken()
	if err != nil {
		return ServiceTokenInfo{}, "", fmt.Errorf("issue service token: %w", err)
	}
	idBytes := make([]byte, 8)
	if _, err := rand.Read(idBytes); err != nil {
		return ServiceTokenInfo{}, "", fmt.Errorf("issue service token: %w", err)
	}

	info := ServiceTokenInfo{
		ID:         "tok_" + hex.EncodeToString(idBytes),
		Name:       req.Name,
		AccountID:  req.AccountID,
		AgentID:    req.AgentID,
		Scopes:     req.Scopes,
		CreatedBy:  req.Actor,
		CreateTime: s.now().UTC().Truncate(time.Microsecond),
	}
	tag, err := s.pool.Exec(ctx, query, info.ID, info.Name, hash[:], info.AccountID, info.AgentID, info.Scopes, info.CreatedBy, info.CreateTime)
	if err != nil {
		return ServiceTokenInfo{}, "", fmt.Errorf("issue service token %q: %w", req.Name, translate(err))
	}
	if tag.RowsAffected() == 0 {
		return ServiceTokenInfo{}, "", fmt.Errorf("issue service token for account %q: %w", req.AccountID, ErrAccountNotFound)
	}
	return info, plaintext, nil
}

// checkTokenRequest enforces the rules of a new token for the admin RPC and
// the command line alike. A token needs a name and at least one known scope,
// each listed once. An agent needs an account. The admin scope needs a token
// of all accounts, because admin methods are not scoped to one.
func checkTokenRequest(req IssueTokenRequest) error {
	switch {
	case req.Name == "":
		return &InvalidError{Field: "name", Description: "is required"}
	case len(req.Scopes) == 0:
		return &InvalidError{Field: "scopes", Description: "must contain at least one of usage:read, usage:write, admin"}
	case req.AgentID != "" && req.AccountID == "":
		return &InvalidError{Field: "agent_id", Description: "requires account_id: an agent belongs to one account"}
	}
	seen := make(map[string]bool)
	for i, scope := range req.Scopes {
		field := fmt.Sprintf("scopes[%d]", i)
		switch {
		case scope != auth.ScopeUsageRead && scope != auth.ScopeUsageWrite && scope != auth.ScopeAdmin:
			return &InvalidError{Field: field, Description: "must be one of usage:read, usage:write, admin"}
		case seen[scope]:
			return &InvalidError{Field: field, Description: "must not repeat " + scope}
		case scope == auth.ScopeAdmin && req.AccountID != "":
			return &InvalidError{Field: field, Description: "admin requires a token for all accounts: leave account_id empty"}
		}
		seen[scope] = true
	}
	return nil
}

const tokenColumns = `id, name, coalesce(account_id, ''), coalesce(agent_id, ''), scopes, created_by,
	create_time, revoke_time, last_use_time`

func scanToken(row pgx.Row) (ServiceTokenInfo, error) {
	var t ServiceTokenInfo
	err := row.Scan(&t.ID, &t.Name, &t.AccountID, &t.AgentID, &t.Scopes, &t.CreatedBy, &t.CreateTime, &t.RevokeTime, &t.LastUseTime)
	t.CreateTime = t.CreateTime.UTC()
	return t, err
}

// ListServiceTokens returns service tokens newest first, only those bound to
// accountID when it is not empty, and revoked ones only when asked.
func (s *Service) ListServiceTokens(ctx context.Context, accountID string, includeRevoked bool) ([]ServiceTokenInfo, error) {
	query := `SELECT ` + tokenColumns + ` FROM metering.service_tokens
		WHERE ($1 = '' OR account_id = $1) AND ($2 OR revoke_time IS NULL)
		ORDER BY create_time DESC, id`

	rows, err := s.pool.Query(ctx, query, accountID, includeRevoked)
	if err != nil {
		return nil, fmt.Errorf("list service tokens: %w", translate(err))
	}
	tokens, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (ServiceTokenInfo, error) { return scanToken(row) })
	if err != nil {
		return nil, fmt.Errorf("list service tokens: %w", translate(err))
	}
	return tokens, nil
}

// RevokeServiceToken marks a token revoked. Revoking a revoked token keeps
// its first revoke time. It returns ErrTokenNotFound or ErrUnavailable.
func (s *Service) RevokeServiceToken(ctx context.Context, id string) (ServiceTokenInfo, error) {
	query := `UPDATE metering.service_tokens SET revoke_time = coalesce(revoke_time, $2)
		WHERE id = $1
		RETURNING ` + tokenColumns

	t, err := scanToken(s.pool.QueryRow(ctx, query, id, s.now()))
	if errors.Is(err, pgx.ErrNoRows) {
		return ServiceTokenInfo{}, fmt.Errorf("revoke service token %q: %w", id, ErrTokenNotFound)
	}
	if err != nil {
		return ServiceTokenInfo{}, fmt.Errorf("revoke service token %q: %w", id, translate(err))
	}
	return t, nil
}

// TokenStore returns the auth.TokenStore of the tokens in Metering's
// database.
func (s *Service) TokenStore() auth.TokenStore { return tokenStore{s} }

type tokenStore struct{ s *Service }

func (ts tokenStore) LookupServiceToken(ctx context.Context, hash [32]byte) (auth.ServiceToken, error) {
	const query = `
		SELECT id, coalesce(account_id, ''), coalesce(agent_id, ''), scopes, revoke_time IS NOT NULL
		FROM metering.service_tokens WHERE token_hash = $1`

	var t auth.ServiceToken
	err := ts.s.pool.QueryRow(ctx, query, hash[:]).Scan(&t.ID, &t.AccountID, &t.AgentID, &t.Scopes, &t.Revoked)
	if errors.Is(err, pgx.ErrNoRows) {
		return auth.ServiceToken{}, auth.ErrTokenNotFound
	}
	if err != nil {
		return auth.ServiceToken{}, fmt.Errorf("look up service token: %w", translate(err))
	}
	return t, nil
}

func (ts tokenStore) MarkServiceTokensUsed(ctx context.Context, ids []string, at time.Time) error {
	const query = `UPDATE metering.service_tokens SET last_use_time = greatest(last_use_time, $2) WHERE id = ANY ($1)`

	if _, err := ts.s.pool.Exec(ctx, query, ids, at); err != nil {
		return fmt.Errorf("mark service tokens used: %w", translate(err))
	}
	return nil
}
