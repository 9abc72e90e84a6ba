package workspaceserver

import (
	"errors"
	"flag"
	"fmt"
	"strings"
)

// Flag names.
const (
	flagListenAddr           = "listen-addr"
	flagDatabaseURL          = "database-url"
	flagMeteringAddr         = "metering-addr"
	flagMeteringTokenFile    = "metering-token-file"
	flagBlobDir              = "blob-dir"
	flagMetricsAddr          = "metrics-addr"
	flagLogLevel             = "log-level"
	flagMigrate              = "migrate"
	flagReservationTTL       = "reservation-ttl"
	flagUploadReservationTTL = "upload-reservation-ttl"
	flagMaxUploadBytes       = "max-upload-bytes"
	flagUploadIdleTimeout    = "upload-idle-timeout"
	flagMeteringTimeout      = "metering-timeout"
	flagHealthInterval       = "health-interval"
	flagShutdownTimeout      = "shutdown-timeout"
	flagJWTIssuer            = "jwt-issuer"
	flagJWTAudience          = "jwt-audience"
	flagJWTSecretFile        = "jwt-hs256-secret-file"
	flagJWKSFile             = "jwks-file"
	flagJWTLeeway            = "jwt-leeway"
	flagTokenCacheTTL        = "token-cache-ttl"
)

// envByFlag maps each flag to the environment variable it falls back to.
// DATABASE_URL is shared with Metering; the others start with WORKSPACE_.
var envByFlag = map[string]string{
	flagListenAddr:           "WORKSPACE_LISTEN_ADDR",
	flagDatabaseURL:          "DATABASE_URL",
	flagMeteringAddr:         "WORKSPACE_METERING_ADDR",
	flagMeteringTokenFile:    "WORKSPACE_METERING_TOKEN_FILE",
	flagBlobDir:              "WORKSPACE_BLOB_DIR",
	flagMetricsAddr:          "WORKSPACE_METRICS_ADDR",
	flagLogLevel:             "WORKSPACE_LOG_LEVEL",
	flagMigrate:              "WORKSPACE_MIGRATE",
	flagReservationTTL:       "WORKSPACE_RESERVATION_TTL",
	flagUploadReservationTTL: "WORKSPACE_UPLOAD_RESERVATION_TTL",
	flagMaxUploadBytes:       "WORKSPACE_MAX_UPLOAD_BYTES",
	flagUploadIdleTimeout:    "WORKSPACE_UPLOAD_IDLE_TIMEOUT",
	flagMeteringTimeout:      "WORKSPACE_METERING_TIMEOUT",
	flagHealthInterval:       "WORKSPACE_HEALTH_INTERVAL",
	flagShutdownTimeout:      "WORKSPACE_SHUTDOWN_TIMEOUT",
	flagJWTIssuer:            "WORKSPACE_JWT_ISSUER",
	flagJWTAudience:          "WORKSPACE_JWT_AUDIENCE",
	flagJWTSecretFile:        "WORKSPACE_JWT_HS256_SECRET_FILE",
	flagJWKSFile:             "WORKSPACE_JWKS_FILE",
	flagJWTLeeway:            "WORKSPACE_JWT_LEEWAY",
	flagTokenCacheTTL:        "WORKSPACE_TOKEN_CACHE_TTL",
}

// ConfigFromFlags defines the workspace server flags on fs, parses args and
// returns the resulting Config. A flag given in args wins over its
// environment variable, read with lookupEnv (os.LookupEnv outside tests),
// and the variable wins over the default. A variable that is set but empty
// counts as set, so WORKSPACE_METRICS_ADDR= disables metrics.
//
// It returns the error of fs.Parse (flag.ErrHelp for -h), an error naming
// the variable whose value does not parse, or an error for arguments left
// after the flags. It does not call Validate.
func ConfigFromFlags(fs *flag.FlagSet, args []string, lookupEnv func(string) (string, bool)) (Config, error) {
	cfg := DefaultConfig()

	usage := func(name, text string) string {
		return fmt.Sprintf("%s (env %s)", text, envByFlag[name])
	}
	fs.StringVar(&cfg.ListenAddr, flagListenAddr, cfg.ListenAddr,
		usage(flagListenAddr, "host:port of the gRPC listener, port 0 picks a free port"))
	fs.StringVar(&cfg.DatabaseURL, flagDatabaseURL, cfg.DatabaseURL,
		usage(flagDatabaseURL, fmt.Sprintf("PostgreSQL connection string (required) of the database with the workspace schema, which may be Metering's; "+
			"pool_max_conns in its query sets the pool size, default %d", DefaultDatabaseMaxConns)))
	fs.StringVar(&cfg.MeteringAddr, flagMeteringAddr, cfg.MeteringAddr,
		usage(flagMeteringAddr, "host:port of Metering's gRPC API"))
	fs.StringVar(&cfg.MeteringTokenFile, flagMeteringTokenFile, cfg.MeteringTokenFile,
		usage(flagMeteringTokenFile, "file with the Metering service token of this server, scope usage:write for all accounts (required)"))
	fs.StringVar(&cfg.BlobDir, flagBlobDir, cfg.BlobDir,
		usage(flagBlobDir, "directory that stores the bytes of attachments, created when missing (required)"))
	fs.StringVar(&cfg.MetricsAddr, flagMetricsAddr, cfg.MetricsAddr,
		usage(flagMetricsAddr, "host:port of the HTTP listener serving Prometheus metrics on /metrics, empty disables it"))
	fs.StringVar(&cfg.LogLevel, flagLogLevel, cfg.LogLevel,
		usage(flagLogLevel, "minimum level of logged records: debug, info, warn or error"))
	fs.BoolVar(&cfg.Migrate, flagMigrate, cfg.Migrate,
		usage(flagMigrate, "apply the workspace migrations before serving"))
	fs.DurationVar(&cfg.ReservationTTL, flagReservationTTL, cfg.ReservationTTL,
		usage(flagReservationTTL, "how long Metering reserves the capacity of a create before the commit, from 1s to 1h"))
	fs.DurationVar(&cfg.UploadReservationTTL, flagUploadReservationTTL, cfg.UploadReservationTTL,
		usage(flagUploadReservationTTL, "how long Metering reserves the storage of an upload while its bytes arrive, from 1s to 1h"))
	fs.Int64Var(&cfg.MaxUploadBytes, flagMaxUploadBytes, cfg.MaxUploadBytes,
		usage(flagMaxUploadBytes, "largest declared size of an upload, in bytes"))
	fs.DurationVar(&cfg.UploadIdleTimeout, flagUploadIdleTimeout, cfg.UploadIdleTimeout,
		usage(flagUploadIdleTimeout, "maximum pause between two chunks of an upload before it is aborted, a Go duration. "+
			"A whole upload must end within -upload-reservation-ttl"))
	fs.DurationVar(&cfg.MeteringTimeout, flagMeteringTimeout, cfg.MeteringTimeout,
		usage(flagMeteringTimeout, "time limit of one call to Metering, and of the wait for Metering in a create's or delete's "+
			"transaction, a Go duration"))
	fs.DurationVar(&cfg.HealthInterval, flagHealthInterval, cfg.HealthInterval,
		usage(flagHealthInterval, "time between two PostgreSQL pings that set the gRPC health status, a Go duration"))
	fs.DurationVar(&cfg.ShutdownTimeout, flagShutdownTimeout, cfg.ShutdownTimeout,
		usage(flagShutdownTimeout, "maximum time in-flight requests get to finish at shutdown before their connections are closed"))
	fs.StringVar(&cfg.Auth.JWTIssuer, flagJWTIssuer, cfg.Auth.JWTIssuer,
		usage(flagJWTIssuer, "required iss claim of user JWTs (required)"))
	fs.StringVar(&cfg.Auth.JWTAudience, flagJWTAudience, cfg.Auth.JWTAudience,
		usage(flagJWTAudience, "required aud claim of user JWTs (required)"))
	fs.StringVar(&cfg.Auth.JWTSecretFile, flagJWTSecretFile, cfg.Auth.JWTSecretFile,
		usage(flagJWTSecretFile, "file with the HS256 secret (at least 32 bytes) that signs user JWTs, for development"))
	fs.StringVar(&cfg.Auth.JWKSFile, flagJWKSFile, cfg.Auth.JWKSFile,
		usage(flagJWKSFile, "JWKS file with the RS256, ES256 or EdDSA public keys that sign user JWTs, for production"))
	fs.DurationVar(&cfg.Auth.JWTLeeway, flagJWTLeeway, cfg.Auth.JWTLeeway,
		usage(flagJWTLeeway, "clock skew allowed when checking the exp, nbf and iat claims of JWTs, at most 5m"))
	fs.DurationVar(&cfg.Auth.TokenCacheTTL, flagTokenCacheTTL, cfg.Auth.TokenCacheTTL,
		usage(flagTokenCacheTTL, "how long a runtime token check is cached, so also how long a revoked token keeps working, at most 5s"))

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
