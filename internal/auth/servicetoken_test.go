package auth

import (
	"context"
	"crypto/sha256"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/metering/metering/internal/principal"
)

func TestGenerateServiceTokenFormat(t *testing.T) {
	t.Parallel()

	seen := make(map[string]bool)
	for range 100 {
		plaintext, hash, err := GenerateServiceToken()
		require.NoError(t, err)

		assert.True(t, strings.HasPrefix(plaintext, ServiceTokenPrefix))
		assert.Len(t, plaintext, 47)
		assert.Equal(t, ServiceTokenLength, len(plaintext))
		assert.True(t, wellFormedServiceToken(plaintext))
		assert.Equal(t, sha256.Sum256([]byte(plaintext)), hash)
		assert.Equal(t, hash, HashServiceToken(plaintext))
		assert.False(t, seen[plaintext], "token repeated")
		seen[plaintext] = true
	}
}

func TestAuthenticateServiceToken(t *testing.T) {
	t.Parallel()

	store := newMemTokenStore()
	worker := store.issue(t, ServiceToken{ID: "tok-worker", AccountID: ownAccount, AgentID: "agent-1", Scopes: []string{ScopeUsageWrite}})
	a := newTestAuthenticator(t, testConfig(t, store))

	ctx, err := a.Authenticate(incoming(MetadataServiceToken, worker))
	require.NoError(t, err)

	got, ok := principal.FromContext(ctx)
	require.True(t, ok)
	assert.Equal(t, principal.Principal{
		Kind:      principal.Service,
		TokenID:   "tok-worker",
		AgentID:   "agent-1",
		AccountID: ownAccount,
		Scopes:    []string{ScopeUsageWrite},
	}, got)
	assert.Equal(t, "token:tok-worker/agent:agent-1", got.Actor())

	// The cache serves the second call.
	_, err = a.Authenticate(incoming(MetadataServiceToken, worker))
	require.NoError(t, err)
	assert.Equal(t, 1, store.lookupCount())
}

func TestAuthenticateServiceTokenMalformedSkipsLookup(t *testing.T) {
	t.Parallel()

	store := newMemTokenStore()
	a := newTestAuthenticator(t, testConfig(t, store))
	valid, _, err := GenerateServiceToken()
	require.NoError(t, err)

	tests := []struct {
		name  string
		token string
	}{
		{"empty", ""},
		{"wrong prefix", "xyz_" + valid[len(ServiceTokenPrefix):]},
		{"no prefix", valid[len(ServiceTokenPrefix):]},
		{"too short", valid[:len(valid)-1]},
		{"too long", valid + "A"},
		{"not base64url", valid[:len(valid)-1] + "+"},
		{"padding", valid[:len(valid)-1] + "="},
		{"surrounding space", " " + valid[1:]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := a.Authenticate(incoming(MetadataServiceToken, tt.token))

			assert.Equal(t, codes.Unauthenticated, status.Code(err))
			assert.Contains(t, status.Convert(err).Message(), "malformed")
			if tt.token != "" {
				assert.NotContains(t, status.Convert(err).Message(), tt.token)
			}
		})
	}
	assert.Equal(t, 0, store.lookupCount())
}

func TestAuthenticateServiceTokenUnknownCached(t *testing.T) {
	t.Parallel()

	store := newMemTokenStore()
	a := newTestAuthenticator(t, testConfig(t, store))
	unknown, _, err := GenerateServiceToken()
	require.NoError(t, err)

	for range 3 {
		_, err := a.Authenticate(incoming(MetadataServiceToken, unknown))
		assert.Equal(t, codes.Unauthenticated, status.Code(err))
		assert.Contains(t, status.Convert(err).Message(), "service token not found")
		assert.NotContains(t, status.Convert(err).Message(), unknown)
	}
	assert.Equal(t, 1, store.lookupCount())
}

// TestAuthenticateServiceTokenRevokedWithinTTL checks that a revoked token
// keeps working from the cache and stops within TokenCacheTTL.
func TestAuthenticateServiceTokenRevokedWithinTTL(t *testing.T) {
	t.Parallel()

	store := newMemTokenStore()
	token := store.issue(t, ServiceToken{ID: "tok-revoked", AccountID: ownAccount, Scopes: []string{ScopeUsageWrite}})
	a := newTestAuthenticator(t, testConfig(t, store))

	firstCall := time.Now()
	_, err := a.Authenticate(incoming(MetadataServiceToken, token))
	require.NoError(t, err)

	store.revoke("tok-revoked")

	_, err = a.Authenticate(incoming(MetadataServiceToken, token))
	if time.Since(firstCall) < testCacheTTL {
		assert.NoError(t, err, "within the TTL the cached lookup is used")
	}

	time.Sleep(testCacheTTL)
	_, err = a.Authenticate(incoming(MetadataServiceToken, token))
	assert.Equal(t, codes.Unauthenticated, status.Code(err))
	assert.Contains(t, status.Convert(err).Message(), "service token tok-revoked is revoked")
}

func TestAuthenticateServiceTokenStoreDown(t *testing.T) {
	t.Parallel()

	store := newMemTokenStore()
	token := store.issue(t, ServiceToken{ID: "tok-1", Scopes: []string{ScopeUsageRead}})
	a := newTestAuthenticator(t, testConfig(t, store))
	store.setLookupFn(func(context.Context) error { return errors.New("connection refused") })

	_, err := a.Authenticate(incoming(MetadataServiceToken, token))
	assert.Equal(t, codes.Unavailable, status.Code(err))
	assert.NotContains(t, status.Convert(err).Message(), "connection refused")

	// Errors are not cached, so the next call looks the token up again.
	store.setLookupFn(nil)
	_, err = a.Authenticate(incoming(MetadataServiceToken, token))
	require.NoError(t, err)
	assert.Equal(t, 2, store.lookupCount())
}

func TestAuthenticateServiceTokenCallCancelled(t *testing.T) {
	t.Parallel()

	store := newMemTokenStore()
	token := store.issue(t, ServiceToken{ID: "tok-1", Scopes: []string{ScopeUsageRead}})
	a := newTestAuthenticator(t, testConfig(t, store))
	release := make(chan struct{})
	defer close(release)
	store.setLookupFn(func(ctx context.Context) error {
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})

	ctx, cancel := context.WithTimeout(incoming(MetadataServiceToken, token), 50*time.Millisecond)
	defer cancel()

	_, err := a.Authenticate(ctx)
	assert.Equal(t, codes.DeadlineExceeded, status.Code(err))
}

// TestAuthenticateServiceTokenSharedLookup checks that concurrent calls
// with an uncached token share one store lookup.
func TestAuthenticateServiceTokenSharedLookup(t *testing.T) {
	t.Parallel()

	store := newMemTokenStore()
	token := store.issue(t, ServiceToken{ID: "tok-1", Scopes: []string{ScopeUsageRead}})
	cfg := testConfig(t, store)
	// The lookup must end within the TTL, so the test gives it the most.
	cfg.TokenCacheTTL = MaxTokenCacheTTL
	a := newTestAuthenticator(t, cfg)
	release := make(chan struct{})
	store.setLookupFn(func(context.Context) error {
		<-release
		return nil
	})

	const callers = 20
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for range callers {
		wg.Go(func() {
			_, err := a.Authenticate(incoming(MetadataServiceToken, token))
			errs <- err
		})
	}
	require.Eventually(t, func() bool { return store.lookupCount() >= 1 }, time.Second, time.Millisecond)
	time.Sleep(20 * time.Millisecond) // lets the other callers join the lookup
	close(release)
	wg.Wait()
	close(errs)

	for err := range errs {
		assert.NoError(t, err)
	}
	assert.Equal(t, 1, store.lookupCount())
}

func TestAuthenticateServiceTokenNotAccepted(t *testing.T) {
	t.Parallel()

	a := newTestAuthenticator(t, testConfig(t, nil))
	token, _, err := GenerateServiceToken()
	require.NoError(t, err)

	_, err = a.Authenticate(incoming(MetadataServiceToken, token))
	assert.Equal(t, codes.Unauthenticated, status.Code(err))
	assert.Contains(t, status.Convert(err).Message(), "service tokens are not accepted")
}

func TestRunFlushesLastUsed(t *testing.T) {
	t.Parallel()

	store := newMemTokenStore()
	first := store.issue(t, ServiceToken{ID: "tok-1", Scopes: []string{ScopeUsageRead}})
	second := store.issue(t, ServiceToken{ID: "tok-2", Scopes: []string{ScopeUsageRead}})
	a := newTestAuthenticator(t, testConfig(t, store))

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		a.Run(ctx)
		close(done)
	}()

	for _, token := range []string{first, second, first} {
		_, err := a.Authenticate(incoming(MetadataServiceToken, token))
		require.NoError(t, err)
	}

	require.Eventually(t, func() bool {
		_, firstMarked := store.markedAt("tok-1")
		_, secondMarked := store.markedAt("tok-2")
		return firstMarked && secondMarked
	}, time.Second, testFlushTick)
	at, _ := store.markedAt("tok-1")
	assert.Equal(t, testNow, at)

	cancel()
	select {
	case <-done:
	case <-time.After(time.Second):
		t.Fatal("Run did not return after its context was cancelled")
	}
}

func TestRunFinalFlushOnCancel(t *testing.T) {
	t.Parallel()

	store := newMemTokenStore()
	token := store.issue(t, ServiceToken{ID: "tok-final", Scopes: []string{ScopeUsageRead}})
	cfg := testConfig(t, store)
	cfg.LastUsedFlushInterval = time.Hour
	a := newTestAuthenticator(t, cfg)

	_, err := a.Authenticate(incoming(MetadataServiceToken, token))
	require.NoError(t, err)

	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	a.Run(ctx)

	_, marked := store.markedAt("tok-final")
	assert.True(t, marked)
}

func TestRunRetriesFailedFlush(t *testing.T) {
	t.Parallel()

	store := newMemTokenStore()
	token := store.issue(t, ServiceToken{ID: "tok-retry", Scopes: []string{ScopeUsageRead}})
	a := newTestAuthenticator(t, testConfig(t, store))
	store.setMarkErr(errors.New("database is down"))

	_, err := a.Authenticate(incoming(MetadataServiceToken, token))
	require.NoError(t, err)

	a.flushLastUsed(t.Context())
	_, marked := store.markedAt("tok-retry")
	require.False(t, marked)

	store.setMarkErr(nil)
	a.flushLastUsed(t.Context())
	_, marked = store.markedAt("tok-retry")
	assert.True(t, marked)
}

// TestAuthenticateServiceTokenSlowLookup checks the revocation bound when a
// lookup is slow: the store reads the token, the token is revoked, and the
// store returns only after TokenCacheTTL. The stale result must be neither
// accepted nor cached, whether or not the store stops at its deadline.
func TestAuthenticateServiceTokenSlowLookup(t *testing.T) {
	t.Parallel()

	tests := []struct {
		name        string
		honorsCtx   bool
		maxDuration time.Duration
	}{
		{"store stops at its deadline", true, testCacheTTL + 150*time.Millisecond},
		{"store ignores its deadline", false, 3*testCacheTTL + 150*time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			store := newMemTokenStore()
			token := store.issue(t, ServiceToken{ID: "tok-slow", AccountID: ownAccount, Scopes: []string{ScopeUsageWrite}})
			a := newTestAuthenticator(t, testConfig(t, store))

			read := make(chan struct{}, 1)
			store.setReadFn(func(ctx context.Context) error {
				read <- struct{}{}
				delay := time.NewTimer(3 * testCacheTTL)
				defer delay.Stop()
				if tt.honorsCtx {
					select {
					case <-ctx.Done():
						return ctx.Err()
					case <-delay.C:
						return nil
					}
				}
				<-delay.C
				return nil
			})

			type result struct {
				err     error
				elapsed time.Duration
			}
			results := make(chan result, 2)
			authenticate := func() {
				start := time.Now()
				_, err := a.Authenticate(incoming(MetadataServiceToken, token))
				results <- result{err, time.Since(start)}
			}

			go authenticate()
			<-read
			store.revoke("tok-slow")
			go authenticate() // joins the lookup in flight

			for range 2 {
				r := <-results
				assert.Equal(t, codes.Unavailable, status.Code(r.err))
				assert.Contains(t, status.Convert(r.err).Message(), "token store lookup timed out after 200ms")
				assert.Less(t, r.elapsed, tt.maxDuration)
			}

			store.setReadFn(nil)
			_, err := a.Authenticate(incoming(MetadataServiceToken, token))
			assert.Equal(t, codes.Unauthenticated, status.Code(err), "the slow answer must not be cached")
			assert.Contains(t, status.Convert(err).Message(), "service token tok-slow is revoked")
			assert.Equal(t, 2, store.lookupCount())
		})
	}
}
