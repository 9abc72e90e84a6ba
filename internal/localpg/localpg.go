// Package localpg finds or starts a PostgreSQL server for development and
// tests, so that neither needs a database set up by hand.
//
// Find tries, in order: the DATABASE_URL environment variable, a server on
// 127.0.0.1:5432 that accepts the user postgres, and a private cluster that it
// creates with initdb and starts with pg_ctl. The private cluster keeps its data
// in the module's .data/postgres directory and listens only on 127.0.0.1.
package localpg

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

const (
	// DefaultPort is the TCP port on 127.0.0.1 of the private cluster. It
	// differs from 5432 so that the private cluster does not collide with a
	// server installed on the machine with the default port.
	DefaultPort = 55432

	// DefaultServerURL is the server that Find tries when DATABASE_URL is
	// unset: a PostgreSQL installed on the machine with its default port and
	// superuser, reachable without a password.
	DefaultServerURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"

	// DefaultVersionsDir is where Debian and Ubuntu install PostgreSQL, one
	// directory per major version, each with a bin directory.
	DefaultVersionsDir = "/usr/lib/postgresql"

	// probeTimeout bounds each attempt to connect to a server that may not exist.
	probeTimeout = 2 * time.Second

	// clusterUser is the superuser of the private cluster, created by initdb.
	clusterUser = "postgres"
)

// Options configures Find and Stop. The zero value uses every default.
type Options struct {
	// Dir is the data directory of the private cluster. Empty means
	// .data/postgres in the module root, which is the nearest directory at or
	// above the working directory that contains a go.mod file.
	Dir string

	// Port is the TCP port of the private cluster on 127.0.0.1. Zero means
	// DefaultPort.
	Port int

	// ServerURL is the server tried when DATABASE_URL is unset. Empty means
	// DefaultServerURL.
	ServerURL string

	// VersionsDir contains one directory per installed PostgreSQL major
	// version, each with a bin directory. Find looks there for initdb and
	// pg_ctl when PATH has neither, and takes the newest version. Empty means
	// DefaultVersionsDir.
	VersionsDir string

	// Getenv reads the DATABASE_URL and PATH environment variables. Nil means
	// os.Getenv.
	Getenv func(key string) string

	// Logger receives progress messages. Nil discards them.
	Logger *slog.Logger
}

// withDefaults returns a copy of o with every empty field set to its default.
func (o Options) withDefaults() Options {
	if o.Port == 0 {
		o.Port = DefaultPort
	}
	if o.ServerURL == "" {
		o.ServerURL = DefaultServerURL
	}
	if o.VersionsDir == "" {
		o.VersionsDir = DefaultVersionsDir
	}
	if o.Getenv == nil {
		o.Getenv = os.Getenv
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}

	return o
}

// Validate reports every invalid field of o, joined with errors.Join. Empty
// fields are valid because they take their defaults.
func (o Options) Validate() error {
	var errs []error
	if o.Port < 0 || o.Port > 65535 {
		errs = append(errs, fmt.Errorf("invalid Port %d: must be between 1 and 65535, or 0 for %d", o.Port, DefaultPort))
	}
	if o.ServerURL != "" {
		if _, err := pgx.ParseConfig(o.ServerURL); err != nil {
			errs = append(errs, fmt.Errorf("invalid ServerURL: %w", err))
		}
	}

	return errors.Join(errs...)
}

// Find returns the connection URL of a PostgreSQL server for development and
// tests. It returns the first of these that works:
//
//  1. the DATABASE_URL environment variable, as is and without connecting;
//  2. opts.ServerURL (by default the user postgres on 127.0.0.1:5432), if a
//     connection succeeds within two seconds;
//  3. the private cluster in opts.Dir on 127.0.0.1:opts.Port, with trust
//     authentication for the user postgres. Find reuses it when it accepts
//     connections, starts it when it is initialised, and otherwise creates it
//     with initdb first.
//
// When the process runs as root, Find runs initdb and pg_ctl as the postgres
// system user, because PostgreSQL refuses to run as root. Several processes
// may call Find at once: a lock file next to the data directory lets only one
// of them create or start the cluster. The server that Find starts keeps
// running after the process exits, and Stop stops it.
//
// Find returns an error that names what is missing when no step works.
func Find(ctx context.Context, opts Options) (string, error) {
	if err := opts.Validate(); err != nil {
		return "", err
	}
	opts = opts.withDefaults()
	logger := opts.Logger

	if databaseURL := opts.Getenv("DATABASE_URL"); databaseURL != "" {
		logger.InfoContext(ctx, "using the server in DATABASE_URL")
		return databaseURL, nil
	}

	serverErr := probe(ctx, opts.ServerURL)
	if serverErr == nil {
		logger.InfoContext(ctx, "using the local server", "url", redact(opts.ServerURL))
		return opts.ServerURL, nil
	}
	logger.InfoContext(ctx, "local server not available", "url", redact(opts.ServerURL), "error", serverErr)

	clusterURL, err := startPrivateCluster(ctx, opts)
	if err != nil {
		return "", fmt.Errorf("no PostgreSQL found: DATABASE_URL is unset, nothing accepts connections at %s (%w), and %w",
			describeServer(opts.ServerURL), serverErr, err)
	}

	return clusterURL, nil
}

// Stop stops the private cluster in opts.Dir with a fast shutdown, which ends
// open sessions. It returns nil when the cluster is not running or was never
// created.
func Stop(ctx context.Context, opts Options) error {
	if err := opts.Validate(); err != nil {
		return err
	}
	opts = opts.withDefaults()

	c, err := newCluster(opts)
	if err != nil {
		return err
	}

	return c.stop(ctx)
}

// privateClusterURL returns the connection URL of the private cluster on port.
func privateClusterURL(port int) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.User(clusterUser),
		Host:     "127.0.0.1:" + strconv.Itoa(port),
		Path:     "/postgres",
		RawQuery: "sslmode=disable",
	}

	return u.String()
}

// probe connects to the server at connString and closes the connection.
func probe(ctx context.Context, connString string) error {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()

	conn, err := pgx.Connect(ctx, connString)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	return conn.Ping(ctx)
}

// describeServer returns "host:port as user NAME" for connString, without the
// password.
func describeServer(connString string) string {
	cfg, err := pgx.ParseConfig(connString)
	if err != nil {
		return redact(connString)
	}

	return fmt.Sprintf("%s:%d as user %s", cfg.Host, cfg.Port, cfg.User)
}

// redact returns connString with any password replaced by "xxxxx", so that it
// can be logged. A connection string that is not a URL is replaced whole,
// because a password in it cannot be found without parsing every form.
func redact(connString string) string {
	u, err := url.Parse(connString)
	if err != nil || u.Scheme == "" {
		return "(connection string not shown)"
	}

	return u.Redacted()
}

// moduleRoot returns the nearest directory at or above the working directory
// that contains a go.mod file.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("get working directory: %w", err)
	}

	start := dir
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}

		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod found at or above %s: run from inside the module or set Options.Dir", start)
		}
		dir = parent
	}
}

// EnsureDatabase creates the database name on the server at serverURL when it
// does not exist, and returns serverURL with its database replaced by name.
func EnsureDatabase(ctx context.Context, serverURL, name string) (string, error) {
	u, err := url.Parse(serverURL)
	if err != nil || u.Scheme == "" {
		return "", errors.New("ensure database: the server address must be a postgres:// URL")
	}

	conn, err := pgx.Connect(ctx, serverURL)
	if err != nil {
		return "", fmt.Errorf("ensure database %q: %w", name, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))

	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).Scan(&exists); err != nil {
		return "", fmt.Errorf("ensure database %q: %w", name, err)
	}
	if !exists {
		_, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize())
		var pgErr *pgconn.PgError
		// 42P04 is duplicate_database: another process created it meanwhile.
		if err != nil && !(errors.As(err, &pgErr) && pgErr.Code == "42P04") {
			return "", fmt.Errorf("create database %q: %w", name, err)
		}
	}

	u.Path = "/" + name
	return u.String(), nil
}
