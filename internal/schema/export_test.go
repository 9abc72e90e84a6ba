package schema

// MigrateFS lets the tests apply migrations other than those in migrations.FS.
var MigrateFS = migrateFS
