package auth

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/metering/metering/internal/principal"
)

func TestConfigValidate(t *testing.T) {
	t.Parallel()

	keys := loadTestKeys(t)
	store := newMemTokenStore()

	tests := []struct {
		name   string
		cfg    Config
		errors []string
	}{
		{"HS256 only", Config{Issuer: testIssuer, Audience: testAudience, HS256Secret: testSecret}, nil},
		{"JWKS only", Config{Issuer: testIssuer, Audience: testAudience, JWKS: keys.jwks}, nil},
		{"tokens only", Config{Tokens: store}, nil},
		{"maximum values", Config{Tokens: store, Leeway: MaxLeeway, TokenCacheTTL: MaxTokenCacheTTL}, nil},
		{"nothing accepted", Config{}, []string{"no credential is accepted"}},
		{"no issuer or audience", Config{HS256Secret: testSecret},
			[]string{"Issuer is required", "Audience is required"}},
		{"short secret", Config{Issuer: testIssuer, Audience: testAudience, HS256Secret: []byte("short")},
			[]string{"HS256Secret has 5 bytes; it must have at least 32"}},
		{"bad JWKS", Config{Issuer: testIssuer, Audience: testAudience, JWKS: []byte("{")},
			[]string{"JWKS is invalid"}},
		{"out of range", Config{Tokens: store, Leeway: MaxLeeway + time.Second, TokenCacheTTL: MaxTokenCacheTTL + time.Second,
			TokenCacheSize: -1, LastUsedFlushInterval: -time.Second},
			[]string{"Leeway is 5m1s", "TokenCacheTTL is 6s", "TokenCacheSize is -1", "LastUsedFlushInterval is -1s"}},
		{"negative", Config{Tokens: store, Leeway: -time.Second, TokenCacheTTL: -time.Second},
			[]string{"Leeway is -1s", "TokenCacheTTL is -1s"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			err := tt.cfg.Validate()
			if len(tt.errors) == 0 {
				assert.NoError(t, err)
				return
			}

			require.Error(t, err)
			for _, want := range tt.errors {
				assert.ErrorContains(t, err, want)
			}
			_, newErr := New(tt.cfg)
			assert.Error(t, newErr)
		})
	}
}

func TestConfigPrintingMasksSecret(t *testing.T) {
	t.Parallel()

	cfg := testConfig(t, nil)
	var logged bytes.Buffer
	slog.New(slog.NewTextHandler(&logged, nil)).Info("config", "auth", cfg)

	for name, printed := range map[string]string{
		"%v":   fmt.Sprintf("%v", cfg),
		"%+v":  fmt.Sprintf("%+v", cfg),
		"%#v":  fmt.Sprintf("%#v", cfg),
		"%s":   fmt.Sprintf("%s", cfg),
		"slog": logged.String(),
	} {
		assert.NotContains(t, printed, string(testSecret), name)
		assert.Contains(t, printed, testIssuer, name)
	}
}

func TestAuthenticateCredentialShape(t *testing.T) {
	t.Parallel()

	store := newMemTokenStore()
	serviceToken := store.issue(t, ServiceToken{ID: "tok-1", AccountID: ownAccount, Scopes: []string{ScopeUsageRead}})
	a := newTestAuthenticator(t, testConfig(t, store))
	jwtToken, err := MintDevJWT(testSecret, testIssuer, testAudience,
		DevClaims{Subject: testUserID, AccountID: ownAccount, Role: RoleMember}, testNow, time.Hour)
	require.NoError(t, err)

	tests := []struct {
		name    string
		pairs   []string
		code    codes.Code
		message string
	}{
		{"no metadata", nil, codes.Unauthenticated, "missing credential"},
		{"both credentials", []string{MetadataAuthorization, "Bearer " + jwtToken, MetadataServiceToken, serviceToken},
			codes.Unauthenticated, "send exactly one credential"},
		{"authorization twice", []string{MetadataAuthorization, "Bearer " + jwtToken, MetadataAuthorization, "Bearer " + jwtToken},
			codes.Unauthenticated, "authorization metadata has 2 values"},
		{"service token twice", []string{MetadataServiceToken, serviceToken, MetadataServiceToken, serviceToken},
			codes.Unauthenticated, "x-service-token metadata has 2 values"},
		{"empty authorization", []string{MetadataAuthorization, ""}, codes.Unauthenticated, "must be \"Bearer <JWT>\""},
		{"basic scheme", []string{MetadataAuthorization, "Basic " + jwtToken}, codes.Unauthenticated, "must be \"Bearer <JWT>\""},
		{"no scheme", []string{MetadataAuthorization, jwtToken}, codes.Unauthenticated, "must be \"Bearer <JWT>\""},
		{"bearer without token", []string{MetadataAuthorization, "Bearer "}, codes.Unauthenticated, "is empty"},
		{"bearer with spaces only", []string{MetadataAuthorization, "Bearer    "}, codes.Unauthenticated, "is empty"},
		{"bearer lowercase", []string{MetadataAuthorization, "bearer " + jwtToken}, codes.OK, ""},
		{"bearer", []string{MetadataAuthorization, "Bearer " + jwtToken}, codes.OK, ""},
		{"service token", []string{MetadataServiceToken, serviceToken}, codes.OK, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			ctx, err := a.Authenticate(incoming(tt.pairs...))

			assert.Equal(t, tt.code, status.Code(err))
			if tt.code != codes.OK {
				message := status.Convert(err).Message()
				assert.Contains(t, message, tt.message)
				assert.NotContains(t, message, jwtToken)
				assert.NotContains(t, message, serviceToken)
				return
			}
			_, ok := principal.FromContext(ctx)
			assert.True(t, ok)
		})
	}
}

func TestAuthenticateJWTNotAccepted(t *testing.T) {
	t.Parallel()

	a := newTestAuthenticator(t, Config{Tokens: newMemTokenStore()})
	token, err := MintDevJWT(testSecret, testIssuer, testAudience,
		DevClaims{Subject: testUserID, AccountID: ownAccount, Role: RoleMember}, time.Now(), time.Hour)
	require.NoError(t, err)

	_, err = a.Authenticate(bearer(token))
	assert.Equal(t, codes.Unauthenticated, status.Code(err))
	assert.Contains(t, status.Convert(err).Message(), "JWTs are not accepted")
}

// TestLogsHoldNoSecrets runs authentications that log (failed lookups and
// last-used writes) with a debug logger and checks that no credential
// reaches the log.
func TestLogsHoldNoSecrets(t *testing.T) {
	t.Parallel()

	var logged bytes.Buffer
	store := newMemTokenStore()
	token := store.issue(t, ServiceToken{ID: "tok-1", Scopes: []string{ScopeUsageRead}})
	cfg := testConfig(t, store)
	cfg.Logger = slog.New(slog.NewTextHandler(&logged, &slog.HandlerOptions{Level: slog.LevelDebug}))
	a := newTestAuthenticator(t, cfg)
	jwtToken, err := MintDevJWT(testSecret, testIssuer, testAudience,
		DevClaims{Subject: testUserID, AccountID: ownAccount, Role: RoleMember}, testNow, time.Hour)
	require.NoError(t, err)

	_, err = a.Authenticate(bearer(jwtToken))
	require.NoError(t, err)
	_, err = a.Authenticate(bearer(jwtToken + "x"))
	require.Error(t, err)

	store.setLookupFn(func(context.Context) error { return errors.New("connection refused") })
	_, err = a.Authenticate(incoming(MetadataServiceToken, token))
	require.Equal(t, codes.Unavailable, status.Code(err))

	store.setLookupFn(nil)
	store.setMarkErr(errors.New("database is down"))
	_, err = a.Authenticate(incoming(MetadataServiceToken, token))
	require.NoError(t, err)
	a.flushLastUsed(t.Context())

	require.Contains(t, logged.String(), "service token lookup failed")
	require.Contains(t, logged.String(), "write service token last-used times failed")
	assert.NotContains(t, logged.String(), token)
	assert.NotContains(t, logged.String(), jwtToken)
	assert.NotContains(t, logged.String(), string(testSecret))
}
