// Package migrations embeds the numbered SQL migrations of the Metering
// schema, applied in order by golang-migrate.
package migrations

import "embed"

// FS contains the migration files, named NNNN_title.up.sql and
// NNNN_title.down.sql.
//
//go:embed *.sql
var FS embed.FS
