// Package principal carries the authenticated caller of an RPC in its
// context, so handlers read who acts without knowing how they were
// authenticated.
package principal

import (
	"context"
	"slices"
)

// Kind is the kind of caller.
type Kind int

// The kinds of caller. The zero value is Anonymous: no credential was checked.
const (
	Anonymous Kind = iota
	// User is an end user authenticated by a JWT.
	User
	// Service is a runtime worker or internal service holding a service token.
	Service
	// Operator is a platform admin.
	Operator
)

// Principal is the caller of an RPC.
type Principal struct {
	Kind Kind
	// UserID is the JWT subject of a user or operator.
	UserID string
	// Role is a user's role within AccountID, such as "member" or "admin".
	// It is empty for services and operators.
	Role string
	// TokenID identifies the service token of a service.
	TokenID string
	// AgentID is the agent a runtime worker's token is bound to, if any.
	AgentID string
	// AccountID is the account the principal is bound to; empty means all
	// accounts.
	AccountID string
	// Scopes are the service token's scopes.
	Scopes []string
}

// Actor returns how the ledger names the principal: "user:ID",
// "token:ID", "token:ID/agent:ID", "operator:ID" or "anonymous".
func (p Principal) Actor() string {
	switch p.Kind {
	case User:
		return "user:" + p.UserID
	case Operator:
		return "operator:" + p.UserID
	case Service:
		if p.AgentID != "" {
			return "token:" + p.TokenID + "/agent:" + p.AgentID
		}
		return "token:" + p.TokenID
	default:
		return "anonymous"
	}
}

// BoundToAccount reports whether the principal may act on one account only,
// the one in AccountID. Operators and all-accounts service tokens are not
// bound.
func (p Principal) BoundToAccount() bool {
	return p.AccountID != ""
}

// HasScope reports whether the principal's scopes include scope.
func (p Principal) HasScope(scope string) bool {
	return slices.Contains(p.Scopes, scope)
}

type contextKey struct{}

// NewContext returns a copy of ctx that carries p.
func NewContext(ctx context.Context, p Principal) context.Context {
	return context.WithValue(ctx, contextKey{}, p)
}

// FromContext returns the principal in ctx, or the anonymous principal and
// false when there is none.
func FromContext(ctx context.Context) (Principal, bool) {
	p, ok := ctx.Value(contextKey{}).(Principal)
	return p, ok
}
