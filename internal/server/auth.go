package server

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/metering/metering/internal/auth"
)

// AuthConfig configures the authentication of callers. User JWTs are
// verified with an HS256 secret (development) or a JWKS file (production);
// service tokens are checked against Metering's database. With neither key
// file set, only service tokens are accepted.
type AuthConfig struct {
	// JWTIssuer and JWTAudience are the required iss and aud claims. Both
	// are required when a key file is set.
	JWTIssuer   string
	JWTAudience string
	// JWTSecretFile is a file with the HS256 secret, at least 32 bytes.
	JWTSecretFile string
	// JWKSFile is a JWKS file with RS256, ES256 or EdDSA public keys.
	JWKSFile string
	// JWTLeeway is the clock skew allowed for exp, nbf and iat.
	JWTLeeway time.Duration
	// TokenCacheTTL bounds how long a revoked service token keeps working.
	TokenCacheTTL time.Duration
}

// LogValue returns the settings; the files are named, never read.
func (c AuthConfig) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("jwt_issuer", c.JWTIssuer),
		slog.String("jwt_audience", c.JWTAudience),
		slog.String("jwt_hs256_secret_file", c.JWTSecretFile),
		slog.String("jwks_file", c.JWKSFile),
		slog.String("jwt_leeway", c.JWTLeeway.String()),
		slog.String("token_cache_ttl", c.TokenCacheTTL.String()),
	)
}

func (c AuthConfig) validate() []error {
	var errs []error
	if c.JWTSecretFile != "" || c.JWKSFile != "" {
		if c.JWTIssuer == "" {
			errs = append(errs, fmt.Errorf("Auth.JWTIssuer (-%s, %s): required when a JWT key file is set", flagJWTIssuer, envJWTIssuer))
		}
		if c.JWTAudience == "" {
			errs = append(errs, fmt.Errorf("Auth.JWTAudience (-%s, %s): required when a JWT key file is set", flagJWTAudience, envJWTAudience))
		}
	}
	// The auth package reads a zero leeway as "use the default", so zero is
	// rejected here instead of silently becoming 30s.
	if c.JWTLeeway <= 0 || c.JWTLeeway > auth.MaxLeeway {
		errs = append(errs, fmt.Errorf("Auth.JWTLeeway (-%s, %s) %s: must be above 0 and at most %s", flagJWTLeeway, envJWTLeeway, c.JWTLeeway, auth.MaxLeeway))
	}
	if c.TokenCacheTTL <= 0 || c.TokenCacheTTL > auth.MaxTokenCacheTTL {
		errs = append(errs, fmt.Errorf("Auth.TokenCacheTTL (-%s, %s) %s: must be above 0 and at most %s", flagTokenCacheTTL, envTokenCacheTTL, c.TokenCacheTTL, auth.MaxTokenCacheTTL))
	}
	return errs
}

// authConfig reads the key files and returns the auth package's config.
func (c AuthConfig) authConfig(tokens auth.TokenStore, logger *slog.Logger) (auth.Config, error) {
	cfg := auth.Config{
		Issuer:        c.JWTIssuer,
		Audience:      c.JWTAudience,
		Leeway:        c.JWTLeeway,
		Tokens:        tokens,
		TokenCacheTTL: c.TokenCacheTTL,
		Now:           time.Now,
		Logger:        logger,
	}
	var err error
	if c.JWTSecretFile != "" {
		if cfg.HS256Secret, err = ReadKeyFile(c.JWTSecretFile); err != nil {
			return auth.Config{}, fmt.Errorf("read the JWT secret file: %w", err)
		}
	}
	if c.JWKSFile != "" {
		if cfg.JWKS, err = ReadKeyFile(c.JWKSFile); err != nil {
			return auth.Config{}, fmt.Errorf("read the JWKS file: %w", err)
		}
	}
	return cfg, nil
}

// ReadKeyFile returns the contents of a key file, such as a JWT secret or a
// service token, without trailing newlines. An empty file is an error.
func ReadKeyFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	if len(b) == 0 {
		return nil, errors.New(path + " is empty")
	}
	return b, nil
}
