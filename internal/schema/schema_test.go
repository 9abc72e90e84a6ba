package schema_test

import (
	"bytes"
	"context"
	"io/fs"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/fstest"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/metering/metering/internal/pgtest"
	"github.com/metering/metering/internal/schema"
	"github.com/metering/metering/migrations"
)

// discardLogger returns a logger that drops every message.
func discardLogger() *slog.Logger {
	return slog.New(slog.DiscardHandler)
}

// latestMigration returns the highest version among the files in
// migrations.FS, which are named NNNN_title.up.sql.
func latestMigration(t *testing.T) int64 {
	t.Helper()

	entries, err := fs.ReadDir(migrations.FS, ".")
	require.NoError(t, err)

	var latest int64
	for _, entry := range entries {
		number, _, found := strings.Cut(entry.Name(), "_")
		require.True(t, found, "migration file %s has no NNNN_ prefix", entry.Name())
		version, err := strconv.ParseInt(number, 10, 64)
		require.NoError(t, err, "migration file %s", entry.Name())
		latest = max(latest, version)
	}

	return latest
}

// migrationState returns the row of schema_migrations in the database at
// databaseURL.
func migrationState(t *testing.T, databaseURL string) (version int64, dirty bool) {
	t.Helper()

	conn, err := pgx.Connect(t.Context(), databaseURL)
	require.NoError(t, err)
	defer conn.Close(context.Background())

	err = conn.QueryRow(t.Context(), "SELECT version, dirty FROM schema_migrations").Scan(&version, &dirty)
	require.NoError(t, err)

	return version, dirty
}

func TestMigrateTwiceSucceeds(t *testing.T) {
	t.Parallel()

	databaseURL := pgtest.NewEmptyDatabase(t)
	var logs bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&logs, nil))

	require.NoError(t, schema.Migrate(t.Context(), databaseURL, logger))
	require.NoError(t, schema.Migrate(t.Context(), databaseURL, logger))

	version, dirty := migrationState(t, databaseURL)
	assert.Equal(t, latestMigration(t), version)
	assert.False(t, dirty)
	assert.Contains(t, logs.String(), "from_version=none to_version="+strconv.FormatInt(version, 10))
	assert.Contains(t, logs.String(), "database schema already current")
}

func TestMigrateConcurrentCallsAllSucceed(t *testing.T) {
	t.Parallel()

	databaseURL := pgtest.NewEmptyDatabase(t)

	errs := make([]error, 4)
	var wg sync.WaitGroup
	for i := range errs {
		wg.Go(func() {
			errs[i] = schema.Migrate(t.Context(), databaseURL, discardLogger())
		})
	}
	wg.Wait()

	for i, err := range errs {
		assert.NoError(t, err, "call %d", i)
	}
	version, dirty := migrationState(t, databaseURL)
	assert.Equal(t, latestMigration(t), version)
	assert.False(t, dirty)
}

func TestMigrateAppliesOnlyNewMigrations(t *testing.T) {
	t.Parallel()

	databaseURL := pgtest.NewEmptyDatabase(t)
	first := fstest.MapFS{
		"0001_create.up.sql":   {Data: []byte("CREATE TABLE counter (n int NOT NULL); INSERT INTO counter VALUES (1);")},
		"0001_create.down.sql": {Data: []byte("DROP TABLE counter;")},
	}
	second := fstest.MapFS{
		"0002_increment.up.sql":   {Data: []byte("UPDATE counter SET n = n + 1;")},
		"0002_increment.down.sql": {Data: []byte("UPDATE counter SET n = n - 1;")},
	}
	for name, file := range first {
		second[name] = file
	}

	require.NoError(t, schema.MigrateFS(t.Context(), first, databaseURL, discardLogger()))
	require.NoError(t, schema.MigrateFS(t.Context(), second, databaseURL, discardLogger()))
	require.NoError(t, schema.MigrateFS(t.Context(), second, databaseURL, discardLogger()))

	conn, err := pgx.Connect(t.Context(), databaseURL)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	var n int
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT n FROM counter").Scan(&n))
	assert.Equal(t, 2, n, "each migration must run exactly once")
	version, dirty := migrationState(t, databaseURL)
	assert.Equal(t, int64(2), version)
	assert.False(t, dirty)
}

func TestMigrateReportsFailedAndDirtyMigration(t *testing.T) {
	t.Parallel()

	databaseURL := pgtest.NewEmptyDatabase(t)
	broken := fstest.MapFS{
		"0001_ok.up.sql":       {Data: []byte("CREATE TABLE ok (id int);")},
		"0001_ok.down.sql":     {Data: []byte("DROP TABLE ok;")},
		"0002_broken.up.sql":   {Data: []byte("CREATE TABLE broken (id no_such_type);")},
		"0002_broken.down.sql": {Data: []byte("DROP TABLE broken;")},
	}

	err := schema.MigrateFS(t.Context(), broken, databaseURL, discardLogger())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no_such_type")

	err = schema.MigrateFS(t.Context(), broken, databaseURL, discardLogger())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "migration 2 failed earlier and left the database dirty")
}

func TestMigrateHidesPasswordInErrors(t *testing.T) {
	t.Parallel()

	err := schema.Migrate(t.Context(), "postgres://someone:hunter2@127.0.0.1:notaport/db", discardLogger())

	require.Error(t, err)
	assert.NotContains(t, err.Error(), "hunter2")
}

func TestMigrateStopsWhenContextEnded(t *testing.T) {
	t.Parallel()

	databaseURL := pgtest.NewEmptyDatabase(t)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()

	err := schema.Migrate(ctx, databaseURL, discardLogger())

	assert.ErrorIs(t, err, context.Canceled)
}
