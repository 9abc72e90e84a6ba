package server_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	"github.com/metering/metering/internal/pgtest"
	"github.com/metering/metering/internal/server"
)

// waitTimeout bounds every wait for the server to reach a state.
const waitTimeout = 15 * time.Second

var healthServiceNames = []string{
	"",
	meteringv1.MeteringService_ServiceDesc.ServiceName,
	meteringv1.MeteringAdminService_ServiceDesc.ServiceName,
}

func TestRunServesHealthReflectionAndMetrics(t *testing.T) {
	t.Parallel()
	srv := startServer(t, testConfig(pgtest.NewDatabase(t)))
	health := healthpb.NewHealthClient(srv.conn)

	for _, name := range healthServiceNames {
		waitForHealth(t, health, name, healthpb.HealthCheckResponse_SERVING)
	}

	services := listServices(t, srv.conn)
	assert.Contains(t, services, meteringv1.MeteringService_ServiceDesc.ServiceName)
	assert.Contains(t, services, meteringv1.MeteringAdminService_ServiceDesc.ServiceName)
	assert.Contains(t, services, healthpb.Health_ServiceDesc.ServiceName)

	metrics := scrapeMetrics(t, srv.metricsAddr)
	checkLabels := `{grpc_code="OK",grpc_method="Check",grpc_service="grpc.health.v1.Health",grpc_type="unary"}`
	assert.GreaterOrEqual(t, metricValue(t, metrics, "grpc_server_handled_total"+checkLabels), 1.0)
	assert.GreaterOrEqual(t, metricValue(t, metrics, `grpc_server_handling_seconds_count{grpc_method="Check",grpc_service="grpc.health.v1.Health",grpc_type="unary"}`), 1.0)
	assert.Contains(t, metrics, "\ngo_goroutines ")
	assert.Contains(t, metrics, "\nprocess_start_time_seconds ")

	require.NoError(t, srv.stop())
	assert.Equal(t, 1, srv.logs.count("database reachable, health status set to SERVING"))
}

func TestRunLogsCallsWithoutSecrets(t *testing.T) {
	t.Parallel()
	srv := startServer(t, testConfig(pgtest.NewDatabase(t)))
	health := healthpb.NewHealthClient(srv.conn)
	ctx := metadata.AppendToOutgoingContext(t.Context(), "authorization", "Bearer token-marker-91c2")

	_, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: "payload-marker-7f3a"})
	require.Equal(t, codes.NotFound, status.Code(err), "error: %v", err)
	listServices(t, srv.conn)
	_, err = meteringv1.NewMeteringServiceClient(srv.conn).GetCurrentUsage(t.Context(), &meteringv1.GetCurrentUsageRequest{AccountId: "acme"})
	require.Equal(t, codes.Unauthenticated, status.Code(err), "error: %v", err)
	require.NoError(t, srv.stop())

	logs := srv.logs.String()
	assert.NotContains(t, logs, "token-marker-91c2", "metadata must not be logged")
	assert.NotContains(t, logs, "payload-marker-7f3a", "request payloads must not be logged")

	reflectionService := reflectionpb.ServerReflection_ServiceDesc.ServiceName
	started := srv.logs.find("started call", reflectionService)
	finished := srv.logs.find("finished call", reflectionService)
	require.NotNil(t, started)
	require.NotNil(t, finished)
	assert.Equal(t, "DEBUG", started["level"])
	assert.Equal(t, "DEBUG", finished["level"], "successful calls are logged at debug")
	assert.Equal(t, "OK", finished["grpc.code"])

	failed := srv.logs.find("finished call", meteringv1.MeteringService_ServiceDesc.ServiceName)
	require.NotNil(t, failed)
	assert.Equal(t, "INFO", failed["level"], "failed calls are logged at info or above")
	assert.Equal(t, "Unauthenticated", failed["grpc.code"])

	healthCall := srv.logs.find("finished call", healthpb.Health_ServiceDesc.ServiceName)
	require.NotNil(t, healthCall)
	assert.Equal(t, "DEBUG", healthCall["level"], "health checks are logged at debug")
	assert.Equal(t, "NotFound", healthCall["grpc.code"])
}

func TestRunRecoversPanicAsInternal(t *testing.T) {
	t.Parallel()
	panicky := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if r, ok := req.(*healthpb.HealthCheckRequest); ok && r.GetService() == "panic" {
			panic("panic-detail-5d1e")
		}

		return handler(ctx, req)
	}
	panickyStream := func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if info.FullMethod == healthpb.Health_Watch_FullMethodName {
			panic("stream-panic-detail-0c4b")
		}

		return handler(srv, ss)
	}
	srv := startServer(t, testConfig(pgtest.NewDatabase(t)),
		server.WithUnaryInterceptors(panicky),
		server.WithStreamInterceptors(panickyStream),
	)
	health := healthpb.NewHealthClient(srv.conn)

	_, err := health.Check(t.Context(), &healthpb.HealthCheckRequest{Service: "panic"})

	assert.Equal(t, codes.Internal, status.Code(err))
	assert.Equal(t, "internal error", status.Convert(err).Message())
	_, err = health.Check(t.Context(), &healthpb.HealthCheckRequest{})
	assert.NoError(t, err, "the server keeps serving after a panic")

	watch, err := health.Watch(t.Context(), &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	_, err = watch.Recv()
	assert.Equal(t, codes.Internal, status.Code(err))
	assert.NotContains(t, status.Convert(err).Message(), "stream-panic-detail")

	require.NoError(t, srv.stop())
	recovered := srv.logs.findAll("recovered from panic in gRPC handler")
	require.Len(t, recovered, 2)
	assert.Equal(t, "ERROR", recovered[0]["level"])
	assert.Equal(t, healthpb.Health_Check_FullMethodName, recovered[0]["grpc_method"])
	assert.Equal(t, "panic-detail-5d1e", recovered[0]["panic"])
	assert.Contains(t, recovered[0]["stack"], "runtime/debug.Stack")
	assert.Equal(t, healthpb.Health_Watch_FullMethodName, recovered[1]["grpc_method"])
	assert.Equal(t, "stream-panic-detail-0c4b", recovered[1]["panic"])
}

func TestRunNotServingWhenDatabaseDown(t *testing.T) {
	t.Parallel()
	cfg := testConfig(fmt.Sprintf("postgres://postgres@%s/metering?sslmode=disable&connect_timeout=5", closedAddr(t)))
	srv := startServer(t, cfg)
	health := healthpb.NewHealthClient(srv.conn)

	srv.logs.waitFor(t, "database unreachable, health status set to NOT_SERVING")

	for _, name := range healthServiceNames {
		resp, err := health.Check(t.Context(), &healthpb.HealthCheckRequest{Service: name})
		require.NoError(t, err)
		assert.Equal(t, healthpb.HealthCheckResponse_NOT_SERVING, resp.GetStatus(), "service %q", name)
	}
	require.NoError(t, srv.stop())
	assert.Zero(t, srv.logs.count("database reachable, health status set to SERVING"))
}

func TestRunHealthFollowsDatabase(t *testing.T) {
	t.Parallel()
	proxy := startProxy(t, parseDatabaseURL(t, pgtest.NewDatabase(t)))
	srv := startServer(t, testConfig(proxy.databaseURL))
	health := healthpb.NewHealthClient(srv.conn)
	waitForHealth(t, health, "", healthpb.HealthCheckResponse_SERVING)

	proxy.setUp(false)
	for _, name := range healthServiceNames {
		waitForHealth(t, health, name, healthpb.HealthCheckResponse_NOT_SERVING)
	}
	// Several rejected pings show that the status is not logged on every
	// tick. pgx may try more than one connection per ping.
	require.Eventually(t, func() bool { return proxy.rejected.Load() >= 6 }, waitTimeout, 10*time.Millisecond)

	proxy.setUp(true)
	for _, name := range healthServiceNames {
		waitForHealth(t, health, name, healthpb.HealthCheckResponse_SERVING)
	}

	require.NoError(t, srv.stop())
	assert.Equal(t, 1, srv.logs.count("database unreachable, health status set to NOT_SERVING"))
	assert.Equal(t, 2, srv.logs.count("database reachable, health status set to SERVING"))
}

func TestRunStopsOnCancel(t *testing.T) {
	t.Parallel()
	srv := startServer(t, testConfig(pgtest.NewDatabase(t)))
	waitForHealth(t, healthpb.NewHealthClient(srv.conn), "", healthpb.HealthCheckResponse_SERVING)

	require.NoError(t, srv.stop())

	for _, addr := range []string{srv.grpcAddr, srv.metricsAddr} {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			_ = conn.Close()
		}
		assert.Error(t, err, "%s still accepts connections", addr)
	}
	assert.Equal(t, 1, srv.logs.count("metering server stopped"))
}

func TestRunForcesStopAfterShutdownTimeout(t *testing.T) {
	t.Parallel()
	cfg := testConfig(pgtest.NewDatabase(t))
	cfg.ShutdownTimeout = 200 * time.Millisecond
	srv := startServer(t, cfg)
	health := healthpb.NewHealthClient(srv.conn)
	waitForHealth(t, health, "", healthpb.HealthCheckResponse_SERVING)

	// An open Watch stream holds a graceful stop until the timeout.
	watch, err := health.Watch(t.Context(), &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	first, err := watch.Recv()
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_SERVING, first.GetStatus())

	start := time.Now()
	require.NoError(t, srv.stop())

	assert.Less(t, time.Since(start), waitTimeout)
	update, err := watch.Recv()
	require.NoError(t, err)
	assert.Equal(t, healthpb.HealthCheckResponse_NOT_SERVING, update.GetStatus(), "shutdown sets NOT_SERVING first")
	_, err = watch.Recv()
	assert.Error(t, err, "the stream is closed by the forced stop")
	assert.Equal(t, 1, srv.logs.count("graceful gRPC stop timed out, closing open connections"))
}

func TestRunMigratesAtStart(t *testing.T) {
	t.Parallel()
	databaseURL := pgtest.NewEmptyDatabase(t)
	cfg := testConfig(databaseURL)
	cfg.Migrate = true
	srv := startServer(t, cfg)

	waitForHealth(t, healthpb.NewHealthClient(srv.conn), "", healthpb.HealthCheckResponse_SERVING)

	var version int64
	var dirty bool
	err := queryRow(t, databaseURL, "SELECT version, dirty FROM schema_migrations").Scan(&version, &dirty)
	require.NoError(t, err)
	assert.Positive(t, version)
	assert.False(t, dirty)
}

func TestRunWithoutMigrateLeavesSchemaAlone(t *testing.T) {
	t.Parallel()
	databaseURL := pgtest.NewEmptyDatabase(t)
	srv := startServer(t, testConfig(databaseURL))

	waitForHealth(t, healthpb.NewHealthClient(srv.conn), "", healthpb.HealthCheckResponse_SERVING)

	var exists bool
	err := queryRow(t, databaseURL, "SELECT to_regclass('schema_migrations') IS NOT NULL").Scan(&exists)
	require.NoError(t, err)
	assert.False(t, exists)
}

func TestRunRejectsInvalidConfig(t *testing.T) {
	t.Parallel()
	cfg := testConfig("")
	cfg.LogLevel = "loud"

	err := server.Run(t.Context(), cfg, slog.New(slog.DiscardHandler))

	require.Error(t, err)
	assert.Contains(t, err.Error(), "DatabaseURL")
	assert.Contains(t, err.Error(), "LogLevel")
}

func TestRunFailsWhenPortInUse(t *testing.T) {
	t.Parallel()
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = busy.Close() })
	cfg := testConfig(testDatabaseURL)
	cfg.ListenAddr = busy.Addr().String()
	cfg.MetricsAddr = ""

	err = server.Run(t.Context(), cfg, slog.New(slog.DiscardHandler))

	require.Error(t, err)
	assert.Contains(t, err.Error(), "listen for gRPC on "+cfg.ListenAddr)
}

// testConfig returns a valid Config with short intervals. startServer
// replaces its listen addresses.
func testConfig(databaseURL string) server.Config {
	cfg := server.DefaultConfig()
	cfg.DatabaseURL = databaseURL
	cfg.ListenAddr = "127.0.0.1:0"
	cfg.MetricsAddr = "127.0.0.1:0"
	cfg.LogLevel = "debug"
	cfg.SweepInterval = 100 * time.Millisecond
	cfg.HealthInterval = 20 * time.Millisecond
	cfg.ShutdownTimeout = 5 * time.Second

	return cfg
}

// testServer is a Run in progress with a client connection to it.
type testServer struct {
	grpcAddr    string
	metricsAddr string
	conn        *grpc.ClientConn
	logs        *logBuffer
	// stop cancels the context of Run and returns what Run returned. Later
	// calls return the same value.
	stop func() error
}

func startServer(t *testing.T, cfg server.Config, opts ...server.Option) *testServer {
	t.Helper()
	grpcListener, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	metricsListener, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	cfg.ListenAddr = grpcListener.Addr().String()
	cfg.MetricsAddr = metricsListener.Addr().String()

	logs := &logBuffer{}
	logger := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	opts = append([]server.Option{
		server.WithGRPCListener(grpcListener),
		server.WithMetricsListener(metricsListener),
	}, opts...)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- server.Run(ctx, cfg, logger, opts...) }()

	stop := sync.OnceValue(func() error {
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(waitTimeout):
			return errors.New("Run did not return after its context was cancelled")
		}
	})
	t.Cleanup(func() {
		assert.NoError(t, stop())
		if t.Failed() {
			t.Logf("server log:\n%s", logs.String())
		}
	})

	conn, err := grpc.NewClient(cfg.ListenAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })

	return &testServer{
		grpcAddr:    cfg.ListenAddr,
		metricsAddr: cfg.MetricsAddr,
		conn:        conn,
		logs:        logs,
		stop:        stop,
	}
}

func waitForHealth(t *testing.T, client healthpb.HealthClient, service string, want healthpb.HealthCheckResponse_ServingStatus) {
	t.Helper()
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()

		resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{Service: service})
		require.NoError(c, err)
		assert.Equal(c, want, resp.GetStatus())
	}, waitTimeout, 10*time.Millisecond, "health status of service %q", service)
}

func listServices(t *testing.T, conn *grpc.ClientConn) []string {
	t.Helper()
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(t.Context())
	require.NoError(t, err)

	err = stream.Send(&reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{},
	})
	require.NoError(t, err)
	resp, err := stream.Recv()
	require.NoError(t, err)
	require.NoError(t, stream.CloseSend())
	_, err = stream.Recv()
	require.ErrorIs(t, err, io.EOF)

	var names []string
	for _, service := range resp.GetListServicesResponse().GetService() {
		names = append(names, service.GetName())
	}

	return names
}

func scrapeMetrics(t *testing.T, addr string) string {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, "http://"+addr+"/metrics", nil)
	require.NoError(t, err)

	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)

	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)

	return string(body)
}

// metricValue returns the value of the sample whose name and labels are
// series in the Prometheus text format of metrics.
func metricValue(t *testing.T, metrics, series string) float64 {
	t.Helper()
	scanner := bufio.NewScanner(strings.NewReader(metrics))
	for scanner.Scan() {
		value, ok := strings.CutPrefix(scanner.Text(), series+" ")
		if !ok {
			continue
		}

		v, err := strconv.ParseFloat(value, 64)
		require.NoError(t, err)

		return v
	}
	require.Failf(t, "series not found", "%s", series)

	return 0
}

// closedAddr returns a 127.0.0.1 address on which nothing listens, made by
// binding a free port and releasing it.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())

	return addr
}

// queryRow runs query on a connection of its own to databaseURL, closed at
// the end of the test.
func queryRow(t *testing.T, databaseURL, query string, args ...any) pgx.Row {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), databaseURL)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close(context.Background()) })

	return conn.QueryRow(t.Context(), query, args...)
}

func parseDatabaseURL(t *testing.T, databaseURL string) *url.URL {
	t.Helper()
	u, err := url.Parse(databaseURL)
	require.NoError(t, err, "the test database URL must be in URL form")

	return u
}

// logBuffer collects JSON log records. It is safe for concurrent use.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()

	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()

	return b.buf.String()
}

// findAll returns the records with message msg, in order.
func (b *logBuffer) findAll(msg string) []map[string]any {
	var records []map[string]any
	for line := range strings.Lines(b.String()) {
		var record map[string]any
		if err := json.Unmarshal([]byte(line), &record); err != nil {
			continue
		}
		if record["msg"] == msg {
			records = append(records, record)
		}
	}

	return records
}

// find returns the first record with message msg for the gRPC service, or
// nil.
func (b *logBuffer) find(msg, service string) map[string]any {
	for _, record := range b.findAll(msg) {
		if record["grpc.service"] == service {
			return record
		}
	}

	return nil
}

func (b *logBuffer) count(msg string) int {
	return len(b.findAll(msg))
}

func (b *logBuffer) waitFor(t *testing.T, msg string) {
	t.Helper()
	require.Eventually(t, func() bool { return b.count(msg) > 0 }, waitTimeout, 10*time.Millisecond, "log record %q", msg)
}

// proxy forwards TCP connections to PostgreSQL while up, and closes them at
// once while down, so that a test can take the database away from a server.
type proxy struct {
	databaseURL string
	target      string
	listener    net.Listener
	rejected    atomic.Int64

	mu    sync.Mutex
	up    bool
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// startProxy listens on 127.0.0.1 and forwards to the host of databaseURL.
// The databaseURL field of the proxy is the same URL with the proxy as host.
func startProxy(t *testing.T, databaseURL *url.URL) *proxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)

	proxied := *databaseURL
	proxied.Host = l.Addr().String()
	p := &proxy{
		databaseURL: proxied.String(),
		target:      databaseURL.Host,
		listener:    l,
		up:          true,
		conns:       map[net.Conn]struct{}{},
	}
	p.wg.Go(p.accept)
	t.Cleanup(func() {
		_ = l.Close()
		p.setUp(false)
		p.wg.Wait()
	})

	return p
}

func (p *proxy) accept() {
	for {
		client, err := p.listener.Accept()
		if err != nil {
			return
		}

		p.mu.Lock()
		if !p.up {
			p.mu.Unlock()
			p.rejected.Add(1)
			_ = client.Close()
			continue
		}
		p.conns[client] = struct{}{}
		p.wg.Go(func() { p.forward(client) })
		p.mu.Unlock()
	}
}

func (p *proxy) forward(client net.Conn) {
	defer p.drop(client)

	upstream, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	if !p.track(upstream) {
		return
	}
	defer p.drop(upstream)

	p.wg.Go(func() {
		_, _ = io.Copy(upstream, client)
		_ = upstream.Close()
	})
	_, _ = io.Copy(client, upstream)
}

// track adds conn to the open connections, or closes it and returns false
// when the proxy went down meanwhile.
func (p *proxy) track(conn net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()

	if !p.up {
		_ = conn.Close()
		return false
	}
	p.conns[conn] = struct{}{}

	return true
}

func (p *proxy) drop(conn net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()

	delete(p.conns, conn)
	_ = conn.Close()
}

// setUp sets whether the proxy forwards. Going down closes every open
// connection.
func (p *proxy) setUp(up bool) {
	p.mu.Lock()
	defer p.mu.Unlock()

	p.up = up
	if up {
		return
	}
	for conn := range p.conns {
		_ = conn.Close()
		delete(p.conns, conn)
	}
}
