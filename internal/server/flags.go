package server

import (
	"errors"
	"flag"
	"fmt"
	"strings"
)

// Flag names and the environment variables that they fall back to.
const (
	flagListenAddr      = "listen-addr"
	flagDatabaseURL     = "database-url"
	flagMetricsAddr     = "metrics-addr"
	flagLogLevel        = "log-level"
	flagMigrate         = "migrate"
	flagSweepInterval   = "sweep-interval"
	flagHealthInterval  = "health-interval"
	flagShutdownTimeout = "shutdown-timeout"
	flagJWTIssuer       = "jwt-issuer"
	flagJWTAudience     = "jwt-audience"
	flagJWTSecretFile   = "jwt-hs256-secret-file"
	flagJWKSFile        = "jwks-file"
	flagJWTLeeway       = "jwt-leeway"
	flagTokenCacheTTL   = "token-cache-ttl"

	envListenAddr      = "METERING_LISTEN_ADDR"
	envDatabaseURL     = "DATABASE_URL"
	envMetricsAddr     = "METERING_METRICS_ADDR"
	envLogLevel        = "METERING_LOG_LEVEL"
	envMigrate         = "METERING_MIGRATE"
	envSweepInterval   = "METERING_SWEEP_INTERVAL"
	envHealthInterval  = "METERING_HEALTH_INTERVAL"
	envShutdownTimeout = "METERING_SHUTDOWN_TIMEOUT"
	envJWTIssuer       = "METERING_JWT_ISSUER"
	envJWTAudience     = "METERING_JWT_AUDIENCE"
	envJWTSecretFile   = "METERING_JWT_HS256_SECRET_FILE"
	envJWKSFile        = "METERING_JWKS_FILE"
	envJWTLeeway       = "METERING_JWT_LEEWAY"
	envTokenCacheTTL   = "METERING_TOKEN_CACHE_TTL"
)

// ConfigFromFlags defines the server flags on fs, parses args and returns
// the resulting Config. A flag given in args wins over its environment
// variable, read with lookupEnv (os.LookupEnv outside tests), and the
// variable wins over the default. A variable that is set but empty counts
// as set, so METERING_METRICS_ADDR= disables metrics.
//
// It returns the error of fs.Parse (flag.ErrHelp for -h), an error naming
// the variable whose value does not parse, or an error for arguments left
// after the flags. It does not call Validate.
func ConfigFromFlags(fs *flag.FlagSet, args []string, lookupEnv func(string) (string, bool)) (Config, error) {
	cfg := DefaultConfig()

	envByFlag := map[string]string{}
	define := func(name, env, usage string, defineFlag func(name, usage string)) {
		envByFlag[name] = env
		defineFlag(name, fmt.Sprintf("%s (env %s)", usage, env))
	}
	define(flagListenAddr, envListenAddr, "host:port of the gRPC listener, port 0 picks a free port", func(name, usage string) {
		fs.StringVar(&cfg.ListenAddr, name, cfg.ListenAddr, usage)
	})
	define(flagDatabaseURL, envDatabaseURL, "PostgreSQL connection string (required), for example postgres://user:password@127.0.0.1:5432/metering, with pool settings such as pool_max_conns in its query", func(name, usage string) {
		fs.StringVar(&cfg.DatabaseURL, name, cfg.DatabaseURL, usage)
	})
	define(flagMetricsAddr, envMetricsAddr, "host:port of the HTTP listener serving Prometheus metrics on /metrics, empty disables it", func(name, usage string) {
		fs.StringVar(&cfg.MetricsAddr, name, cfg.MetricsAddr, usage)
	})
	define(flagLogLevel, envLogLevel, "minimum level of logged records: debug, info, warn or error", func(name, usage string) {
		fs.StringVar(&cfg.LogLevel, name, cfg.LogLevel, usage)
	})
	define(flagMigrate, envMigrate, "apply the database migrations before serving", func(name, usage string) {
		fs.BoolVar(&cfg.Migrate, name, cfg.Migrate, usage)
	})
	define(flagSweepInterval, envSweepInterval, "time between two sweeps that mark expired reservations, a Go duration such as 10s", func(name, usage string) {
		fs.DurationVar(&cfg.SweepInterval, name, cfg.SweepInterval, usage)
	})
	define(flagHealthInterval, envHealthInterval, "time between two PostgreSQL pings that set the gRPC health status, a Go duration", func(name, usage string) {
		fs.DurationVar(&cfg.HealthInterval, name, cfg.HealthInterval, usage)
	})
	define(flagShutdownTimeout, envShutdownTimeout, "maximum time in-flight requests get to finish at shutdown before their connections are closed, a Go duration", func(name, usage string) {
		fs.DurationVar(&cfg.ShutdownTimeout, name, cfg.ShutdownTimeout, usage)
	})

	define(flagJWTIssuer, envJWTIssuer, "required iss claim of user JWTs", func(name, usage string) {
		fs.StringVar(&cfg.Auth.JWTIssuer, name, cfg.Auth.JWTIssuer, usage)
	})
	define(flagJWTAudience, envJWTAudience, "required aud claim of user JWTs", func(name, usage string) {
		fs.StringVar(&cfg.Auth.JWTAudience, name, cfg.Auth.JWTAudience, usage)
	})
	define(flagJWTSecretFile, envJWTSecretFile, "file with the HS256 secret (at least 32 bytes) that signs user JWTs, for development", func(name, usage string) {
		fs.StringVar(&cfg.Auth.JWTSecretFile, name, cfg.Auth.JWTSecretFile, usage)
	})
	define(flagJWKSFile, envJWKSFile, "JWKS file with the RS256, ES256 or EdDSA public keys that sign user JWTs, for production", func(name, usage string) {
		fs.StringVar(&cfg.Auth.JWKSFile, name, cfg.Auth.JWKSFile, usage)
	})
	define(flagJWTLeeway, envJWTLeeway, "clock skew allowed when checking the exp, nbf and iat claims of JWTs, at most 5m", func(name, usage string) {
		fs.DurationVar(&cfg.Auth.JWTLeeway, name, cfg.Auth.JWTLeeway, usage)
	})
	define(flagTokenCacheTTL, envTokenCacheTTL, "how long a service token check is cached, so also how long a revoked token keeps working, at most 5s", func(name, usage string) {
		fs.DurationVar(&cfg.Auth.TokenCacheTTL, name, cfg.Auth.TokenCacheTTL, usage)
	})

	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}

	if fs.NArg() > 0 {
		return Config{}, fmt.Errorf("unexpected argument %q after the flags", fs.Arg(0))
	}

	setByFlag := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { setByFlag[f.Name] = true })

	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		env, ok := envByFlag[f.Name]
		if !ok || setByFlag[f.Name] {
			return
		}

		value, ok := lookupEnv(env)
		if !ok {
			return
		}

		// The flag's own Set parses the value, so a variable accepts the
		// same syntax as its flag.
		if err := f.Value.Set(strings.TrimSpace(value)); err != nil {
			errs = append(errs, fmt.Errorf("invalid value %q of %s: %w", value, env, err))
		}
	})
	if err := errors.Join(errs...); err != nil {
		return Config{}, err
	}

	return cfg, nil
}
