// Package schema applies the numbered SQL migrations in the migrations
// package to a PostgreSQL database, with golang-migrate. MigrateSet applies
// another set, such as the workspace server's, with a version table of its
// own.
package schema

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"strings"

	"github.com/golang-migrate/migrate/v4"
	migratepgx "github.com/golang-migrate/migrate/v4/database/pgx/v5"
	"github.com/golang-migrate/migrate/v4/source/iofs"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/metering/metering/migrations"
)

// Migrate applies every up migration in migrations.FS that the database at
// databaseURL has not applied yet, and records the version in the
// schema_migrations table. A database that is already current is a success.
//
// Several processes may migrate the same database at once: golang-migrate
// holds a PostgreSQL advisory lock while it works, so the others wait (up to
// 15 seconds, the DefaultLockTimeout of golang-migrate v4.20.1) and then find
// nothing left to apply.
// When ctx ends, Migrate stops after the migration that is running and returns
// ctx.Err(). An error mentioning a dirty database means that a migration
// failed earlier halfway, which needs a repair by hand.
func Migrate(ctx context.Context, databaseURL string, logger *slog.Logger) error {
	return migrateFS(ctx, migrations.FS, databaseURL, logger)
}

// DefaultTable is the table in which golang-migrate records the version of
// the Metering migrations.
const DefaultTable = "schema_migrations"

// Set is a migration set of its own: the workspace server, for example, keeps
// its tables in another schema of the same database, and versions them apart
// from Metering's.
type Set struct {
	// FS contains the up migrations in its root, named NNNN_title.up.sql.
	FS fs.FS
	// Table is the table in the session's current schema (public by
	// default) that records the version of this set. Two sets in one
	// database need two tables. Empty means DefaultTable.
	Table string
}

// MigrateSet applies the up migrations of set that the database at
// databaseURL has not applied yet, as Migrate does for Metering's. The
// golang-migrate advisory lock is derived from the table name, so migrating
// two sets at once does not make either wait.
func MigrateSet(ctx context.Context, databaseURL string, set Set, logger *slog.Logger) error {
	table := set.Table
	if table == "" {
		table = DefaultTable
	}

	return migrateTable(ctx, set.FS, table, databaseURL, logger)
}

// migrateFS applies the up migrations in the root of fsys, named
// NNNN_title.up.sql, and records the version in DefaultTable.
func migrateFS(ctx context.Context, fsys fs.FS, databaseURL string, logger *slog.Logger) error {
	return migrateTable(ctx, fsys, DefaultTable, databaseURL, logger)
}

// migrateTable applies the up migrations in the root of fsys and records the
// version in table.
func migrateTable(ctx context.Context, fsys fs.FS, table, databaseURL string, logger *slog.Logger) error {
	logger = logger.With("migrations_table", table)
	m, err := newMigrate(ctx, fsys, table, databaseURL, logger)
	if err != nil {
		return err
	}
	defer m.Close()

	before := describeVersion(m)
	logger.InfoContext(ctx, "migrating database", "version", before)

	// Up does not take a context. GracefulStop makes it return after the
	// migration that is running.
	stopAfterFunc := context.AfterFunc(ctx, func() { m.GracefulStop <- true })
	defer stopAfterFunc()

	err = m.Up()
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("migrate database: %w", ctxErr)
	}

	var dirty migrate.ErrDirty
	switch {
	case errors.Is(err, migrate.ErrNoChange):
		logger.InfoContext(ctx, "database schema already current", "version", before)
		return nil
	case errors.As(err, &dirty):
		return fmt.Errorf("migrate database: migration %d failed earlier and left the database dirty: "+
			"repair the schema by hand, then set %s to the last version that is complete, with dirty false", dirty.Version, table)
	case err != nil:
		return fmt.Errorf("migrate database from version %s, stopped at version %s: %w", before, describeVersion(m), err)
	}

	logger.InfoContext(ctx, "database migrated", "from_version", before, "to_version", describeVersion(m))

	return nil
}

// newMigrate connects to the database at databaseURL and returns a Migrate that
// reads its migrations from fsys and records the version in table. The caller
// must close it.
func newMigrate(ctx context.Context, fsys fs.FS, table, databaseURL string, logger *slog.Logger) (*migrate.Migrate, error) {
	source, err := iofs.New(fsys, ".")
	if err != nil {
		return nil, fmt.Errorf("read migrations: %w", err)
	}

	// pgx parses both URLs and keyword/value strings, and masks the password
	// in its errors. A URL given to golang-migrate would need the pgx5://
	// scheme instead, and its parse errors would show the password.
	config, err := pgx.ParseConfig(databaseURL)
	if err != nil {
		_ = source.Close()
		return nil, fmt.Errorf("parse database URL: %w", err)
	}

	db := stdlib.OpenDB(*config)
	if err := db.PingContext(ctx); err != nil {
		_ = source.Close()
		_ = db.Close()
		return nil, fmt.Errorf("connect to database %q on %s:%d: %w", config.Database, config.Host, config.Port, err)
	}

	driver, err := migratepgx.WithInstance(db, &migratepgx.Config{MigrationsTable: table})
	if err != nil {
		_ = source.Close()
		_ = db.Close()
		return nil, fmt.Errorf("prepare the %s table: %w", table, err)
	}

	m, err := migrate.NewWithInstance("iofs", source, "pgx5", driver)
	if err != nil {
		_ = source.Close()
		_ = driver.Close()
		return nil, fmt.Errorf("set up golang-migrate: %w", err)
	}
	m.Log = migrateLogger{ctx: ctx, logger: logger}

	return m, nil
}

// describeVersion returns the version of the database for logs: a number,
// "none" before the first migration, and "N (dirty)" after a failed one.
func describeVersion(m *migrate.Migrate) string {
	version, dirty, err := m.Version()
	switch {
	case errors.Is(err, migrate.ErrNilVersion):
		return "none"
	case err != nil:
		return "unknown: " + err.Error()
	case dirty:
		return fmt.Sprintf("%d (dirty)", version)
	default:
		return fmt.Sprint(version)
	}
}

// migrateLogger passes golang-migrate's messages to slog.
type migrateLogger struct {
	ctx    context.Context
	logger *slog.Logger
}

// Printf logs one message of golang-migrate, such as "1/u init (5.2ms)" after
// each migration. It drops the messages that start with "error: ", because
// Up returns the same error.
func (l migrateLogger) Printf(format string, v ...any) {
	message := strings.TrimSpace(fmt.Sprintf(format, v...))
	if strings.HasPrefix(message, "error: ") {
		return
	}

	l.logger.InfoContext(l.ctx, "migration applied", "migration", message)
}

// Verbose reports false, so that golang-migrate skips its per-step messages.
func (l migrateLogger) Verbose() bool {
	return false
}
