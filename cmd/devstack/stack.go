package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"

	"golang.org/x/sync/errgroup"

	"github.com/metering/metering/internal/localpg"
	"github.com/metering/metering/internal/schema"
	"github.com/metering/metering/internal/server"
	"github.com/metering/metering/internal/workspaceserver"
)

// Development settings that match the Makefile's.
const (
	databaseName    = "metering"
	defaultIssuer   = "metering-dev"
	defaultAudience = "metering"
	// secretBytes is the number of random bytes of a new development JWT
	// secret, written in base64.
	secretBytes = 48
)

// config is the command line of devstack.
type config struct {
	meteringAddr         string
	workspaceAddr        string
	meteringMetricsAddr  string
	workspaceMetricsAddr string
	dataDir              string
	account              string
	plan                 string
	user                 string
	level                slog.Level

	// JWT settings, from the environment variables that the Makefile sets.
	jwtSecretFile string
	jwtIssuer     string
	jwtAudience   string
}

// parseFlags parses args. The JWT settings come from
// METERING_JWT_HS256_SECRET_FILE, METERING_JWT_ISSUER and
// METERING_JWT_AUDIENCE, read with getenv, as for `make run`.
func parseFlags(args []string, getenv func(string) string) (config, error) {
	var cfg config
	var logLevel string

	fs := flag.NewFlagSet("devstack", flag.ContinueOnError)
	fs.StringVar(&cfg.meteringAddr, "metering-addr", server.DefaultListenAddr, "host:port of Metering's gRPC listener")
	fs.StringVar(&cfg.workspaceAddr, "workspace-addr", workspaceserver.DefaultListenAddr, "host:port of the workspace server's gRPC listener")
	fs.StringVar(&cfg.meteringMetricsAddr, "metering-metrics-addr", server.DefaultMetricsAddr, "host:port of Metering's /metrics, empty disables it")
	fs.StringVar(&cfg.workspaceMetricsAddr, "workspace-metrics-addr", workspaceserver.DefaultMetricsAddr, "host:port of the workspace server's /metrics, empty disables it")
	fs.StringVar(&cfg.dataDir, "data-dir", ".data", "directory of the development secret, the tokens and the attachments")
	fs.StringVar(&cfg.account, "account", "acme", "account that is created on -plan when missing")
	fs.StringVar(&cfg.plan, "plan", "free", "plan of a newly created -account")
	fs.StringVar(&cfg.user, "user", "alice", "user, a member of -account, whose JWT is printed")
	fs.StringVar(&logLevel, "log-level", "info", "minimum level of logged records: debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return config{}, err
	}
	if fs.NArg() > 0 {
		return config{}, fmt.Errorf("unexpected argument %q after the flags", fs.Arg(0))
	}

	level, err := server.ParseLogLevel(logLevel)
	if err != nil {
		return config{}, fmt.Errorf("-log-level %q: %w", logLevel, err)
	}
	cfg.level = level

	cfg.jwtSecretFile = valueOr(getenv("METERING_JWT_HS256_SECRET_FILE"), filepath.Join(cfg.dataDir, "dev-jwt-secret"))
	cfg.jwtIssuer = valueOr(getenv("METERING_JWT_ISSUER"), defaultIssuer)
	cfg.jwtAudience = valueOr(getenv("METERING_JWT_AUDIENCE"), defaultAudience)

	return cfg, nil
}

func valueOr(value, fallback string) string {
	if value == "" {
		return fallback
	}

	return value
}

// runStack prepares the database and the secret, starts Metering, issues
// the credentials, starts the workspace server and prints the credentials.
// It returns when ctx is done and both servers have stopped, or when one
// fails.
func runStack(ctx context.Context, cfg config, getenv func(string) string, out io.Writer, logger *slog.Logger) error {
	databaseURL, err := findDatabase(ctx, getenv, logger)
	if err != nil {
		return err
	}
	if err := schema.Migrate(ctx, databaseURL, logger); err != nil {
		return err
	}
	if err := workspaceserver.Migrate(ctx, databaseURL, logger); err != nil {
		return err
	}

	secret, err := ensureSecret(cfg.jwtSecretFile)
	if err != nil {
		return err
	}

	var lc net.ListenConfig
	meteringListener, err := lc.Listen(ctx, "tcp", cfg.meteringAddr)
	if err != nil {
		return fmt.Errorf("listen for Metering on %s: %w", cfg.meteringAddr, err)
	}
	workspaceListener, err := lc.Listen(ctx, "tcp", cfg.workspaceAddr)
	if err != nil {
		_ = meteringListener.Close()
		return fmt.Errorf("listen for the workspace server on %s: %w", cfg.workspaceAddr, err)
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, ctx := errgroup.WithContext(ctx)

	meteringAddr := meteringListener.Addr().String()
	g.Go(func() error {
		return server.Run(ctx, meteringConfig(cfg, databaseURL), logger.With("server", "metering"), server.WithGRPCListener(meteringListener))
	})

	creds, err := bootstrap(ctx, cfg, meteringAddr, secret)
	if err != nil {
		_ = workspaceListener.Close()
		cancel()
		return errors.Join(err, g.Wait())
	}

	tokenFile := filepath.Join(cfg.dataDir, "workspace-metering-token")
	if err := os.WriteFile(tokenFile, []byte(creds.workspaceToken+"\n"), 0o600); err != nil {
		_ = workspaceListener.Close()
		cancel()
		return errors.Join(fmt.Errorf("write the workspace's Metering token: %w", err), g.Wait())
	}

	wsCfg := workspaceConfig(cfg, databaseURL, meteringAddr, tokenFile)
	g.Go(func() error {
		return workspaceserver.Run(ctx, wsCfg, logger.With("server", "workspace"), workspaceserver.WithGRPCListener(workspaceListener))
	})

	addrs := addresses{metering: meteringAddr, workspace: workspaceListener.Addr().String()}
	envFile := filepath.Join(cfg.dataDir, "devstack.env")
	if err := os.WriteFile(envFile, []byte(creds.exports()), 0o600); err != nil {
		logger.WarnContext(ctx, "write the credentials file failed", "file", envFile, "error", err)
	}
	printWelcome(out, cfg, addrs, creds, envFile)

	return g.Wait()
}

// findDatabase returns DATABASE_URL, or the URL of the database "metering"
// on the server that localpg finds or starts, created when missing.
func findDatabase(ctx context.Context, getenv func(string) string, logger *slog.Logger) (string, error) {
	if databaseURL := getenv("DATABASE_URL"); databaseURL != "" {
		return databaseURL, nil
	}

	serverURL, err := localpg.Find(ctx, localpg.Options{Logger: logger, Getenv: getenv})
	if err != nil {
		return "", err
	}

	return localpg.EnsureDatabase(ctx, serverURL, databaseName)
}

// ensureSecret returns the development JWT secret in path, after writing a
// new random one when the file is missing or empty.
func ensureSecret(path string) ([]byte, error) {
	if secret, err := server.ReadKeyFile(path); err == nil {
		return secret, nil
	}

	random := make([]byte, secretBytes)
	if _, err := rand.Read(random); err != nil {
		return nil, fmt.Errorf("generate the development JWT secret: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create the directory of the development JWT secret: %w", err)
	}
	secret := base64.StdEncoding.EncodeToString(random)
	if err := os.WriteFile(path, []byte(secret+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("write the development JWT secret: %w", err)
	}

	return []byte(secret), nil
}

// meteringConfig returns the configuration of Metering. The migrations have
// run already.
func meteringConfig(cfg config, databaseURL string) server.Config {
	c := server.DefaultConfig()
	c.ListenAddr = cfg.meteringAddr
	c.DatabaseURL = databaseURL
	c.MetricsAddr = cfg.meteringMetricsAddr
	c.LogLevel = cfg.level.String()
	c.Auth.JWTIssuer = cfg.jwtIssuer
	c.Auth.JWTAudience = cfg.jwtAudience
	c.Auth.JWTSecretFile = cfg.jwtSecretFile

	return c
}

// workspaceConfig returns the configuration of the workspace server.
func workspaceConfig(cfg config, databaseURL, meteringAddr, tokenFile string) workspaceserver.Config {
	c := workspaceserver.DefaultConfig()
	c.ListenAddr = cfg.workspaceAddr
	c.DatabaseURL = databaseURL
	c.MeteringAddr = meteringAddr
	c.MeteringTokenFile = tokenFile
	c.BlobDir = filepath.Join(cfg.dataDir, "blobs")
	c.MetricsAddr = cfg.workspaceMetricsAddr
	c.LogLevel = cfg.level.String()
	c.Auth.JWTIssuer = cfg.jwtIssuer
	c.Auth.JWTAudience = cfg.jwtAudience
	c.Auth.JWTSecretFile = cfg.jwtSecretFile

	return c
}
