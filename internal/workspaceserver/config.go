package workspaceserver

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/metering/metering/internal/auth"
	"github.com/metering/metering/internal/server"
	"github.com/metering/metering/internal/workspace"
)

// Default values of the Config fields. DatabaseURL, MeteringTokenFile,
// BlobDir and the JWT settings have no default.
const (
	DefaultListenAddr      = "127.0.0.1:50052"
	DefaultMeteringAddr    = "127.0.0.1:50051"
	DefaultMetricsAddr     = "127.0.0.1:9465"
	DefaultLogLevel        = "info"
	DefaultHealthInterval  = 2 * time.Second
	DefaultShutdownTimeout = 20 * time.Second
	// DefaultDatabaseMaxConns is the size of the database pool when
	// DatabaseURL sets no pool_max_conns. A create holds a connection while
	// it waits for Metering's commit, and the runtime token checks and the
	// creates that Metering does not count need connections meanwhile, so
	// the pool is larger than pgx's default of max(4, CPUs). 16 stays well
	// below PostgreSQL's default max_connections of 100, which Metering's
	// pool shares.
	DefaultDatabaseMaxConns = 16
)

// Config configures the workspace server process. Build it with
// DefaultConfig or ConfigFromFlags and check it with Validate before use.
type Config struct {
	// ListenAddr is the host:port of the gRPC listener. Port 0 picks a free
	// port.
	ListenAddr string

	// DatabaseURL is the PostgreSQL connection string of the database that
	// holds the workspace schema. It may contain a password, so print the
	// Config with String or LogValue, which mask it. Its pool_max_conns
	// sets the size of the pool, DefaultDatabaseMaxConns when unset.
	DatabaseURL string

	// MeteringAddr is the host:port of Metering's gRPC API.
	MeteringAddr string

	// MeteringTokenFile is a file with the workspace's service token for
	// Metering: scope usage:write, bound to all accounts. The token is
	// read at start and never logged.
	MeteringTokenFile string

	// BlobDir is the directory of the bytes of attachments. Run creates it
	// when missing.
	BlobDir string

	// MetricsAddr is the host:port of the HTTP listener that serves
	// Prometheus metrics on /metrics. Empty disables it.
	MetricsAddr string

	// LogLevel is one of debug, info, warn or error.
	LogLevel string

	// Migrate applies the workspace migrations before the server starts.
	Migrate bool

	// ReservationTTL is how long Metering holds the capacity of a create.
	ReservationTTL time.Duration

	// UploadReservationTTL is how long Metering holds the storage of an
	// upload while its bytes arrive.
	UploadReservationTTL time.Duration

	// MaxUploadBytes is the largest declared size of an upload.
	MaxUploadBytes int64

	// UploadIdleTimeout is the longest pause between two messages of an
	// upload; a longer one aborts the upload and releases its storage.
	UploadIdleTimeout time.Duration

	// MeteringTimeout bounds each call to Metering, and how long a create's
	// or delete's transaction waits for Metering (twice for a create whose
	// commit gets no response).
	MeteringTimeout time.Duration

	// HealthInterval is the time between two PostgreSQL pings that set the
	// gRPC health status.
	HealthInterval time.Duration

	// ShutdownTimeout is the maximum time that in-flight RPCs get to finish
	// after shutdown starts.
	ShutdownTimeout time.Duration

	// Auth configures how callers are authenticated. The JWT settings mean
	// the same as Metering's: both servers verify the same user JWTs.
	Auth server.AuthConfig
}

// DefaultConfig returns a Config with every default set.
func DefaultConfig() Config {
	return Config{
		ListenAddr:           DefaultListenAddr,
		MeteringAddr:         DefaultMeteringAddr,
		MetricsAddr:          DefaultMetricsAddr,
		LogLevel:             DefaultLogLevel,
		ReservationTTL:       workspace.DefaultReservationTTL,
		UploadReservationTTL: workspace.DefaultUploadReservationTTL,
		MaxUploadBytes:       workspace.DefaultMaxUploadBytes,
		UploadIdleTimeout:    workspace.DefaultUploadIdleTimeout,
		MeteringTimeout:      workspace.DefaultMeteringTimeout,
		HealthInterval:       DefaultHealthInterval,
		ShutdownTimeout:      DefaultShutdownTimeout,
		Auth: server.AuthConfig{
			JWTLeeway:     auth.DefaultLeeway,
			TokenCacheTTL: auth.DefaultTokenCacheTTL,
		},
	}
}

// Validate checks every field without connecting to anything or reading a
// file. It returns one error per invalid field, joined with errors.Join.
// Each names the field, its flag and environment variable, and the rule it
// breaks.
func (c Config) Validate() error {
	var errs []error
	add := func(field, flagName string, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s (-%s, %s): %s", field, flagName, envByFlag[flagName], fmt.Sprintf(format, args...)))
	}

	if err := server.ValidateHostPort(c.ListenAddr); err != nil {
		add("ListenAddr", flagListenAddr, "%q: %v", c.ListenAddr, err)
	}
	if err := server.ValidateDatabaseURL(c.DatabaseURL); err != nil {
		add("DatabaseURL", flagDatabaseURL, "%v", err)
	}
	if err := server.ValidateHostPort(c.MeteringAddr); err != nil {
		add("MeteringAddr", flagMeteringAddr, "%q: %v", c.MeteringAddr, err)
	}
	if c.MeteringTokenFile == "" {
		add("MeteringTokenFile", flagMeteringTokenFile, "missing, must name a file with a Metering service token that has the usage:write scope for all accounts")
	}
	if c.BlobDir == "" {
		add("BlobDir", flagBlobDir, "missing, must name the directory that stores the bytes of attachments")
	}
	if err := c.validateMetricsAddr(); err != nil {
		add("MetricsAddr", flagMetricsAddr, "%q: %v", c.MetricsAddr, err)
	}
	if _, err := server.ParseLogLevel(c.LogLevel); err != nil {
		add("LogLevel", flagLogLevel, "%q: %v", c.LogLevel, err)
	}

	for _, ttl := range []struct {
		field, flag string
		value       time.Duration
	}{
		{"ReservationTTL", flagReservationTTL, c.ReservationTTL},
		{"UploadReservationTTL", flagUploadReservationTTL, c.UploadReservationTTL},
	} {
		if ttl.value < workspace.MinReservationTTL || ttl.value > workspace.MaxReservationTTL {
			add(ttl.field, ttl.flag, "%s: must be from %s to %s, the TTLs Metering accepts", ttl.value, workspace.MinReservationTTL, workspace.MaxReservationTTL)
		}
	}
	if c.MaxUploadBytes <= 0 {
		add("MaxUploadBytes", flagMaxUploadBytes, "%d: must be above zero", c.MaxUploadBytes)
	}
	for _, d := range []struct {
		field, flag string
		value       time.Duration
	}{
		{"UploadIdleTimeout", flagUploadIdleTimeout, c.UploadIdleTimeout},
		{"MeteringTimeout", flagMeteringTimeout, c.MeteringTimeout},
		{"HealthInterval", flagHealthInterval, c.HealthInterval},
		{"ShutdownTimeout", flagShutdownTimeout, c.ShutdownTimeout},
	} {
		if d.value <= 0 {
			add(d.field, d.flag, "%s: must be positive", d.value)
		}
	}

	errs = append(errs, c.validateAuth()...)

	return errors.Join(errs...)
}

func (c Config) validateMetricsAddr() error {
	if c.MetricsAddr == "" {
		return nil
	}
	if err := server.ValidateHostPort(c.MetricsAddr); err != nil {
		return err
	}

	_, port, _ := net.SplitHostPort(c.MetricsAddr)
	if c.MetricsAddr == c.ListenAddr && port != "0" {
		return errors.New("must differ from ListenAddr, or be empty to disable metrics")
	}

	return nil
}

func (c Config) validateAuth() []error {
	var errs []error
	add := func(field, flagName string, format string, args ...any) {
		errs = append(errs, fmt.Errorf("Auth.%s (-%s, %s): %s", field, flagName, envByFlag[flagName], fmt.Sprintf(format, args...)))
	}

	a := c.Auth
	if a.JWTSecretFile == "" && a.JWKSFile == "" {
		add("JWKSFile", flagJWKSFile, "missing: set it or -%s, because users, who create the agents, sign in with JWTs", flagJWTSecretFile)
	}
	if a.JWTIssuer == "" {
		add("JWTIssuer", flagJWTIssuer, "missing, must be the iss claim of user JWTs")
	}
	if a.JWTAudience == "" {
		add("JWTAudience", flagJWTAudience, "missing, must be the aud claim of user JWTs")
	}
	if a.JWTLeeway < 0 || a.JWTLeeway > auth.MaxLeeway {
		add("JWTLeeway", flagJWTLeeway, "%s: must be between 0 and %s", a.JWTLeeway, auth.MaxLeeway)
	}
	if a.TokenCacheTTL <= 0 || a.TokenCacheTTL > auth.MaxTokenCacheTTL {
		add("TokenCacheTTL", flagTokenCacheTTL, "%s: must be above 0 and at most %s", a.TokenCacheTTL, auth.MaxTokenCacheTTL)
	}

	return errs
}

// Level returns LogLevel as a slog.Level, or slog.LevelInfo when LogLevel is
// invalid.
func (c Config) Level() slog.Level {
	level, err := server.ParseLogLevel(c.LogLevel)
	if err != nil {
		return slog.LevelInfo
	}

	return level
}

// String returns the fields with the password in DatabaseURL masked. Files
// are named, never read.
func (c Config) String() string {
	return fmt.Sprintf("workspaceserver.Config{ListenAddr:%q, DatabaseURL:%q, MeteringAddr:%q, MeteringTokenFile:%q, BlobDir:%q, "+
		"MetricsAddr:%q, LogLevel:%q, Migrate:%t, ReservationTTL:%s, UploadReservationTTL:%s, MaxUploadBytes:%d, "+
		"UploadIdleTimeout:%s, MeteringTimeout:%s, HealthInterval:%s, ShutdownTimeout:%s, Auth:%+v}",
		c.ListenAddr, server.MaskDatabaseURL(c.DatabaseURL), c.MeteringAddr, c.MeteringTokenFile, c.BlobDir,
		c.MetricsAddr, c.LogLevel, c.Migrate, c.ReservationTTL, c.UploadReservationTTL, c.MaxUploadBytes,
		c.UploadIdleTimeout, c.MeteringTimeout, c.HealthInterval, c.ShutdownTimeout, c.Auth)
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
		slog.String("database_url", server.MaskDatabaseURL(c.DatabaseURL)),
		slog.String("metering_addr", c.MeteringAddr),
		slog.String("metering_token_file", c.MeteringTokenFile),
		slog.String("blob_dir", c.BlobDir),
		slog.String("metrics_addr", c.MetricsAddr),
		slog.String("log_level", c.LogLevel),
		slog.Bool("migrate", c.Migrate),
		slog.String("reservation_ttl", c.ReservationTTL.String()),
		slog.String("upload_reservation_ttl", c.UploadReservationTTL.String()),
		slog.Int64("max_upload_bytes", c.MaxUploadBytes),
		slog.String("upload_idle_timeout", c.UploadIdleTimeout.String()),
		slog.String("metering_timeout", c.MeteringTimeout.String()),
		slog.String("health_interval", c.HealthInterval.String()),
		slog.String("shutdown_timeout", c.ShutdownTimeout.String()),
		slog.Any("auth", c.Auth.LogValue()),
	)
}
