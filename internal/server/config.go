package server

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/metering/metering/internal/auth"
)

// Default values of the Config fields. DatabaseURL has no default.
const (
	DefaultListenAddr      = "127.0.0.1:50051"
	DefaultMetricsAddr     = "127.0.0.1:9464"
	DefaultLogLevel        = "info"
	DefaultSweepInterval   = 10 * time.Second
	DefaultHealthInterval  = 2 * time.Second
	DefaultShutdownTimeout = 20 * time.Second
)

// maskedPassword replaces passwords in printed database URLs. It is the
// same text that pgx and net/url use when they redact a password.
const maskedPassword = "xxxxx"

// Config configures the metering server process. Build it with
// DefaultConfig or ConfigFromFlags and check it with Validate before use.
type Config struct {
	// ListenAddr is the host:port of the gRPC listener. Port 0 picks a free port.
	ListenAddr string

	// DatabaseURL is the PostgreSQL connection string, as a URL or in
	// keyword/value form. It may contain a password, so print the Config
	// with String or LogValue, which mask it.
	DatabaseURL string

	// MetricsAddr is the host:port of the HTTP listener that serves
	// Prometheus metrics on /metrics. Empty disables it.
	MetricsAddr string

	// LogLevel is one of debug, info, warn or error.
	LogLevel string

	// Migrate applies the database migrations before the server starts.
	Migrate bool

	// SweepInterval is the time between two sweeps that mark expired
	// reservations.
	SweepInterval time.Duration

	// HealthInterval is the time between two PostgreSQL pings that set the
	// gRPC health status.
	HealthInterval time.Duration

	// ShutdownTimeout is the maximum time that in-flight RPCs and metrics
	// requests get to finish after shutdown starts. Connections still open
	// then are closed.
	ShutdownTimeout time.Duration

	// Auth configures how callers are authenticated.
	Auth AuthConfig
}

// DefaultConfig returns a Config with every default set and an empty
// DatabaseURL.
func DefaultConfig() Config {
	return Config{
		ListenAddr:      DefaultListenAddr,
		MetricsAddr:     DefaultMetricsAddr,
		LogLevel:        DefaultLogLevel,
		SweepInterval:   DefaultSweepInterval,
		HealthInterval:  DefaultHealthInterval,
		ShutdownTimeout: DefaultShutdownTimeout,
		Auth: AuthConfig{
			JWTLeeway:     auth.DefaultLeeway,
			TokenCacheTTL: auth.DefaultTokenCacheTTL,
		},
	}
}

// Validate checks every field without connecting to anything. It returns
// one error per invalid field, joined with errors.Join; each names the
// field, its flag and environment variable, and the rule it breaks.
func (c Config) Validate() error {
	var errs []error

	if err := ValidateHostPort(c.ListenAddr); err != nil {
		errs = append(errs, fmt.Errorf("ListenAddr (-%s, %s) %q: %w", flagListenAddr, envListenAddr, c.ListenAddr, err))
	}

	if err := ValidateDatabaseURL(c.DatabaseURL); err != nil {
		errs = append(errs, fmt.Errorf("DatabaseURL (-%s, %s): %w", flagDatabaseURL, envDatabaseURL, err))
	}

	if err := c.validateMetricsAddr(); err != nil {
		errs = append(errs, fmt.Errorf("MetricsAddr (-%s, %s) %q: %w", flagMetricsAddr, envMetricsAddr, c.MetricsAddr, err))
	}

	if _, err := ParseLogLevel(c.LogLevel); err != nil {
		errs = append(errs, fmt.Errorf("LogLevel (-%s, %s) %q: %w", flagLogLevel, envLogLevel, c.LogLevel, err))
	}

	durations := []struct {
		field, flag, env string
		value            time.Duration
	}{
		{"SweepInterval", flagSweepInterval, envSweepInterval, c.SweepInterval},
		{"HealthInterval", flagHealthInterval, envHealthInterval, c.HealthInterval},
		{"ShutdownTimeout", flagShutdownTimeout, envShutdownTimeout, c.ShutdownTimeout},
	}
	for _, d := range durations {
		if d.value <= 0 {
			errs = append(errs, fmt.Errorf("%s (-%s, %s) %s: must be positive", d.field, d.flag, d.env, d.value))
		}
	}

	errs = append(errs, c.Auth.validate()...)

	return errors.Join(errs...)
}

// Level returns LogLevel as a slog.Level, or slog.LevelInfo when LogLevel
// is invalid.
func (c Config) Level() slog.Level {
	level, err := ParseLogLevel(c.LogLevel)
	if err != nil {
		return slog.LevelInfo
	}

	return level
}

// String returns the fields in Go syntax with the password in DatabaseURL
// masked.
func (c Config) String() string {
	return fmt.Sprintf("server.Config{ListenAddr:%q, DatabaseURL:%q, MetricsAddr:%q, LogLevel:%q, Migrate:%t, SweepInterval:%s, HealthInterval:%s, ShutdownTimeout:%s, Auth:%+v}",
		c.ListenAddr, MaskDatabaseURL(c.DatabaseURL), c.MetricsAddr, c.LogLevel, c.Migrate,
		c.SweepInterval, c.HealthInterval, c.ShutdownTimeout, c.Auth)
}

// GoString returns the same text as String, so that the %#v verb also masks
// the password.
func (c Config) GoString() string {
	return c.String()
}

// LogValue returns the fields as a slog group with the password in
// DatabaseURL masked.
func (c Config) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("listen_addr", c.ListenAddr),
		slog.String("database_url", MaskDatabaseURL(c.DatabaseURL)),
		slog.String("metrics_addr", c.MetricsAddr),
		slog.String("log_level", c.LogLevel),
		slog.Bool("migrate", c.Migrate),
		slog.String("sweep_interval", c.SweepInterval.String()),
		slog.String("health_interval", c.HealthInterval.String()),
		slog.String("shutdown_timeout", c.ShutdownTimeout.String()),
		slog.Any("auth", c.Auth.LogValue()),
	)
}

func (c Config) validateMetricsAddr() error {
	if c.MetricsAddr == "" {
		return nil
	}

	if err := ValidateHostPort(c.MetricsAddr); err != nil {
		return err
	}

	_, port, _ := net.SplitHostPort(c.MetricsAddr)
	if c.MetricsAddr == c.ListenAddr && port != "0" {
		return errors.New("must differ from ListenAddr, or be empty to disable metrics")
	}

	return nil
}

// ValidateHostPort checks that addr is host:port with a port from 0 to 65535,
// without resolving the host.
func ValidateHostPort(addr string) error {
	if addr == "" {
		return errors.New("missing, must be host:port")
	}

	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("must be host:port: %w", err)
	}

	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("port %q must be a number from 0 to 65535", port)
	}

	return nil
}

// ValidateDatabaseURL checks that databaseURL is a PostgreSQL connection
// string that pgx parses, without connecting. Its errors mask the password.
func ValidateDatabaseURL(databaseURL string) error {
	if databaseURL == "" {
		return errors.New("missing, must be a PostgreSQL connection string such as postgres://user:password@127.0.0.1:5432/metering")
	}

	// pgx masks the password in the connection string that its parse
	// errors quote.
	if _, err := pgxpool.ParseConfig(databaseURL); err != nil {
		return fmt.Errorf("invalid connection string: %w", err)
	}

	return nil
}

// ParseLogLevel returns the slog level named debug, info, warn or error, in
// any case.
func ParseLogLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "debug":
		return slog.LevelDebug, nil
	case "info":
		return slog.LevelInfo, nil
	case "warn":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	default:
		return 0, errors.New("must be one of debug, info, warn, error")
	}
}

// keywordPassword matches the password in a keyword/value connection
// string, quoted with single quotes or not.
var keywordPassword = regexp.MustCompile(`(?i)(\bpassword\s*=\s*)('(?:\\.|[^'\\])*'|\S*)`)

// MaskDatabaseURL returns databaseURL with any password replaced by xxxxx.
// It handles both the URL form, where the password can sit in the user
// information or in a password query parameter, and the keyword/value form.
// A URL that does not parse is replaced as a whole, since the position of its
// password is unknown.
func MaskDatabaseURL(databaseURL string) string {
	if !strings.HasPrefix(databaseURL, "postgres://") && !strings.HasPrefix(databaseURL, "postgresql://") {
		return keywordPassword.ReplaceAllString(databaseURL, "${1}"+maskedPassword)
	}

	u, err := url.Parse(databaseURL)
	if err != nil {
		return "(invalid URL, hidden)"
	}

	query := u.Query()
	if query.Has("password") {
		query.Set("password", maskedPassword)
		u.RawQuery = query.Encode()
	}

	return u.Redacted()
}
