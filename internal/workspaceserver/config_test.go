package workspaceserver_test

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/metering/metering/internal/workspaceserver"
)

// validConfig returns a Config that passes Validate.
func validConfig() workspaceserver.Config {
	cfg := workspaceserver.DefaultConfig()
	cfg.DatabaseURL = "postgres://app:hunter2@127.0.0.1:5432/metering"
	cfg.MeteringTokenFile = "/run/secrets/metering-token"
	cfg.BlobDir = "/var/lib/workspace/blobs"
	cfg.Auth.JWTIssuer = "issuer"
	cfg.Auth.JWTAudience = "audience"
	cfg.Auth.JWKSFile = "/etc/workspace/jwks.json"

	return cfg
}

func TestConfigValidateAcceptsValidConfig(t *testing.T) {
	t.Parallel()

	assert.NoError(t, validConfig().Validate())
}

func TestConfigValidateNamesEveryBadField(t *testing.T) {
	t.Parallel()
	cfg := validConfig()
	cfg.ListenAddr = "nowhere"
	cfg.DatabaseURL = ""
	cfg.MeteringAddr = "127.0.0.1:99999"
	cfg.MeteringTokenFile = ""
	cfg.BlobDir = ""
	cfg.MetricsAddr = cfg.ListenAddr
	cfg.LogLevel = "loud"
	cfg.ReservationTTL = 2 * time.Hour
	cfg.UploadReservationTTL = time.Millisecond
	cfg.MaxUploadBytes = 0
	cfg.UploadIdleTimeout = 0
	cfg.MeteringTimeout = 0
	cfg.HealthInterval = -time.Second
	cfg.ShutdownTimeout = 0
	cfg.Auth.JWKSFile = ""
	cfg.Auth.JWTIssuer = ""
	cfg.Auth.JWTAudience = ""
	cfg.Auth.JWTLeeway = time.Hour
	cfg.Auth.TokenCacheTTL = time.Minute

	err := cfg.Validate()

	require.Error(t, err)
	for _, want := range []string{
		"ListenAddr (-listen-addr, WORKSPACE_LISTEN_ADDR)",
		"DatabaseURL (-database-url, DATABASE_URL): missing",
		"MeteringAddr (-metering-addr, WORKSPACE_METERING_ADDR)",
		"MeteringTokenFile (-metering-token-file, WORKSPACE_METERING_TOKEN_FILE): missing",
		"BlobDir (-blob-dir, WORKSPACE_BLOB_DIR): missing",
		"MetricsAddr (-metrics-addr, WORKSPACE_METRICS_ADDR)",
		"LogLevel (-log-level, WORKSPACE_LOG_LEVEL)",
		"ReservationTTL (-reservation-ttl, WORKSPACE_RESERVATION_TTL)",
		"UploadReservationTTL (-upload-reservation-ttl, WORKSPACE_UPLOAD_RESERVATION_TTL)",
		"MaxUploadBytes (-max-upload-bytes, WORKSPACE_MAX_UPLOAD_BYTES)",
		"UploadIdleTimeout (-upload-idle-timeout, WORKSPACE_UPLOAD_IDLE_TIMEOUT)",
		"MeteringTimeout (-metering-timeout, WORKSPACE_METERING_TIMEOUT)",
		"HealthInterval (-health-interval, WORKSPACE_HEALTH_INTERVAL)",
		"ShutdownTimeout (-shutdown-timeout, WORKSPACE_SHUTDOWN_TIMEOUT)",
		"Auth.JWKSFile (-jwks-file, WORKSPACE_JWKS_FILE): missing",
		"Auth.JWTIssuer (-jwt-issuer, WORKSPACE_JWT_ISSUER): missing",
		"Auth.JWTAudience (-jwt-audience, WORKSPACE_JWT_AUDIENCE): missing",
		"Auth.JWTLeeway (-jwt-leeway, WORKSPACE_JWT_LEEWAY)",
		"Auth.TokenCacheTTL (-token-cache-ttl, WORKSPACE_TOKEN_CACHE_TTL)",
	} {
		assert.ErrorContains(t, err, want)
	}
}

func TestConfigPrintingMasksPassword(t *testing.T) {
	t.Parallel()
	cfg := validConfig()

	for _, text := range []string{cfg.String(), fmt.Sprintf("%v", cfg), fmt.Sprintf("%#v", cfg), fmt.Sprint(cfg.LogValue())} {
		assert.NotContains(t, text, "hunter2")
		assert.Contains(t, text, "127.0.0.1:5432")
	}
}

func TestConfigFromFlagsPrecedence(t *testing.T) {
	t.Parallel()
	env := map[string]string{
		"WORKSPACE_LISTEN_ADDR":     "127.0.0.1:6000",
		"WORKSPACE_METERING_ADDR":   "127.0.0.1:6001",
		"WORKSPACE_METRICS_ADDR":    "",
		"WORKSPACE_RESERVATION_TTL": "30s",
		"DATABASE_URL":              "postgres://from-env@127.0.0.1/metering",
	}
	lookup := func(key string) (string, bool) {
		v, ok := env[key]
		return v, ok
	}
	fs := flag.NewFlagSet("workspace", flag.ContinueOnError)
	fs.SetOutput(io.Discard)

	cfg, err := workspaceserver.ConfigFromFlags(fs, []string{"-listen-addr", "127.0.0.1:7000", "-blob-dir", "/tmp/blobs"}, lookup)

	require.NoError(t, err)
	assert.Equal(t, "127.0.0.1:7000", cfg.ListenAddr, "the flag wins")
	assert.Equal(t, "127.0.0.1:6001", cfg.MeteringAddr, "the variable wins over the default")
	assert.Empty(t, cfg.MetricsAddr, "an empty variable disables metrics")
	assert.Equal(t, 30*time.Second, cfg.ReservationTTL)
	assert.Equal(t, "postgres://from-env@127.0.0.1/metering", cfg.DatabaseURL)
	assert.Equal(t, "/tmp/blobs", cfg.BlobDir)
	assert.Equal(t, workspaceserver.DefaultShutdownTimeout, cfg.ShutdownTimeout, "the default")
}

func TestConfigFromFlagsRejectsBadVariable(t *testing.T) {
	t.Parallel()
	fs := flag.NewFlagSet("workspace", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	lookup := func(key string) (string, bool) {
		return "soon", key == "WORKSPACE_METERING_TIMEOUT"
	}

	_, err := workspaceserver.ConfigFromFlags(fs, nil, lookup)

	assert.ErrorContains(t, err, `invalid value "soon" of WORKSPACE_METERING_TIMEOUT`)
}

func TestRunRejectsMissingTokenFile(t *testing.T) {
	t.Parallel()
	cfg := validConfig()
	cfg.MeteringTokenFile = filepath.Join(t.TempDir(), "absent")

	err := workspaceserver.Run(context.Background(), cfg, slog.New(slog.DiscardHandler))

	assert.ErrorContains(t, err, "read the Metering token file")
	assert.NotContains(t, err.Error(), "hunter2")
}

func TestRunRejectsInvalidConfig(t *testing.T) {
	t.Parallel()
	cfg := validConfig()
	cfg.BlobDir = ""

	err := workspaceserver.Run(context.Background(), cfg, slog.New(slog.DiscardHandler))

	assert.ErrorContains(t, err, "invalid config")
	_, statErr := os.Stat(cfg.BlobDir)
	assert.Error(t, statErr)
}
