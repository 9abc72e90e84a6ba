package meteringapi_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	"github.com/metering/metering/internal/metering"
	"github.com/metering/metering/internal/meteringapi"
	"github.com/metering/metering/internal/pgtest"
)

// TestMain runs every test with a local time zone far from UTC, so a result
// that depends on the server's TZ shows up as a failure. The databases that
// pgtest creates use a non-UTC session TimeZone for the same reason.
func TestMain(m *testing.M) {
	loc, err := time.LoadLocation("Asia/Kathmandu")
	if err != nil {
		fmt.Fprintln(os.Stderr, "load time zone:", err)
		os.Exit(1)
	}
	time.Local = loc
	os.Exit(m.Run())
}

// clock is a settable time source for the service.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// env is one test's server, clients and database.
type env struct {
	t      *testing.T
	ctx    context.Context
	pool   *pgxpool.Pool
	svc    *metering.Service
	clock  *clock
	client meteringv1.MeteringServiceClient
	admin  meteringv1.MeteringAdminServiceClient
	// batches records the sizes of the reserve and commit batches run.
	batches *batchSizes
}

// batchSizes records the largest batch run per operation.
type batchSizes struct {
	mu      sync.Mutex
	largest map[string]int
}

func (b *batchSizes) observe(op string, size int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.largest == nil {
		b.largest = map[string]int{}
	}
	b.largest[op] = max(b.largest[op], size)
}

func (b *batchSizes) max(op string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.largest[op]
}

// startTime is the clock's start: mid-period for accounts anchored on
// 2026-01-01.
var startTime = time.Date(2026, time.March, 10, 12, 0, 0, 0, time.UTC)

// newEnv starts a server on its own database. At cleanup it checks that
// every counter equals the sum of its ledger rows.
func newEnv(t *testing.T) *env {
	t.Helper()
	pool := pgtest.NewPool(t)
	return newEnvWithPool(t, pool, true)
}

func newEnvWithPool(t *testing.T, pool *pgxpool.Pool, reconcile bool) *env {
	t.Helper()
	clk := &clock{now: startTime}
	logger := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	batches := &batchSizes{}
	svc := metering.New(metering.Config{Pool: pool, Logger: logger, Now: clk.Now, OnBatch: batches.observe})
	t.Cleanup(svc.Close)
	api := meteringapi.New(svc, logger, prometheus.NewRegistry())

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := grpc.NewServer()
	api.Register(srv)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)

	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })

	e := &env{
		t:       t,
		batches: batches,
		ctx:     context.Background(),
		pool:    pool,
		svc:     svc,
		clock:   clk,
		client:  meteringv1.NewMeteringServiceClient(conn),
		admin:   meteringv1.NewMeteringAdminServiceClient(conn),
	}
	if reconcile {
		t.Cleanup(e.requireReconciled)
	}
	return e
}

// requireReconciled fails the test when a counter differs from its ledger.
func (e *env) requireReconciled() {
	mismatches, err := e.svc.Reconcile(context.Background())
	require.NoError(e.t, err)
	assert.Empty(e.t, mismatches, "counters must equal the sums of the ledger")
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

// limits is a compact plan definition: metric to max, with -1 meaning
// unlimited. Documents per task is under the key "documents/parent".
type limits map[string]int64

var limitKeys = []struct {
	key    string
	metric meteringv1.Metric
	scope  meteringv1.LimitScope
}{
	{"agents", meteringv1.Metric_METRIC_AGENTS, meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT},
	{"tasks", meteringv1.Metric_METRIC_TASKS, meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT},
	{"documents", meteringv1.Metric_METRIC_DOCUMENTS, meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT},
	{"documents/parent", meteringv1.Metric_METRIC_DOCUMENTS, meteringv1.LimitScope_LIMIT_SCOPE_PARENT},
	{"messages", meteringv1.Metric_METRIC_MESSAGES, meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT},
	{"storage_bytes", meteringv1.Metric_METRIC_STORAGE_BYTES, meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT},
}

// plan creates a plan whose unnamed limits are 1000.
func (e *env) plan(id string, l limits) {
	e.t.Helper()
	p := &meteringv1.Plan{Id: id, DisplayName: id}
	for _, k := range limitKeys {
		max, ok := l[k.key]
		if !ok {
			max = 1000
		}
		limit := &meteringv1.Limit{Metric: k.metric, Scope: k.scope}
		if max < 0 {
			limit.Bound = &meteringv1.Limit_Unlimited{Unlimited: true}
		} else {
			limit.Bound = &meteringv1.Limit_Max{Max: max}
		}
		p.Limits = append(p.Limits, limit)
	}
	_, err := e.admin.UpsertPlan(e.ctx, &meteringv1.UpsertPlanRequest{Plan: p})
	require.NoError(e.t, err)
}

// account creates an account on a plan, anchored on 2026-01-01.
func (e *env) account(id, plan string) {
	e.t.Helper()
	e.accountWith(&meteringv1.SetAccountPlanRequest{
		AccountId:     id,
		PlanId:        plan,
		BillingAnchor: timestamppb.New(time.Date(2026, time.January, 1, 0, 0, 0, 0, time.UTC)),
	})
}

func (e *env) accountWith(req *meteringv1.SetAccountPlanRequest) {
	e.t.Helper()
	_, err := e.admin.SetAccountPlan(e.ctx, req)
	require.NoError(e.t, err)
}

func item(m meteringv1.Metric, amount int64, parent string) *meteringv1.UsageItem {
	return &meteringv1.UsageItem{Metric: m, Amount: amount, ParentId: parent}
}

// reserve reserves items and returns the response or the error.
func (e *env) reserve(account string, list ...*meteringv1.UsageItem) (*meteringv1.CheckAndReserveResponse, error) {
	return e.client.CheckAndReserve(e.ctx, &meteringv1.CheckAndReserveRequest{AccountId: account, Items: list})
}

// mustReserve reserves items for a resource and fails the test on error.
func (e *env) mustReserve(account, resource string, list ...*meteringv1.UsageItem) *meteringv1.Reservation {
	e.t.Helper()
	res, err := e.client.CheckAndReserve(e.ctx, &meteringv1.CheckAndReserveRequest{AccountId: account, Items: list, ResourceId: resource})
	require.NoError(e.t, err)
	return res.GetReservation()
}

func (e *env) commit(account, reservationID string) (*meteringv1.CommitResponse, error) {
	return e.client.Commit(e.ctx, &meteringv1.CommitRequest{AccountId: account, ReservationId: reservationID})
}

// create reserves and commits one resource.
func (e *env) create(account, resource string, list ...*meteringv1.UsageItem) {
	e.t.Helper()
	r := e.mustReserve(account, resource, list...)
	_, err := e.commit(account, r.GetId())
	require.NoError(e.t, err)
}

// usage returns the account-wide counter of a metric, or the parent's when
// parent is set.
func (e *env) usage(account string, m meteringv1.Metric, parent string) *meteringv1.MetricUsage {
	e.t.Helper()
	res, err := e.client.GetCurrentUsage(e.ctx, &meteringv1.GetCurrentUsageRequest{AccountId: account, ParentId: parent})
	require.NoError(e.t, err)
	for _, u := range res.GetUsage() {
		if u.GetMetric() == m && u.GetParentId() == parent {
			return u
		}
	}
	e.t.Fatalf("no usage for metric %s parent %q", m, parent)
	return nil
}

// requireCode fails the test unless err is a status with code.
func requireCode(t *testing.T, err error, code codes.Code) *status.Status {
	t.Helper()
	require.Error(t, err)
	st, ok := status.FromError(err)
	require.True(t, ok, "error is not a gRPC status: %v", err)
	require.Equal(t, code, st.Code(), "message: %s", st.Message())
	return st
}

// detail returns the first detail of type T in st.
func detail[T any](t *testing.T, st *status.Status) T {
	t.Helper()
	for _, d := range st.Details() {
		if v, ok := d.(T); ok {
			return v
		}
	}
	var zero T
	t.Fatalf("status %q has no %T detail", st.Message(), zero)
	return zero
}

// badFields returns the field names of a BadRequest detail.
func badFields(t *testing.T, st *status.Status) []string {
	t.Helper()
	var fields []string
	for _, v := range detail[*errdetails.BadRequest](t, st).GetFieldViolations() {
		fields = append(fields, v.GetField())
	}
	return fields
}

// count returns the number of rows of a table.
func (e *env) count(table string) int {
	e.t.Helper()
	var n int
	require.NoError(e.t, e.pool.QueryRow(e.ctx, "SELECT count(*) FROM metering."+table).Scan(&n))
	return n
}
