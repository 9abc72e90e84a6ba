// Package workspacemigrations embeds the numbered SQL migrations of the
// workspace server's schema, applied in order by golang-migrate with the
// version table Table, apart from Metering's migrations in the parent
// directory.
package workspacemigrations

import "embed"

// Table records the version of these migrations, in the public schema of the
// database, next to Metering's schema_migrations.
const Table = "workspace_schema_migrations"

// FS contains the migration files, named NNNN_title.up.sql and
// NNNN_title.down.sql.
//
//go:embed *.sql
var FS embed.FS
