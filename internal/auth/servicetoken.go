package auth

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/metering/metering/internal/principal"
)

// ServiceTokenPrefix starts every service token, so that a leaked token is
// easy to recognise, for example by secret scanners.
const ServiceTokenPrefix = "mst_"

// serviceTokenRandomBytes is the number of random bytes in a service token:
// 256 bits.
const serviceTokenRandomBytes = 32

// ServiceTokenLength is the length of a service token in bytes: the prefix
// and 43 base64url characters without padding (6 bits per character).
const ServiceTokenLength = len(ServiceTokenPrefix) + (serviceTokenRandomBytes*8+5)/6

// Scopes of service tokens.
const (
	// ScopeUsageRead allows reading usage.
	ScopeUsageRead = "usage:read"
	// ScopeUsageWrite allows reserving, committing, releasing, recording
	// and deleting usage.
	ScopeUsageWrite = "usage:write"
	// ScopeAdmin allows the admin RPCs.
	ScopeAdmin = "admin"
)

// Scopes returns every scope a service token may have, sorted.
func Scopes() []string {
	return []string{ScopeAdmin, ScopeUsageRead, ScopeUsageWrite}
}

// Timeouts of the calls to the TokenStore. Config.TokenCacheTTL bounds
// each LookupServiceToken call.
const (
	// lastUsedFlushTimeout bounds one MarkServiceTokensUsed call.
	lastUsedFlushTimeout = 5 * time.Second
	// storeErrorLogInterval is the shortest time between two log records
	// of failed TokenStore calls, so that an outage does not flood the log.
	storeErrorLogInterval = 10 * time.Second
)

// ServiceToken is a service token as the TokenStore returns it. The
// plaintext is not part of it: the store keeps only its SHA-256 hash.
type ServiceToken struct {
	// ID identifies the token in the store, in the ledger and in logs.
	ID string
	// AccountID is the one account the token may act on. Empty means all
	// accounts, as for an internal service.
	AccountID string
	// AgentID is the agent a runtime worker's token is bound to, or empty.
	AgentID string
	// Scopes are the token's scopes, such as ScopeUsageWrite.
	Scopes []string
	// Revoked marks a token that must no longer be accepted.
	Revoked bool
}

// ErrTokenNotFound is returned by TokenStore.LookupServiceToken when no
// token has the hash.
var ErrTokenNotFound = errors.New("service token not found")

// TokenStore looks up service tokens by hash and records their use. Its
// methods must be safe for concurrent use.
type TokenStore interface {
	// LookupServiceToken returns the token whose SHA-256 hash is hash, or
	// an error wrapping ErrTokenNotFound when there is none. Revoked
	// tokens are returned with Revoked set. Any other error means the
	// lookup failed, and the call gets Unavailable. The deadline of ctx is
	// Config.TokenCacheTTL after the lookup started, and a result returned
	// after it is discarded.
	LookupServiceToken(ctx context.Context, hash [32]byte) (ServiceToken, error)
	// MarkServiceTokensUsed sets the last-used time of the tokens with the
	// given ids to at.
	MarkServiceTokensUsed(ctx context.Context, ids []string, at time.Time) error
}

// GenerateServiceToken returns a new service token and its SHA-256 hash.
// The token is ServiceTokenPrefix followed by 256 bits from crypto/rand in
// base64url without padding. Store only the hash, and show the plaintext
// once, to the caller that requested the token.
func GenerateServiceToken() (plaintext string, hash [32]byte, err error) {
	random := make([]byte, serviceTokenRandomBytes)
	if _, err := rand.Read(random); err != nil {
		return "", [32]byte{}, fmt.Errorf("generate service token: %w", err)
	}

	plaintext = ServiceTokenPrefix + base64.RawURLEncoding.EncodeToString(random)

	return plaintext, HashServiceToken(plaintext), nil
}

// HashServiceToken returns the SHA-256 hash of the whole token string,
// prefix included. A plain hash is enough, without salt or a slow hash,
// because the token has 256 random bits.
func HashServiceToken(plaintext string) [32]byte {
	return sha256.Sum256([]byte(plaintext))
}

// wellFormedServiceToken reports whether s has the shape of a token from
// GenerateServiceToken.
func wellFormedServiceToken(s string) bool {
	if len(s) != ServiceTokenLength || !strings.HasPrefix(s, ServiceTokenPrefix) {
		return false
	}

	random, err := base64.RawURLEncoding.Strict().DecodeString(s[len(ServiceTokenPrefix):])

	return err == nil && len(random) == serviceTokenRandomBytes
}

// tokenLookup is a cached TokenStore result, found or not.
type tokenLookup struct {
	token ServiceToken
	found bool
	// checkedAt is when the lookup started, on the monotonic clock. The
	// store read the token after that, so a result is used only while it
	// is younger than the cache TTL.
	checkedAt time.Time
}

// errTokenLookupTimeout is the error of a TokenStore lookup that took the
// cache TTL or longer.
var errTokenLookupTimeout = errors.New("service token lookup timed out")

// authenticateServiceToken verifies a service token and returns ctx with
// its principal.
func (a *Authenticator) authenticateServiceToken(ctx context.Context, plaintext string) (context.Context, error) {
	if a.cfg.Tokens == nil {
		return nil, status.Error(codes.Unauthenticated, "service tokens are not accepted by this server; use a JWT")
	}
	if !wellFormedServiceToken(plaintext) {
		return nil, status.Errorf(codes.Unauthenticated,
			"%s metadata is malformed: a service token is %q followed by 43 base64url characters", MetadataServiceToken, ServiceTokenPrefix)
	}

	lookup, err := a.lookupServiceToken(ctx, HashServiceToken(plaintext))
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, status.FromContextError(ctxErr).Err()
		}
		if errors.Is(err, errTokenLookupTimeout) {
			return nil, status.Errorf(codes.Unavailable,
				"service token cannot be checked: the token store lookup timed out after %s; retry later", a.cfg.TokenCacheTTL)
		}

		return nil, status.Error(codes.Unavailable, "service token cannot be checked: the token store is unavailable; retry later")
	}
	if !lookup.found {
		return nil, status.Error(codes.Unauthenticated, "service token not found")
	}
	if lookup.token.Revoked {
		return nil, status.Errorf(codes.Unauthenticated, "service token %s is revoked", lookup.token.ID)
	}

	a.markUsed(lookup.token.ID)

	return principal.NewContext(ctx, principal.Principal{
		Kind:      principal.Service,
		TokenID:   lookup.token.ID,
		AgentID:   lookup.token.AgentID,
		AccountID: lookup.token.AccountID,
		Scopes:    slices.Clone(lookup.token.Scopes),
	}), nil
}

// lookupServiceToken returns the cached lookup of hash when it is younger
// than the cache TTL. Otherwise it calls the TokenStore, once for all
// concurrent calls with the same hash. A call that joins a lookup in flight
// gets its result, which is younger than the cache TTL because the lookup
// has that deadline. Store errors are not cached.
func (a *Authenticator) lookupServiceToken(ctx context.Context, hash [32]byte) (tokenLookup, error) {
	if cached, ok := a.cache.Get(hash); ok && a.fresh(cached) {
		return cached, nil
	}

	results := a.flight.DoChan(string(hash[:]), func() (any, error) {
		return a.fetchServiceToken(context.WithoutCancel(ctx), hash)
	})

	select {
	case result := <-results:
		if result.Err != nil {
			return tokenLookup{}, result.Err
		}
		lookup := result.Val.(tokenLookup)
		if !a.fresh(lookup) {
			return tokenLookup{}, errTokenLookupTimeout
		}

		return lookup, nil
	case <-ctx.Done():
		return tokenLookup{}, ctx.Err()
	}
}

// fresh reports whether lookup started less than the cache TTL ago.
func (a *Authenticator) fresh(lookup tokenLookup) bool {
	return time.Since(lookup.checkedAt) < a.cfg.TokenCacheTTL
}

// fetchServiceToken looks up hash in the TokenStore and caches the result.
// The lookup has the cache TTL as its deadline, so that no call waits on it
// longer than that: a result that comes later is discarded, not cached, and
// the calls get errTokenLookupTimeout.
func (a *Authenticator) fetchServiceToken(ctx context.Context, hash [32]byte) (tokenLookup, error) {
	lookup := tokenLookup{checkedAt: time.Now()}
	ctx, cancel := context.WithDeadline(ctx, lookup.checkedAt.Add(a.cfg.TokenCacheTTL))
	defer cancel()

	token, err := a.cfg.Tokens.LookupServiceToken(ctx, hash)
	if !a.fresh(lookup) || errors.Is(err, context.DeadlineExceeded) {
		// The store may have read the token before a revocation that is
		// now older than the TTL, so even a late success is discarded.
		a.lookupErrorLog.Do(func() {
			a.cfg.Logger.WarnContext(ctx, "service token lookup timed out; repeats within the log interval are not logged",
				"timeout", a.cfg.TokenCacheTTL, "error", err, "log_interval", storeErrorLogInterval)
		})

		return tokenLookup{}, errTokenLookupTimeout
	}

	switch {
	case errors.Is(err, ErrTokenNotFound):
		lookup.found = false
	case err != nil:
		a.lookupErrorLog.Do(func() {
			a.cfg.Logger.WarnContext(ctx, "service token lookup failed; repeats within the log interval are not logged",
				"error", err, "log_interval", storeErrorLogInterval)
		})

		return tokenLookup{}, fmt.Errorf("look up service token: %w", err)
	default:
		token.Scopes = slices.Clone(token.Scopes)
		lookup.token = token
		lookup.found = true
	}

	a.cache.Add(hash, lookup)

	return lookup, nil
}

// markUsed queues the token id for the next last-used flush. It takes only
// a mutex, which no store call holds.
func (a *Authenticator) markUsed(id string) {
	a.mu.Lock()
	defer a.mu.Unlock()

	a.lastUsed[id] = struct{}{}
}

// Run writes the last-used times of the service tokens used since the last
// write, every Config.LastUsedFlushInterval, in one MarkServiceTokensUsed
// call. The times are those of the writes, so they lag the calls by up to
// one interval. Run returns when ctx is done, after a final write bounded
// by a 5 s timeout. A failed write is logged and its ids are retried with
// the next one. Call Run once per Authenticator.
func (a *Authenticator) Run(ctx context.Context) {
	if a.cfg.Tokens == nil {
		<-ctx.Done()
		return
	}

	ticker := time.NewTicker(a.cfg.LastUsedFlushInterval)
	defer ticker.Stop()

	for {
		select {
		case <-ctx.Done():
			a.flushLastUsed(context.WithoutCancel(ctx))
			return
		case <-ticker.C:
			a.flushLastUsed(ctx)
		}
	}
}

// flushLastUsed writes the queued last-used ids and queues them again when
// the write fails.
func (a *Authenticator) flushLastUsed(ctx context.Context) {
	a.mu.Lock()
	if len(a.lastUsed) == 0 {
		a.mu.Unlock()
		return
	}
	ids := slices.Sorted(maps.Keys(a.lastUsed))
	a.lastUsed = make(map[string]struct{}, len(ids))
	a.mu.Unlock()

	ctx, cancel := context.WithTimeout(ctx, lastUsedFlushTimeout)
	defer cancel()

	err := a.cfg.Tokens.MarkServiceTokensUsed(ctx, ids, a.cfg.Now())
	if err == nil {
		return
	}

	a.flushErrorLog.Do(func() {
		a.cfg.Logger.WarnContext(ctx, "write service token last-used times failed; repeats within the log interval are not logged",
			"error", err, "token_count", len(ids), "log_interval", storeErrorLogInterval)
	})

	a.mu.Lock()
	defer a.mu.Unlock()
	for _, id := range ids {
		a.lastUsed[id] = struct{}{}
	}
}
