package schema_test

import (
	"context"
	"testing"
	"testing/fstest"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/metering/metering/internal/pgtest"
	"github.com/metering/metering/internal/schema"
)

func TestMigrateSetKeepsItsOwnVersionTable(t *testing.T) {
	t.Parallel()
	databaseURL := pgtest.NewDatabase(t)
	meteringVersion, _ := migrationState(t, databaseURL)
	set := schema.Set{
		FS: fstest.MapFS{
			"0001_extra.up.sql":   {Data: []byte("CREATE SCHEMA extra; CREATE TABLE extra.items (id text PRIMARY KEY);")},
			"0001_extra.down.sql": {Data: []byte("DROP SCHEMA extra CASCADE;")},
		},
		Table: "extra_schema_migrations",
	}

	require.NoError(t, schema.MigrateSet(t.Context(), databaseURL, set, discardLogger()))
	require.NoError(t, schema.MigrateSet(t.Context(), databaseURL, set, discardLogger()), "a second run finds nothing to apply")

	conn, err := pgx.Connect(t.Context(), databaseURL)
	require.NoError(t, err)
	defer conn.Close(context.Background())

	var version int64
	var dirty bool
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT version, dirty FROM extra_schema_migrations").Scan(&version, &dirty))
	assert.Equal(t, int64(1), version)
	assert.False(t, dirty)

	var tables int
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT count(*) FROM pg_tables WHERE schemaname = 'extra'").Scan(&tables))
	assert.Equal(t, 1, tables)

	after, _ := migrationState(t, databaseURL)
	assert.Equal(t, meteringVersion, after, "the Metering version table is left alone")
}
