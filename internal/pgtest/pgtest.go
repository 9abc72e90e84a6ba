// Package pgtest gives each test its own PostgreSQL database with the schema
// migrated, on the server that localpg.Find returns, so DATABASE_URL wins when
// it is set.
//
// The first call in a test process migrates a template database once, named
// after a hash of the migration files, and every call clones that template
// with CREATE DATABASE ... TEMPLATE, which copies files instead of running the
// migrations again. Test processes that run at once, as `go test ./...` runs
// packages, share the template.
//
// NOTE: templates built from older migration files stay on the server, and so
// do the databases of a test process that was killed before its cleanup ran.
// Both are safe to drop by hand when no tests run: their names start with
// metering_template_ and metering_test_.
package pgtest

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/metering/metering/internal/localpg"
	"github.com/metering/metering/internal/schema"
	"github.com/metering/metering/migrations"
)

const (
	// TimeZone is the session time zone of every database that NewDatabase
	// and NewPool create. Its offset from UTC is +12:45 or +13:45, so a query
	// whose result depends on the session time zone returns a visibly wrong
	// result in tests.
	TimeZone = "Pacific/Chatham"

	// databasePrefix starts the name of every test database.
	databasePrefix = "metering_test_"

	// templatePrefix starts the name of every template database.
	templatePrefix = "metering_template_"

	// templateLockKey is the PostgreSQL advisory lock that serialises template
	// creation across test processes.
	templateLockKey int64 = 0x6d65746572696e67

	// setupTimeout bounds finding the server and building the template.
	setupTimeout = 3 * time.Minute

	// databaseTimeout bounds creating or dropping one test database.
	databaseTimeout = time.Minute

	// objectInUseRetryInterval is the pause before retrying a statement that
	// failed because another session was still connected to its database.
	objectInUseRetryInterval = 50 * time.Millisecond
)

// server is the state shared by every test in the process.
type server struct {
	baseURL  string
	admin    *pgxpool.Pool
	template string
}

// getServer returns the shared server state, setting it up on the first call.
// A failure is returned to every later call, so that a missing server fails
// each test quickly with the same message.
var getServer = sync.OnceValues(func() (*server, error) {
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()

	return setUp(ctx, slog.New(slog.NewTextHandler(os.Stderr, nil)))
})

// NewDatabase creates a database with every migration applied and returns its
// connection URL. t.Cleanup drops the database, ending any connection to it
// that the test left open.
//
// The session time zone of the database is Pacific/Chatham (see TimeZone),
// not UTC, so that every test proves that no result depends on the session
// time zone.
//
// NewDatabase is safe to call from parallel tests and from test processes
// that run at once. It fails the test when no server is available.
func NewDatabase(t testing.TB) string {
	t.Helper()

	srv, err := getServer()
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), databaseTimeout)
	defer cancel()

	name, err := srv.cloneTemplate(ctx)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}

	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), databaseTimeout)
		defer cancel()

		if err := srv.dropDatabase(ctx, name); err != nil {
			t.Errorf("pgtest: %v", err)
		}
	})

	databaseURL, err := withDatabase(srv.baseURL, name)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}

	return databaseURL
}

// NewPool creates a database like NewDatabase and returns a pool connected to
// it. t.Cleanup closes the pool, then drops the database.
func NewPool(t testing.TB) *pgxpool.Pool {
	t.Helper()

	databaseURL := NewDatabase(t)

	ctx, cancel := context.WithTimeout(context.Background(), databaseTimeout)
	defer cancel()

	pool, err := pgxpool.New(ctx, databaseURL)
	if err != nil {
		t.Fatalf("pgtest: connect to the test database: %v", err)
	}
	// Cleanups run last in, first out, so the pool closes before the
	// database is dropped.
	t.Cleanup(pool.Close)

	return pool
}

// NewEmptyDatabase creates a database without migrations and returns its
// connection URL, for tests of the migrations themselves. t.Cleanup drops the
// database. Its session time zone is TimeZone, as in NewDatabase.
func NewEmptyDatabase(t testing.TB) string {
	t.Helper()

	srv, err := getServer()
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), databaseTimeout)
	defer cancel()

	name := databasePrefix + randomHex()
	if err := srv.createDatabase(ctx, name, "template0"); err != nil {
		t.Fatalf("pgtest: %v", err)
	}

	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), databaseTimeout)
		defer cancel()

		if err := srv.dropDatabase(ctx, name); err != nil {
			t.Errorf("pgtest: %v", err)
		}
	})

	databaseURL, err := withDatabase(srv.baseURL, name)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}

	return databaseURL
}

// setUp finds the server, connects to it and makes sure that the template for
// the current migrations exists.
func setUp(ctx context.Context, logger *slog.Logger) (*server, error) {
	baseURL, err := localpg.Find(ctx, localpg.Options{Logger: logger})
	if err != nil {
		return nil, err
	}

	admin, err := pgxpool.New(ctx, baseURL)
	if err != nil {
		return nil, fmt.Errorf("connect to the test server: %w", err)
	}

	hash, err := hashMigrations(migrations.FS)
	if err != nil {
		admin.Close()
		return nil, err
	}

	srv := &server{
		baseURL:  baseURL,
		admin:    admin,
		template: templatePrefix + hash,
	}
	if err := srv.ensureTemplate(ctx, logger); err != nil {
		admin.Close()
		return nil, err
	}

	return srv, nil
}

// hashMigrations returns the first 12 hex digits of a SHA-256 over the names
// and contents of the files in the root of fsys, so that any change to a
// migration gives a new template name.
func hashMigrations(fsys fs.FS) (string, error) {
	entries, err := fs.ReadDir(fsys, ".")
	if err != nil {
		return "", fmt.Errorf("list migrations: %w", err)
	}

	hash := sha256.New()
	for _, entry := range entries {
		if entry.IsDir() {
			continue
		}

		content, err := fs.ReadFile(fsys, entry.Name())
		if err != nil {
			return "", fmt.Errorf("read migration %s: %w", entry.Name(), err)
		}

		// The lengths keep "a"+"bc" apart from "ab"+"c".
		fmt.Fprintf(hash, "%d:%s%d:", len(entry.Name()), entry.Name(), len(content))
		hash.Write(content)
	}

	return hex.EncodeToString(hash.Sum(nil))[:12], nil
}

// ensureTemplate creates the template database unless it exists. It builds
// the template under another name and renames it when complete, so a process
// that dies while migrating never leaves a half-migrated template behind.
func (s *server) ensureTemplate(ctx context.Context, logger *slog.Logger) error {
	conn, err := s.admin.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("connect to the test server: %w", err)
	}
	defer conn.Release()

	// The advisory lock belongs to this session, so every statement between
	// lock and unlock that must run under it uses conn.
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", templateLockKey); err != nil {
		return fmt.Errorf("lock template creation: %w", err)
	}
	defer func() {
		// A failed unlock leaves the lock with the session, so the session
		// must not go back to the pool.
		if _, err := conn.Exec(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock($1)", templateLockKey); err != nil {
			_ = conn.Hijack().Close(context.WithoutCancel(ctx))
		}
	}()

	var exists bool
	err = conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", s.template).Scan(&exists)
	if err != nil {
		return fmt.Errorf("look up template database %s: %w", s.template, err)
	}
	if exists {
		return nil
	}

	logger.InfoContext(ctx, "building template database", "template", s.template)
	return s.buildTemplate(ctx, conn.Conn(), logger)
}

// buildTemplate migrates a new database and renames it to s.template. The
// caller holds the template lock on conn.
func (s *server) buildTemplate(ctx context.Context, conn *pgx.Conn, logger *slog.Logger) error {
	build := s.template + "_build"

	// A process that died while building leaves this database behind.
	if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+quote(build)+" WITH (FORCE)"); err != nil {
		return fmt.Errorf("drop unfinished template database %s: %w", build, err)
	}
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+quote(build)+" TEMPLATE template0"); err != nil {
		return fmt.Errorf("create template database %s: %w", build, err)
	}

	buildURL, err := withDatabase(s.baseURL, build)
	if err != nil {
		return err
	}
	if err := schema.Migrate(ctx, buildURL, logger); err != nil {
		return fmt.Errorf("migrate template database %s: %w", build, err)
	}

	// The sessions of Migrate may still be ending on the server, and
	// PostgreSQL rejects the rename until they have.
	err = retryObjectInUse(ctx, func() error {
		_, err := conn.Exec(ctx, "ALTER DATABASE "+quote(build)+" RENAME TO "+quote(s.template))
		return err
	})
	if err != nil {
		return fmt.Errorf("rename template database %s to %s: %w", build, s.template, err)
	}

	// No session may connect to the template, which would make CREATE
	// DATABASE ... TEMPLATE fail, and IS_TEMPLATE lets a user with only the
	// CREATEDB privilege clone it.
	if _, err := conn.Exec(ctx, "ALTER DATABASE "+quote(s.template)+" WITH ALLOW_CONNECTIONS false IS_TEMPLATE true"); err != nil {
		return fmt.Errorf("mark template database %s: %w", s.template, err)
	}

	return nil
}

// cloneTemplate creates a database from the template and returns its name.
func (s *server) cloneTemplate(ctx context.Context) (string, error) {
	name := databasePrefix + randomHex()
	if err := s.createDatabase(ctx, name, s.template); err != nil {
		return "", err
	}

	return name, nil
}

// createDatabase creates the database name as a copy of template, with the
// session time zone TimeZone.
func (s *server) createDatabase(ctx context.Context, name, template string) error {
	// PostgreSQL rejects a copy while another session is connected to the
	// template, such as a process that is still ending its migration sessions.
	err := retryObjectInUse(ctx, func() error {
		_, err := s.admin.Exec(ctx, "CREATE DATABASE "+quote(name)+" TEMPLATE "+quote(template))
		return err
	})
	if err != nil {
		return fmt.Errorf("create test database %s from %s: %w", name, template, err)
	}

	if _, err := s.admin.Exec(ctx, "ALTER DATABASE "+quote(name)+" SET timezone TO '"+TimeZone+"'"); err != nil {
		return errors.Join(
			fmt.Errorf("set the time zone of test database %s: %w", name, err),
			s.dropDatabase(context.WithoutCancel(ctx), name),
		)
	}

	return nil
}

// dropDatabase drops the database name, ending the sessions connected to it.
func (s *server) dropDatabase(ctx context.Context, name string) error {
	if _, err := s.admin.Exec(ctx, "DROP DATABASE IF EXISTS "+quote(name)+" WITH (FORCE)"); err != nil {
		return fmt.Errorf("drop test database %s: %w", name, err)
	}

	return nil
}

// retryObjectInUse calls run until it returns an error other than
// object_in_use (SQLSTATE 55006, "database is being accessed by other
// users"), or until ctx ends.
func retryObjectInUse(ctx context.Context, run func() error) error {
	for {
		err := run()

		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "55006" {
			return err
		}

		select {
		case <-ctx.Done():
			return errors.Join(err, ctx.Err())
		case <-time.After(objectInUseRetryInterval):
		}
	}
}

// withDatabase returns connString with its database replaced by name. It
// accepts URLs and keyword/value strings.
func withDatabase(connString, name string) (string, error) {
	if !strings.HasPrefix(connString, "postgres://") && !strings.HasPrefix(connString, "postgresql://") {
		// In a keyword/value string, the last value of a keyword wins.
		return connString + " dbname=" + name, nil
	}

	u, err := url.Parse(connString)
	if err != nil {
		// The error of url.Parse contains the URL, with any password.
		return "", errors.New("parse the server URL: invalid URL")
	}
	u.Path = "/" + name
	u.RawPath = ""

	query := u.Query()
	if query.Has("dbname") || query.Has("database") {
		query.Del("dbname")
		query.Del("database")
		u.RawQuery = query.Encode()
	}

	return u.String(), nil
}

// quote returns name as a quoted SQL identifier.
func quote(name string) string {
	return pgx.Identifier{name}.Sanitize()
}

// randomHex returns 16 random hex digits.
func randomHex() string {
	var b [8]byte
	_, _ = rand.Read(b[:])

	return hex.EncodeToString(b[:])
}
