// Package auth authenticates and authorizes the callers of a gRPC server.
//
// A call carries exactly one credential in its metadata:
//
//   - authorization: "Bearer <JWT>", for end users and operators. The JWT is
//     at most MaxJWTBytes long and signed with HS256 (a development secret)
//     or with RS256, ES256 or EdDSA (keys from a JWKS file). Its claims are
//     sub (the user id, required), iss and aud (checked against Config), exp
//     (required), nbf and iat (checked when present), and the claims named
//     by ClaimAccountID, ClaimRole and ClaimPlatformAdmin. Claim names are
//     case-sensitive and each claim must have its JSON type. A header with
//     crit, or with a typ other than JWT or at+jwt, is rejected.
//   - x-service-token: a service token issued by the server ("mst_" and 43
//     base64url characters), for runtime workers and internal services. The
//     server stores only its SHA-256 hash, through a TokenStore. A revoked
//     token is rejected by every call authenticated more than
//     Config.TokenCacheTTL after the revocation.
//
// Interceptors builds the unary and stream server interceptors: they reject
// methods that have no Rule in the Policy, authenticate every method whose
// Rule is not Public, and then check the Rule against the principal.
package auth

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/expirable"
	"golang.org/x/sync/singleflight"
	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/metering/metering/internal/principal"
)

// JWT claim names besides the registered ones (sub, iss, aud, exp, nbf, iat).
const (
	// ClaimAccountID is the string claim with the id of the account a user
	// belongs to. A user JWT must carry it.
	ClaimAccountID = "account_id"
	// ClaimRole is the string claim with the user's role in that account:
	// RoleMember or RoleAdmin. A user JWT must carry it.
	ClaimRole = "role"
	// ClaimPlatformAdmin is the boolean claim that marks an operator (a
	// platform admin) when true. An operator is bound to no account, so the
	// account_id and role claims of an operator JWT are ignored.
	ClaimPlatformAdmin = "platform_admin"
)

// User roles carried in the ClaimRole claim.
const (
	// RoleMember is a user who may read their account's data.
	RoleMember = "member"
	// RoleAdmin is a user who administers their account.
	RoleAdmin = "admin"
)

// Metadata keys of the two credentials. gRPC metadata keys are
// case-insensitive: grpc-go lowercases them on both sides.
const (
	// MetadataAuthorization carries "Bearer <JWT>".
	MetadataAuthorization = "authorization"
	// MetadataServiceToken carries a service token.
	MetadataServiceToken = "x-service-token"
)

// Defaults and limits of Config.
const (
	// DefaultLeeway is the clock skew allowed when checking exp, nbf and iat.
	DefaultLeeway = 30 * time.Second
	// MaxLeeway is the largest Config.Leeway accepted.
	MaxLeeway = 5 * time.Minute
	// DefaultTokenCacheTTL is the default Config.TokenCacheTTL.
	DefaultTokenCacheTTL = 2 * time.Second
	// MaxTokenCacheTTL is the largest Config.TokenCacheTTL accepted, and so
	// the longest a revoked service token can keep working.
	MaxTokenCacheTTL = 5 * time.Second
	// DefaultTokenCacheSize is the number of service token lookups cached.
	DefaultTokenCacheSize = 10_000
	// DefaultLastUsedFlushInterval is how often Run writes last-used times.
	DefaultLastUsedFlushInterval = time.Second
	// MinHS256SecretBytes is the shortest HS256 secret accepted: 256 bits,
	// the size of the HMAC-SHA-256 output.
	MinHS256SecretBytes = 32
	// MaxJWTBytes is the longest JWT accepted, in bytes. A longer
	// authorization value is rejected before it is parsed, so that a
	// caller without credentials cannot make the server decode large
	// tokens. A JWT with the claims of this package is far shorter.
	MaxJWTBytes = 8 << 10
)

// Config configures an Authenticator. The zero value of each optional field
// selects its default.
type Config struct {
	// Issuer is the required value of the iss claim. It is required when
	// HS256Secret or JWKS is set.
	Issuer string
	// Audience must be one of the values of the aud claim. It is required
	// when HS256Secret or JWKS is set.
	Audience string
	// HS256Secret is the HMAC key of HS256 JWTs, at least
	// MinHS256SecretBytes long. It is meant for development: every holder
	// of the secret can mint tokens. Empty disables HS256.
	HS256Secret []byte
	// JWKS is the content of a JWKS file with the public keys of RS256,
	// ES256 and EdDSA JWTs. Keys for other algorithms and encryption keys
	// are skipped with a warning, and symmetric keys are rejected. Empty
	// disables these algorithms.
	JWKS []byte
	// Leeway is the clock skew allowed when checking exp, nbf and iat.
	// Zero selects DefaultLeeway. The maximum is MaxLeeway.
	Leeway time.Duration
	// Tokens looks up service tokens. Nil rejects every service token.
	Tokens TokenStore
	// TokenCacheTTL bounds how long a revoked service token keeps working.
	// Authenticate accepts a service token only on a TokenStore lookup
	// that started less than TokenCacheTTL earlier. A cached lookup, found
	// or not, expires at that age, and a lookup that takes longer fails
	// with Unavailable and is not cached. So every call authenticated more
	// than TokenCacheTTL after a revocation is committed to the store
	// rejects the token. A stream authenticated before that keeps running.
	// Zero selects DefaultTokenCacheTTL. The maximum is MaxTokenCacheTTL.
	TokenCacheTTL time.Duration
	// TokenCacheSize is the number of lookups the cache keeps. Zero selects
	// DefaultTokenCacheSize.
	TokenCacheSize int
	// LastUsedFlushInterval is how often Run writes the last-used times of
	// service tokens. Zero selects DefaultLastUsedFlushInterval.
	LastUsedFlushInterval time.Duration
	// Now returns the current time, used to check JWT times and to stamp
	// last-used times. Nil selects time.Now. The token cache does not use
	// it: the expirable LRU reads time.Now itself, so cache ages are
	// measured on the monotonic clock.
	Now func() time.Time
	// Logger receives warnings about skipped JWKS keys and failed token
	// lookups and writes. Nil discards them.
	Logger *slog.Logger
}

// Validate checks c and returns every problem found, joined with
// errors.Join, or nil.
func (c Config) Validate() error {
	var errs []error

	jwtConfigured := len(c.HS256Secret) > 0 || len(c.JWKS) > 0
	if !jwtConfigured && c.Tokens == nil {
		errs = append(errs, errors.New("no credential is accepted: set HS256Secret or JWKS for JWTs, or Tokens for service tokens"))
	}
	if jwtConfigured && c.Issuer == "" {
		errs = append(errs, errors.New("Issuer is required when HS256Secret or JWKS is set"))
	}
	if jwtConfigured && c.Audience == "" {
		errs = append(errs, errors.New("Audience is required when HS256Secret or JWKS is set"))
	}
	if len(c.HS256Secret) > 0 && len(c.HS256Secret) < MinHS256SecretBytes {
		errs = append(errs, fmt.Errorf("HS256Secret has %d bytes; it must have at least %d", len(c.HS256Secret), MinHS256SecretBytes))
	}
	if len(c.JWKS) > 0 {
		if _, err := parseJWKS(c.JWKS); err != nil {
			errs = append(errs, fmt.Errorf("JWKS is invalid: %w", err))
		}
	}
	if c.Leeway < 0 || c.Leeway > MaxLeeway {
		errs = append(errs, fmt.Errorf("Leeway is %s; it must be between 0 and %s", c.Leeway, MaxLeeway))
	}
	if c.TokenCacheTTL < 0 || c.TokenCacheTTL > MaxTokenCacheTTL {
		errs = append(errs, fmt.Errorf("TokenCacheTTL is %s; it must be between 0 and %s", c.TokenCacheTTL, MaxTokenCacheTTL))
	}
	if c.TokenCacheSize < 0 {
		errs = append(errs, fmt.Errorf("TokenCacheSize is %d; it must not be negative", c.TokenCacheSize))
	}
	if c.LastUsedFlushInterval < 0 {
		errs = append(errs, fmt.Errorf("LastUsedFlushInterval is %s; it must not be negative", c.LastUsedFlushInterval))
	}

	return errors.Join(errs...)
}

// withDefaults returns c with every zero optional field set to its default.
func (c Config) withDefaults() Config {
	if c.Leeway == 0 {
		c.Leeway = DefaultLeeway
	}
	if c.TokenCacheTTL == 0 {
		c.TokenCacheTTL = DefaultTokenCacheTTL
	}
	if c.TokenCacheSize == 0 {
		c.TokenCacheSize = DefaultTokenCacheSize
	}
	if c.LastUsedFlushInterval == 0 {
		c.LastUsedFlushInterval = DefaultLastUsedFlushInterval
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}

	return c
}

// String returns the settings of c with the HS256 secret masked, so that
// printing a Config never prints the secret.
func (c Config) String() string {
	return fmt.Sprintf("auth.Config{Issuer:%q Audience:%q HS256Secret:%s JWKS:%d bytes Leeway:%s Tokens:%t TokenCacheTTL:%s TokenCacheSize:%d LastUsedFlushInterval:%s}",
		c.Issuer, c.Audience, maskSecret(c.HS256Secret), len(c.JWKS), c.Leeway, c.Tokens != nil,
		c.TokenCacheTTL, c.TokenCacheSize, c.LastUsedFlushInterval)
}

// GoString masks the HS256 secret for the %#v verb, as String does.
func (c Config) GoString() string {
	return c.String()
}

// LogValue masks the HS256 secret when c is logged with slog.
func (c Config) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("issuer", c.Issuer),
		slog.String("audience", c.Audience),
		slog.String("hs256_secret", maskSecret(c.HS256Secret)),
		slog.Int("jwks_bytes", len(c.JWKS)),
		slog.Duration("leeway", c.Leeway),
		slog.Bool("service_tokens", c.Tokens != nil),
		slog.Duration("token_cache_ttl", c.TokenCacheTTL),
	)
}

func maskSecret(secret []byte) string {
	if len(secret) == 0 {
		return "unset"
	}

	return "[redacted]"
}

// Authenticator verifies the credential of a call and puts the principal in
// the call's context. It is safe for concurrent use.
type Authenticator struct {
	cfg    Config
	jwt    *jwtVerifier // nil when no JWT key is configured
	cache  *expirable.LRU[[32]byte, tokenLookup]
	flight singleflight.Group

	// lookupErrorLog and flushErrorLog limit the log records of failed
	// TokenStore calls.
	lookupErrorLog *rate.Sometimes
	flushErrorLog  *rate.Sometimes

	mu       sync.Mutex
	lastUsed map[string]struct{} // ids of tokens used since the last flush
}

// New validates cfg and returns an Authenticator. Call Run to write the
// last-used times of service tokens.
func New(cfg Config) (*Authenticator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid auth config: %w", err)
	}
	cfg = cfg.withDefaults()

	a := &Authenticator{
		cfg:            cfg,
		lastUsed:       make(map[string]struct{}),
		lookupErrorLog: &rate.Sometimes{Interval: storeErrorLogInterval},
		flushErrorLog:  &rate.Sometimes{Interval: storeErrorLogInterval},
	}

	if len(cfg.HS256Secret) > 0 || len(cfg.JWKS) > 0 {
		verifier, err := newJWTVerifier(cfg)
		if err != nil {
			return nil, err
		}
		a.jwt = verifier
	}

	if cfg.Tokens != nil {
		// NOTE: expirable.NewLRU v2.0.7 starts a goroutine that removes
		// expired entries and never stops, so each Authenticator keeps one.
		a.cache = expirable.NewLRU[[32]byte, tokenLookup](cfg.TokenCacheSize, nil, cfg.TokenCacheTTL)
	}

	return a, nil
}

// Authenticate reads the one credential in the incoming metadata of ctx,
// verifies it and returns ctx with the principal (see principal.NewContext).
// It has the type of the go-grpc-middleware auth.AuthFunc.
//
// It returns a status error: Unauthenticated when the credential is missing,
// repeated, too long, malformed, invalid, expired or revoked, and
// Unavailable when the token store lookup fails or times out after
// Config.TokenCacheTTL. Messages name the failed check and never contain
// the credential.
func (a *Authenticator) Authenticate(ctx context.Context) (context.Context, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	authorization := md.Get(MetadataAuthorization)
	serviceTokens := md.Get(MetadataServiceToken)

	switch {
	case len(authorization) > 0 && len(serviceTokens) > 0:
		return nil, status.Errorf(codes.Unauthenticated,
			"both %s and %s metadata are set; send exactly one credential", MetadataAuthorization, MetadataServiceToken)
	case len(authorization) > 1:
		return nil, status.Errorf(codes.Unauthenticated,
			"%s metadata has %d values; send exactly one", MetadataAuthorization, len(authorization))
	case len(serviceTokens) > 1:
		return nil, status.Errorf(codes.Unauthenticated,
			"%s metadata has %d values; send exactly one", MetadataServiceToken, len(serviceTokens))
	case len(authorization) == 1:
		return a.authenticateBearer(ctx, authorization[0])
	case len(serviceTokens) == 1:
		return a.authenticateServiceToken(ctx, serviceTokens[0])
	default:
		return nil, status.Errorf(codes.Unauthenticated,
			"missing credential: send %s metadata \"Bearer <JWT>\" or %s metadata", MetadataAuthorization, MetadataServiceToken)
	}
}

// authenticateBearer verifies an authorization value of the form
// "Bearer <JWT>". The scheme is case-insensitive, as in RFC 7235.
func (a *Authenticator) authenticateBearer(ctx context.Context, value string) (context.Context, error) {
	const scheme = "bearer "
	if len(value) > len(scheme)+MaxJWTBytes {
		return nil, status.Errorf(codes.Unauthenticated,
			"%s metadata has %d bytes; a bearer JWT may have at most %d bytes", MetadataAuthorization, len(value), MaxJWTBytes)
	}
	if len(value) < len(scheme) || !strings.EqualFold(value[:len(scheme)], scheme) {
		return nil, status.Errorf(codes.Unauthenticated,
			"%s metadata is malformed: it must be \"Bearer <JWT>\"", MetadataAuthorization)
	}
	token := strings.TrimSpace(value[len(scheme):])
	if token == "" {
		return nil, status.Errorf(codes.Unauthenticated,
			"%s metadata is malformed: the JWT after \"Bearer \" is empty", MetadataAuthorization)
	}
	if a.jwt == nil {
		return nil, status.Error(codes.Unauthenticated, "JWTs are not accepted by this server; use a service token")
	}

	p, err := a.jwt.verify(token)
	if err != nil {
		return nil, err
	}

	return principal.NewContext(ctx, p), nil
}
