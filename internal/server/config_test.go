package server_test

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/metering/metering/internal/server"
)

const testDatabaseURL = "postgres://metering:s3cret-pw@127.0.0.1:5432/metering?sslmode=disable"

func validConfig() server.Config {
	cfg := server.DefaultConfig()
	cfg.DatabaseURL = testDatabaseURL

	return cfg
}

func TestConfigValidateAcceptsValidConfig(t *testing.T) {
	t.Parallel()

	tests := []struct {
		name   string
		mutate func(*server.Config)
	}{
		{"defaults", func(*server.Config) {}},
		{"metrics disabled", func(c *server.Config) { c.MetricsAddr = "" }},
		{"port zero twice", func(c *server.Config) { c.ListenAddr, c.MetricsAddr = "127.0.0.1:0", "127.0.0.1:0" }},
		{"keyword/value URL", func(c *server.Config) { c.DatabaseURL = "host=127.0.0.1 user=postgres dbname=metering" }},
		{"upper-case log level", func(c *server.Config) { c.LogLevel = "DEBUG" }},
		{"IPv6 listen address", func(c *server.Config) { c.ListenAddr = "[::1]:50051" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg := validConfig()
			tt.mutate(&cfg)

			assert.NoError(t, cfg.Validate())
		})
	}
}

func TestConfigValidateNamesBadField(t *testing.T) {
	t.Parallel()

	tests := []struct {
		name   string
		mutate func(*server.Config)
		field  string
		rule   string
	}{
		{"listen address without port", func(c *server.Config) { c.ListenAddr = "localhost" }, "ListenAddr (-listen-addr, METERING_LISTEN_ADDR)", "must be host:port"},
		{"listen address empty", func(c *server.Config) { c.ListenAddr = "" }, "ListenAddr", "missing, must be host:port"},
		{"listen port not a number", func(c *server.Config) { c.ListenAddr = "127.0.0.1:grpc" }, "ListenAddr", "must be a number from 0 to 65535"},
		{"listen port too large", func(c *server.Config) { c.ListenAddr = "127.0.0.1:65536" }, "ListenAddr", "must be a number from 0 to 65535"},
		{"missing DATABASE_URL", func(c *server.Config) { c.DatabaseURL = "" }, "DatabaseURL (-database-url, DATABASE_URL)", "missing"},
		{"unparsable DATABASE_URL", func(c *server.Config) { c.DatabaseURL = "postgres://u@127.0.0.1:port/db" }, "DatabaseURL", "invalid connection string"},
		{"bad pool setting", func(c *server.Config) { c.DatabaseURL = testDatabaseURL + "&pool_max_conns=many" }, "DatabaseURL", "pool_max_conns"},
		{"metrics address without port", func(c *server.Config) { c.MetricsAddr = "metrics" }, "MetricsAddr (-metrics-addr, METERING_METRICS_ADDR)", "must be host:port"},
		{"metrics address same as listen", func(c *server.Config) { c.MetricsAddr = c.ListenAddr }, "MetricsAddr", "must differ from ListenAddr"},
		{"bad log level", func(c *server.Config) { c.LogLevel = "verbose" }, "LogLevel (-log-level, METERING_LOG_LEVEL)", "must be one of debug, info, warn, error"},
		{"empty log level", func(c *server.Config) { c.LogLevel = "" }, "LogLevel", "must be one of"},
		{"negative sweep interval", func(c *server.Config) { c.SweepInterval = -time.Second }, "SweepInterval (-sweep-interval, METERING_SWEEP_INTERVAL) -1s", "must be positive"},
		{"zero sweep interval", func(c *server.Config) { c.SweepInterval = 0 }, "SweepInterval", "must be positive"},
		{"negative health interval", func(c *server.Config) { c.HealthInterval = -time.Second }, "HealthInterval (-health-interval, METERING_HEALTH_INTERVAL)", "must be positive"},
		{"negative shutdown timeout", func(c *server.Config) { c.ShutdownTimeout = -time.Second }, "ShutdownTimeout (-shutdown-timeout, METERING_SHUTDOWN_TIMEOUT)", "must be positive"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg := validConfig()
			tt.mutate(&cfg)

			err := cfg.Validate()

			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.field)
			assert.Contains(t, err.Error(), tt.rule)
			assert.Equal(t, 1, strings.Count(err.Error(), "\n")+1, "only the bad field is reported: %v", err)
		})
	}
}

func TestConfigValidateReportsEveryBadField(t *testing.T) {
	t.Parallel()
	cfg := server.Config{ListenAddr: "nowhere", LogLevel: "loud", SweepInterval: -1}

	err := cfg.Validate()

	require.Error(t, err)
	for _, field := range []string{"ListenAddr", "DatabaseURL", "LogLevel", "SweepInterval", "HealthInterval", "ShutdownTimeout"} {
		assert.Contains(t, err.Error(), field)
	}
	assert.NotContains(t, err.Error(), "MetricsAddr", "an empty metrics address is valid")
}

func TestConfigValidateHidesPassword(t *testing.T) {
	t.Parallel()

	for _, databaseURL := range []string{
		"postgres://u:s3cret-pw@127.0.0.1:bad/db",
		"postgres://u@127.0.0.1/db?password=s3cret-pw&pool_max_conns=x",
		"host=127.0.0.1 password=s3cret-pw port=abc",
	} {
		cfg := validConfig()
		cfg.DatabaseURL = databaseURL

		err := cfg.Validate()

		require.Error(t, err, databaseURL)
		assert.NotContains(t, err.Error(), "s3cret-pw")
	}
}

func TestConfigLevel(t *testing.T) {
	t.Parallel()

	tests := []struct {
		logLevel string
		want     slog.Level
	}{
		{"debug", slog.LevelDebug},
		{"info", slog.LevelInfo},
		{"warn", slog.LevelWarn},
		{"error", slog.LevelError},
		{"Error", slog.LevelError},
		{"invalid", slog.LevelInfo},
	}
	for _, tt := range tests {
		cfg := validConfig()
		cfg.LogLevel = tt.logLevel

		assert.Equal(t, tt.want, cfg.Level(), tt.logLevel)
	}
}

func TestConfigStringMasksPassword(t *testing.T) {
	t.Parallel()

	tests := []struct {
		name        string
		databaseURL string
		want        string
	}{
		{"URL user info", "postgres://metering:s3cret-pw@db.internal:5432/metering", "postgres://metering:xxxxx@db.internal:5432/metering"},
		{"URL query parameter", "postgresql://metering@db.internal/metering?password=s3cret-pw&sslmode=require", "postgresql://metering@db.internal/metering?password=xxxxx&sslmode=require"},
		{"keyword/value", "host=db.internal password=s3cret-pw dbname=metering", "host=db.internal password=xxxxx dbname=metering"},
		{"keyword/value quoted", "host=db.internal password='s3cret-pw with spaces' dbname=metering", "host=db.internal password=xxxxx dbname=metering"},
		{"keyword/value spaced", "host=db.internal password = s3cret-pw", "host=db.internal password = xxxxx"},
		{"unparsable URL", "postgres://metering:s3cret-pw@db.internal:port%zz/metering", "(invalid URL, hidden)"},
		{"no password", "postgres://metering@db.internal/metering", "postgres://metering@db.internal/metering"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg := validConfig()
			cfg.DatabaseURL = tt.databaseURL

			var logged bytes.Buffer
			slog.New(slog.NewJSONHandler(&logged, nil)).Info("config", "config", cfg)
			printed := map[string]string{
				"MaskDatabaseURL": server.MaskDatabaseURL(tt.databaseURL),
				"String":          cfg.String(),
				"%v":              fmt.Sprintf("%v", cfg),
				"%+v":             fmt.Sprintf("%+v", cfg),
				"%#v":             fmt.Sprintf("%#v", cfg),
				"LogValue":        logged.String(),
			}

			assert.Equal(t, tt.want, server.MaskDatabaseURL(tt.databaseURL))
			for format, text := range printed {
				assert.NotContains(t, text, "s3cret", format)
			}
			assert.Contains(t, cfg.String(), "127.0.0.1:50051", "other fields are printed")
			assert.Contains(t, logged.String(), `"listen_addr":"127.0.0.1:50051"`)
		})
	}
}

func TestConfigFromFlags(t *testing.T) {
	t.Parallel()

	tests := []struct {
		name string
		args []string
		env  map[string]string
		want func(*server.Config)
	}{
		{
			name: "defaults",
			want: func(*server.Config) {},
		},
		{
			name: "environment",
			env: map[string]string{
				"DATABASE_URL":              testDatabaseURL,
				"METERING_LISTEN_ADDR":      "0.0.0.0:6000",
				"METERING_METRICS_ADDR":     "0.0.0.0:6001",
				"METERING_LOG_LEVEL":        "debug",
				"METERING_MIGRATE":          "true",
				"METERING_SWEEP_INTERVAL":   "1m",
				"METERING_HEALTH_INTERVAL":  "500ms",
				"METERING_SHUTDOWN_TIMEOUT": "5s",
			},
			want: func(c *server.Config) {
				c.DatabaseURL = testDatabaseURL
				c.ListenAddr = "0.0.0.0:6000"
				c.MetricsAddr = "0.0.0.0:6001"
				c.LogLevel = "debug"
				c.Migrate = true
				c.SweepInterval = time.Minute
				c.HealthInterval = 500 * time.Millisecond
				c.ShutdownTimeout = 5 * time.Second
			},
		},
		{
			name: "flags",
			args: []string{
				"-database-url", testDatabaseURL, "-listen-addr", ":7000", "-metrics-addr", ":7001",
				"-log-level", "warn", "-migrate", "-sweep-interval", "30s", "-health-interval", "1s",
				"-shutdown-timeout", "1m",
			},
			want: func(c *server.Config) {
				c.DatabaseURL = testDatabaseURL
				c.ListenAddr = ":7000"
				c.MetricsAddr = ":7001"
				c.LogLevel = "warn"
				c.Migrate = true
				c.SweepInterval = 30 * time.Second
				c.HealthInterval = time.Second
				c.ShutdownTimeout = time.Minute
			},
		},
		{
			name: "flag wins over environment",
			args: []string{"-log-level=error", "-migrate=false"},
			env:  map[string]string{"METERING_LOG_LEVEL": "debug", "METERING_MIGRATE": "1"},
			want: func(c *server.Config) { c.LogLevel = "error" },
		},
		{
			name: "empty metrics variable disables metrics",
			env:  map[string]string{"METERING_METRICS_ADDR": ""},
			want: func(c *server.Config) { c.MetricsAddr = "" },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			want := server.DefaultConfig()
			tt.want(&want)

			got, err := server.ConfigFromFlags(newFlagSet(), tt.args, lookupIn(tt.env))

			require.NoError(t, err)
			assert.Equal(t, want, got)
		})
	}
}

func TestConfigFromFlagsErrors(t *testing.T) {
	t.Parallel()

	tests := []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{"bad duration variable", nil, map[string]string{"METERING_SWEEP_INTERVAL": "often"}, `invalid value "often" of METERING_SWEEP_INTERVAL`},
		{"bad bool variable", nil, map[string]string{"METERING_MIGRATE": "yes please"}, `invalid value "yes please" of METERING_MIGRATE`},
		{"unknown flag", []string{"-port", "1"}, nil, "flag provided but not defined: -port"},
		{"bad duration flag", []string{"-health-interval", "2"}, nil, "-health-interval"},
		{"argument after flags", []string{"-log-level", "info", "extra"}, nil, `unexpected argument "extra"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			_, err := server.ConfigFromFlags(newFlagSet(), tt.args, lookupIn(tt.env))

			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

func TestConfigFromFlagsHelp(t *testing.T) {
	t.Parallel()
	fs := newFlagSet()

	_, err := server.ConfigFromFlags(fs, []string{"-h"}, lookupIn(nil))

	assert.ErrorIs(t, err, flag.ErrHelp)
	var help strings.Builder
	fs.SetOutput(&help)
	fs.PrintDefaults()
	for _, env := range []string{
		"DATABASE_URL", "METERING_LISTEN_ADDR", "METERING_METRICS_ADDR", "METERING_LOG_LEVEL",
		"METERING_MIGRATE", "METERING_SWEEP_INTERVAL", "METERING_HEALTH_INTERVAL", "METERING_SHUTDOWN_TIMEOUT",
	} {
		assert.Contains(t, help.String(), "(env "+env+")")
	}
}

func TestConfigFromFlagsHidesPasswordInHelp(t *testing.T) {
	t.Parallel()
	fs := newFlagSet()

	_, err := server.ConfigFromFlags(fs, nil, lookupIn(map[string]string{"DATABASE_URL": testDatabaseURL}))

	require.NoError(t, err)
	var help strings.Builder
	fs.SetOutput(&help)
	fs.PrintDefaults()
	assert.NotContains(t, help.String(), "s3cret-pw", "an environment value must not become a printed default")
}

func newFlagSet() *flag.FlagSet {
	fs := flag.NewFlagSet("metering", flag.ContinueOnError)
	fs.SetOutput(io.Discard)

	return fs
}

func lookupIn(env map[string]string) func(string) (string, bool) {
	return func(name string) (string, bool) {
		value, ok := env[name]
		return value, ok
	}
}
