package localpg

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// freePort returns a TCP port on 127.0.0.1 that nothing listened on a moment ago.
func freePort(t *testing.T) int {
	t.Helper()

	listener, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := listener.Addr().(*net.TCPAddr).Port
	require.NoError(t, listener.Close())

	return port
}

// closedServerURL returns a server URL on which nothing accepts connections.
func closedServerURL(t *testing.T) string {
	t.Helper()

	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", freePort(t))
}

// environment returns a Getenv that reads from values only.
func environment(values map[string]string) func(string) string {
	return func(key string) string { return values[key] }
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

func TestFindReturnsDatabaseURLAsIs(t *testing.T) {
	t.Parallel()

	// The URL names a host that cannot resolve, so a connection attempt would fail.
	databaseURL := "postgres://someone:secret@db.invalid:6543/metering?sslmode=require"
	got, err := Find(t.Context(), Options{
		ServerURL: closedServerURL(t),
		Getenv:    environment(map[string]string{"DATABASE_URL": databaseURL}),
	})

	require.NoError(t, err)
	assert.Equal(t, databaseURL, got)
}

func TestFindReportsWhatIsMissing(t *testing.T) {
	t.Parallel()

	serverURL := closedServerURL(t)
	port := freePort(t)
	_, err := Find(t.Context(), Options{
		Dir:         filepath.Join(t.TempDir(), "data"),
		Port:        port,
		ServerURL:   serverURL,
		VersionsDir: t.TempDir(),
		Getenv:      environment(map[string]string{"PATH": t.TempDir()}),
	})

	require.Error(t, err)
	message := err.Error()
	assert.Contains(t, message, "no PostgreSQL found")
	assert.Contains(t, message, "DATABASE_URL is unset")
	assert.Contains(t, message, describeServer(serverURL))
	assert.Contains(t, message, "initdb was not found in PATH or")
	assert.Contains(t, message, "install PostgreSQL or set DATABASE_URL")
}

func TestOptionsValidateRejectsBadFields(t *testing.T) {
	t.Parallel()

	tests := []struct {
		name    string
		opts    Options
		wantErr string
	}{
		{name: "zero value", opts: Options{}},
		{name: "negative port", opts: Options{Port: -1}, wantErr: "invalid Port -1"},
		{name: "port too large", opts: Options{Port: 65536}, wantErr: "invalid Port 65536"},
		{name: "server URL not parsable", opts: Options{ServerURL: "postgres://%zz"}, wantErr: "invalid ServerURL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.opts.Validate()
			if tt.wantErr == "" {
				assert.NoError(t, err)
				return
			}
			assert.ErrorContains(t, err, tt.wantErr)
		})
	}
}

func TestFindBinariesPrefersNewestVersion(t *testing.T) {
	t.Parallel()

	versionsDir := t.TempDir()
	for _, version := range []string{"9.6", "16", "10", "15"} {
		binDir := filepath.Join(versionsDir, version, "bin")
		require.NoError(t, os.MkdirAll(binDir, 0o755))
		for _, name := range []string{"initdb", "pg_ctl"} {
			require.NoError(t, os.WriteFile(filepath.Join(binDir, name), []byte("#!/bin/sh\n"), 0o755))
		}
	}
	// A newer version without pg_ctl is not usable.
	require.NoError(t, os.MkdirAll(filepath.Join(versionsDir, "17", "bin"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(versionsDir, "17", "bin", "initdb"), []byte("#!/bin/sh\n"), 0o755))

	c := &cluster{versionsDir: versionsDir, getenv: environment(nil)}
	require.NoError(t, c.findBinaries())

	assert.Equal(t, filepath.Join(versionsDir, "16", "bin", "initdb"), c.initdb)
	assert.Equal(t, filepath.Join(versionsDir, "16", "bin", "pg_ctl"), c.pgCtl)
}

func TestCompareVersionsOrdersNumerically(t *testing.T) {
	t.Parallel()

	tests := []struct {
		a, b string
		want int
	}{
		{a: "15", b: "9.6", want: 1},
		{a: "9.6", b: "10", want: -1},
		{a: "16", b: "16", want: 0},
		{a: "9.6", b: "9.5", want: 1},
		{a: "devel", b: "9", want: -1},
	}
	for _, tt := range tests {
		got := compareVersions(tt.a, tt.b)
		assert.Equal(t, tt.want, sign(got), "compareVersions(%q, %q) = %d", tt.a, tt.b, got)
	}
}

func sign(n int) int {
	switch {
	case n > 0:
		return 1
	case n < 0:
		return -1
	default:
		return 0
	}
}

// TestFindStartsPrivateCluster runs initdb and pg_ctl for real, in a temporary
// directory and on a free port.
func TestFindStartsPrivateCluster(t *testing.T) {
	probeCluster := &cluster{getenv: os.Getenv, versionsDir: DefaultVersionsDir}
	if err := probeCluster.findBinaries(); err != nil {
		t.Skipf("skipping: this test needs a PostgreSQL installation: %v", err)
	}

	// When the test runs as root, the cluster runs as the postgres user, which
	// must be able to enter the directory.
	baseDir, err := os.MkdirTemp("", "localpg-test-")
	require.NoError(t, err)
	require.NoError(t, os.Chmod(baseDir, 0o755))
	t.Cleanup(func() { _ = os.RemoveAll(baseDir) })

	var logs syncBuffer
	opts := Options{
		Dir:       filepath.Join(baseDir, "data"),
		Port:      freePort(t),
		ServerURL: closedServerURL(t),
		Getenv:    environment(map[string]string{"PATH": os.Getenv("PATH")}),
		Logger:    slog.New(slog.NewTextHandler(&logs, nil)),
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		assert.NoError(t, Stop(ctx, opts))
	})

	// Two processes running tests may start the cluster at once, and the lock
	// file lets only one of them run initdb.
	urls := make([]string, 2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range urls {
		wg.Go(func() {
			urls[i], errs[i] = Find(t.Context(), opts)
		})
	}
	wg.Wait()
	require.NoError(t, errs[0], "logs:\n%s", logs.String())
	require.NoError(t, errs[1], "logs:\n%s", logs.String())

	wantURL := privateClusterURL(opts.Port)
	assert.Equal(t, wantURL, urls[0])
	assert.Equal(t, wantURL, urls[1])
	assert.FileExists(t, filepath.Join(opts.Dir, "PG_VERSION"))
	assert.FileExists(t, filepath.Join(opts.Dir, "postgres.log"))

	conn, err := pgx.Connect(t.Context(), wantURL)
	require.NoError(t, err)
	var listenAddresses, user string
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT current_setting('listen_addresses'), current_user").Scan(&listenAddresses, &user))
	require.NoError(t, conn.Close(t.Context()))
	assert.Equal(t, "127.0.0.1", listenAddresses)
	assert.Equal(t, "postgres", user)

	t.Run("restarts stopped cluster without initdb", func(t *testing.T) {
		require.NoError(t, Stop(t.Context(), opts))
		require.Error(t, probe(t.Context(), wantURL), "the cluster still accepts connections after Stop")

		var restartLogs bytes.Buffer
		restartOpts := opts
		restartOpts.Logger = slog.New(slog.NewTextHandler(&restartLogs, nil))
		got, err := Find(t.Context(), restartOpts)

		require.NoError(t, err)
		assert.Equal(t, wantURL, got)
		assert.Contains(t, restartLogs.String(), "starting the private cluster")
		assert.NotContains(t, restartLogs.String(), "creating the private cluster")
		assert.NoError(t, probe(t.Context(), got))
	})

	t.Run("uses server URL that accepts connections", func(t *testing.T) {
		serverOpts := opts
		serverOpts.ServerURL = wantURL + "&application_name=localpg_test"
		serverOpts.Dir = filepath.Join(baseDir, "unused")
		got, err := Find(t.Context(), serverOpts)

		require.NoError(t, err)
		assert.Equal(t, serverOpts.ServerURL, got)
		assert.NoDirExists(t, serverOpts.Dir)
	})
}

func TestPrepareDataDirRejectsUnreachableDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: only a process running as root runs the cluster as another user")
	}
	t.Parallel()

	// t.TempDir is mode 0700 and belongs to root, so the postgres user cannot
	// enter it.
	c, err := newCluster(Options{Dir: filepath.Join(t.TempDir(), "data")}.withDefaults())
	require.NoError(t, err)
	if err := c.findOwner(); err != nil {
		t.Skipf("skipping: %v", err)
	}

	err = c.prepareDataDir(t.Context())

	assert.ErrorContains(t, err, "user postgres cannot write to data directory")
	assert.ErrorContains(t, err, "chmod o+x")
}
