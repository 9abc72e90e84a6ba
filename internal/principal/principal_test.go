package principal

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestActorNamesEachKind(t *testing.T) {
	t.Parallel()

	tests := []struct {
		name      string
		principal Principal
		want      string
	}{
		{"user", Principal{Kind: User, UserID: "u1", AccountID: "a1", Role: "member"}, "user:u1"},
		{"operator", Principal{Kind: Operator, UserID: "op1"}, "operator:op1"},
		{"service", Principal{Kind: Service, TokenID: "t1"}, "token:t1"},
		{"service with agent", Principal{Kind: Service, TokenID: "t1", AgentID: "ag1"}, "token:t1/agent:ag1"},
		{"anonymous", Principal{}, "anonymous"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			assert.Equal(t, tt.want, tt.principal.Actor())
		})
	}
}

func TestBoundToAccountAndScopes(t *testing.T) {
	t.Parallel()

	worker := Principal{Kind: Service, AccountID: "a1", Scopes: []string{"usage:write"}}
	service := Principal{Kind: Service, Scopes: []string{"usage:read"}}

	assert.True(t, worker.BoundToAccount())
	assert.False(t, service.BoundToAccount())
	assert.True(t, worker.HasScope("usage:write"))
	assert.False(t, worker.HasScope("usage:read"))
	assert.False(t, Principal{}.HasScope(""))
}

func TestContextRoundTrip(t *testing.T) {
	t.Parallel()

	_, ok := FromContext(context.Background())
	assert.False(t, ok)

	p := Principal{Kind: User, UserID: "u1", AccountID: "a1", Role: "admin"}
	got, ok := FromContext(NewContext(context.Background(), p))
	assert.True(t, ok)
	assert.Equal(t, p, got)
}
