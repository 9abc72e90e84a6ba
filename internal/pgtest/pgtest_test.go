package pgtest

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
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/metering/metering/migrations"
)

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

// databaseExists reports whether the server has a database called name.
func databaseExists(t *testing.T, name string) bool {
	t.Helper()

	srv, err := getServer()
	require.NoError(t, err)

	var exists bool
	err = srv.admin.QueryRow(t.Context(), "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).Scan(&exists)
	require.NoError(t, err)

	return exists
}

func TestNewPoolConcurrentCallsGetSeparateDatabases(t *testing.T) {
	type observed struct {
		database  string
		timeZone  string
		hasSchema bool
		version   int64
		dirty     bool
	}
	results := make([]observed, 2)

	t.Run("parallel calls", func(t *testing.T) {
		for i := range results {
			t.Run(strconv.Itoa(i), func(t *testing.T) {
				t.Parallel()

				pool := NewPool(t)
				var got observed
				err := pool.QueryRow(t.Context(), `
					SELECT current_database(), current_setting('TimeZone'),
					       EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'metering')`,
				).Scan(&got.database, &got.timeZone, &got.hasSchema)
				require.NoError(t, err)
				err = pool.QueryRow(t.Context(), "SELECT version, dirty FROM schema_migrations").Scan(&got.version, &got.dirty)
				require.NoError(t, err)

				results[i] = got
			})
		}
	})

	assert.NotEqual(t, results[0].database, results[1].database)
	for _, got := range results {
		assert.True(t, strings.HasPrefix(got.database, databasePrefix), "database name %q", got.database)
		assert.Equal(t, TimeZone, got.timeZone, "database %s", got.database)
		assert.True(t, got.hasSchema, "database %s has no schema metering", got.database)
		assert.Equal(t, latestMigration(t), got.version, "database %s", got.database)
		assert.False(t, got.dirty, "database %s", got.database)
		assert.False(t, databaseExists(t, got.database), "database %s still exists after cleanup", got.database)
	}
}

func TestNewDatabaseCleanupEndsOpenConnections(t *testing.T) {
	var name string
	t.Run("leaves a connection open", func(t *testing.T) {
		databaseURL := NewDatabase(t)
		conn, err := pgx.Connect(t.Context(), databaseURL)
		require.NoError(t, err)
		require.NoError(t, conn.QueryRow(t.Context(), "SELECT current_database()").Scan(&name))
		// The connection stays open on purpose: cleanup must end it.
	})

	require.NotEmpty(t, name)
	assert.False(t, databaseExists(t, name), "database %s still exists after cleanup", name)
}

func TestNewEmptyDatabaseHasNoMigrations(t *testing.T) {
	t.Parallel()

	databaseURL := NewEmptyDatabase(t)
	conn, err := pgx.Connect(t.Context(), databaseURL)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close(context.Background()) })

	var hasMigrationsTable bool
	var timeZone string
	err = conn.QueryRow(t.Context(), "SELECT to_regclass('schema_migrations') IS NOT NULL, current_setting('TimeZone')").Scan(&hasMigrationsTable, &timeZone)
	require.NoError(t, err)

	assert.False(t, hasMigrationsTable)
	assert.Equal(t, TimeZone, timeZone)
}

func TestTemplateIsMarkedAndClosedToConnections(t *testing.T) {
	t.Parallel()

	srv, err := getServer()
	require.NoError(t, err)

	var isTemplate, allowConnections bool
	err = srv.admin.QueryRow(t.Context(), "SELECT datistemplate, datallowconn FROM pg_database WHERE datname = $1", srv.template).Scan(&isTemplate, &allowConnections)
	require.NoError(t, err)

	assert.True(t, isTemplate)
	assert.False(t, allowConnections)
}

// TestEnsureTemplateBuildsOnceForConcurrentSessions gives each caller its own
// admin pool, so that the callers contend for the advisory lock from separate
// sessions, as separate test processes do.
func TestEnsureTemplateBuildsOnceForConcurrentSessions(t *testing.T) {
	t.Parallel()

	shared, err := getServer()
	require.NoError(t, err)
	template := templatePrefix + "test_" + randomHex()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_, err := shared.admin.Exec(ctx, "ALTER DATABASE "+quote(template)+" WITH IS_TEMPLATE false")
		assert.NoError(t, err)
		assert.NoError(t, shared.dropDatabase(ctx, template))
	})

	var logs syncBuffer
	logger := slog.New(slog.NewTextHandler(&logs, nil))
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i := range errs {
		admin, err := pgxpool.New(t.Context(), shared.baseURL)
		require.NoError(t, err)
		t.Cleanup(admin.Close)

		srv := &server{baseURL: shared.baseURL, admin: admin, template: template}
		wg.Go(func() {
			errs[i] = srv.ensureTemplate(t.Context(), logger)
		})
	}
	wg.Wait()

	for i, err := range errs {
		assert.NoError(t, err, "caller %d", i)
	}
	assert.Equal(t, 1, strings.Count(logs.String(), "building template database"), "logs:\n%s", logs.String())
	assert.True(t, databaseExists(t, template), "template %s missing", template)
	assert.False(t, databaseExists(t, template+"_build"), "unfinished template %s_build left behind", template)
}

func TestHashMigrationsChangesWithContent(t *testing.T) {
	t.Parallel()

	base := fstest.MapFS{
		"0001_init.up.sql":   {Data: []byte("CREATE SCHEMA a;")},
		"0001_init.down.sql": {Data: []byte("DROP SCHEMA a;")},
	}
	changedContent := fstest.MapFS{
		"0001_init.up.sql":   {Data: []byte("CREATE SCHEMA b;")},
		"0001_init.down.sql": {Data: []byte("DROP SCHEMA a;")},
	}
	renamed := fstest.MapFS{
		"0001_start.up.sql":   {Data: []byte("CREATE SCHEMA a;")},
		"0001_start.down.sql": {Data: []byte("DROP SCHEMA a;")},
	}

	baseHash, err := hashMigrations(base)
	require.NoError(t, err)
	again, err := hashMigrations(base)
	require.NoError(t, err)
	changedHash, err := hashMigrations(changedContent)
	require.NoError(t, err)
	renamedHash, err := hashMigrations(renamed)
	require.NoError(t, err)

	assert.Len(t, baseHash, 12)
	assert.Equal(t, baseHash, again)
	assert.NotEqual(t, baseHash, changedHash)
	assert.NotEqual(t, baseHash, renamedHash)
}

func TestWithDatabaseReplacesDatabase(t *testing.T) {
	t.Parallel()

	tests := []struct {
		name       string
		connString string
		want       string
	}{
		{
			name:       "URL with path",
			connString: "postgres://user:secret@127.0.0.1:5432/postgres?sslmode=disable",
			want:       "postgres://user:secret@127.0.0.1:5432/metering_test_x?sslmode=disable",
		},
		{
			name:       "URL without path",
			connString: "postgresql://127.0.0.1",
			want:       "postgresql://127.0.0.1/metering_test_x",
		},
		{
			name:       "URL with dbname parameter",
			connString: "postgres://127.0.0.1/a?dbname=b&sslmode=disable",
			want:       "postgres://127.0.0.1/metering_test_x?sslmode=disable",
		},
		{
			name:       "keyword/value string",
			connString: "host=127.0.0.1 dbname=postgres",
			want:       "host=127.0.0.1 dbname=postgres dbname=metering_test_x",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := withDatabase(tt.connString, "metering_test_x")

			require.NoError(t, err)
			assert.Equal(t, tt.want, got)

			config, err := pgx.ParseConfig(got)
			require.NoError(t, err)
			assert.Equal(t, "metering_test_x", config.Database)
		})
	}
}

// syncBuffer is a bytes.Buffer that several goroutines may write to.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()

	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()

	return b.buf.String()
}
