package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/url"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/metering/metering/internal/auth"
	"github.com/metering/metering/internal/localpg"
	"github.com/metering/metering/internal/metering"
	"github.com/metering/metering/internal/schema"
)

const (
	// databasePrefix starts the name of every benchmark database, so that
	// one left behind by a killed run is easy to find and drop by hand.
	databasePrefix = "meterbench_"

	// databaseSetupTimeout bounds finding the server, creating and
	// migrating the database.
	databaseSetupTimeout = 3 * time.Minute

	// databaseDropTimeout bounds dropping the database at the end.
	databaseDropTimeout = time.Minute

	// tokenActor is the actor recorded for the service tokens the benchmark
	// issues.
	tokenActor = "meterbench"
)

// benchDatabase is the throwaway database of one run.
type benchDatabase struct {
	// name is the database name, databasePrefix and random hex digits.
	name string
	// serverURL is the URL that localpg.Find returned, used to create and
	// drop name.
	serverURL string
	// url is the URL of the benchmark database.
	url string
}

// databaseSettings are the PostgreSQL settings that decide what a commit
// costs, as the benchmark database's sessions see them.
type databaseSettings struct {
	ServerVersion     string `json:"server_version"`
	SynchronousCommit string `json:"synchronous_commit"`
	Fsync             string `json:"fsync"`
	WALSyncMethod     string `json:"wal_sync_method"`
	MaxConnections    string `json:"max_connections"`
}

// createDatabase finds or starts PostgreSQL with localpg.Find, creates a
// database with a random name, sets synchronous_commit on for it and
// applies the migrations.
func createDatabase(ctx context.Context, logger *slog.Logger) (benchDatabase, error) {
	ctx, cancel := context.WithTimeout(ctx, databaseSetupTimeout)
	defer cancel()

	serverURL, err := localpg.Find(ctx, localpg.Options{Logger: logger})
	if err != nil {
		return benchDatabase{}, err
	}

	suffix := make([]byte, 6)
	if _, err := rand.Read(suffix); err != nil {
		return benchDatabase{}, fmt.Errorf("generate database name: %w", err)
	}
	db := benchDatabase{name: databasePrefix + hex.EncodeToString(suffix), serverURL: serverURL}

	db.url, err = localpg.EnsureDatabase(ctx, serverURL, db.name)
	if err != nil {
		return benchDatabase{}, err
	}
	logger.InfoContext(ctx, "created benchmark database", "database", db.name)

	// The server may run with synchronous_commit off; the benchmark measures
	// what production pays, a flush of the WAL at each commit.
	if err := execOnServer(ctx, serverURL, "ALTER DATABASE "+pgx.Identifier{db.name}.Sanitize()+" SET synchronous_commit = on"); err != nil {
		return db, fmt.Errorf("set synchronous_commit on database %q: %w", db.name, err)
	}

	if err := schema.Migrate(ctx, db.url, logger); err != nil {
		return db, err
	}

	return db, nil
}

// drop drops the benchmark database, ending the sessions still connected
// to it. It uses its own timeout, so that it also runs after ctx ended.
func (db benchDatabase) drop(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), databaseDropTimeout)
	defer cancel()

	// WITH (FORCE) needs PostgreSQL 13, the oldest version Metering supports.
	if err := execOnServer(ctx, db.serverURL, "DROP DATABASE IF EXISTS "+pgx.Identifier{db.name}.Sanitize()+" WITH (FORCE)"); err != nil {
		return fmt.Errorf("drop database %q: %w", db.name, err)
	}

	return nil
}

// execOnServer runs one statement on a connection of its own to serverURL.
func execOnServer(ctx context.Context, serverURL, statement string) error {
	conn, err := pgx.Connect(ctx, serverURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	_, err = conn.Exec(ctx, statement)
	return err
}

// readSettings returns the settings of a new session of the pool's
// database and checks that synchronous_commit is not off.
func readSettings(ctx context.Context, pool *pgxpool.Pool) (databaseSettings, error) {
	const query = `SELECT current_setting('server_version'), current_setting('synchronous_commit'),
		current_setting('fsync'), current_setting('wal_sync_method'), current_setting('max_connections')`

	var s databaseSettings
	err := pool.QueryRow(ctx, query).Scan(&s.ServerVersion, &s.SynchronousCommit, &s.Fsync, &s.WALSyncMethod, &s.MaxConnections)
	if err != nil {
		return databaseSettings{}, fmt.Errorf("read database settings: %w", err)
	}
	// on, remote_write, remote_apply and local all wait for the local WAL
	// flush; only off returns before it.
	if s.SynchronousCommit == "off" {
		return s, fmt.Errorf("synchronous_commit is off for the benchmark database although meterbench set it on: " +
			"remove synchronous_commit from DATABASE_URL or PGOPTIONS")
	}

	return s, nil
}

// serverDatabaseURL returns the database URL the server process gets:
// dbURL with pool_max_conns set when maxConns is above zero.
func serverDatabaseURL(dbURL string, maxConns int) (string, error) {
	if maxConns == 0 {
		return dbURL, nil
	}

	u, err := url.Parse(dbURL)
	if err != nil {
		return "", fmt.Errorf("parse the benchmark database URL: %w", err)
	}
	q := u.Query()
	q.Set("pool_max_conns", strconv.Itoa(maxConns))
	u.RawQuery = q.Encode()

	return u.String(), nil
}

// serviceTokens are the plaintext tokens the load generator sends.
type serviceTokens struct {
	// admin has the admin scope, for plans and accounts.
	admin string
	// usage has the usage:write scope, for the scenarios.
	usage string
}

// issueTokens issues an admin token and a usage:write token bound to all
// accounts, straight into the database, as `metering token issue` does.
func issueTokens(ctx context.Context, svc *metering.Service) (serviceTokens, error) {
	var tokens serviceTokens
	var err error

	_, tokens.admin, err = svc.IssueServiceToken(ctx, metering.IssueTokenRequest{
		Name: "meterbench-admin", Scopes: []string{auth.ScopeAdmin}, Actor: tokenActor,
	})
	if err != nil {
		return serviceTokens{}, err
	}
	_, tokens.usage, err = svc.IssueServiceToken(ctx, metering.IssueTokenRequest{
		Name: "meterbench-usage", Scopes: []string{auth.ScopeUsageWrite}, Actor: tokenActor,
	})
	if err != nil {
		return serviceTokens{}, err
	}

	return tokens, nil
}
