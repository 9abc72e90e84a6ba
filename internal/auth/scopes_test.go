package auth

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestPolicyValidateWithScopesAcceptsOwnScopes(t *testing.T) {
	t.Parallel()

	policy := Policy{
		"/authtest.Test/Write": {Scopes: []string{"workspace:write"}, OwnAccount: true},
	}

	require.NoError(t, policy.ValidateWithScopes([]string{"workspace:write"}))

	err := policy.Validate()
	assert.ErrorContains(t, err, `rule for /authtest.Test/Write: scope "workspace:write" is unknown; scopes are admin, usage:read, usage:write`)

	err = policy.ValidateWithScopes([]string{"workspace:read"})
	assert.ErrorContains(t, err, `scope "workspace:write" is unknown; scopes are workspace:read`)
}
