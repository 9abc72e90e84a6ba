package meteringapi_test

import (
	"context"
	"encoding/base64"
	"io"
	"math"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	"github.com/metering/metering/internal/metering"
	"github.com/metering/metering/internal/pgtest"
)

func TestInvalidInputCornerCases(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	notUUIDToken := base64.RawURLEncoding.EncodeToString([]byte("2026-01-01T00:00:00Z|zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"))

	tests := []struct {
		name  string
		call  func() error
		field string
	}{
		{"nul in account", func() error {
			_, err := e.reserve("a\x00b", item(tasks, 1, ""))
			return err
		}, "account_id"},
		{"nul in reason", func() error {
			_, err := e.admin.AdjustUsage(e.ctx, &meteringv1.AdjustUsageRequest{AccountId: "a", Metric: tasks, Delta: 1, Reason: "x\x00"})
			return err
		}, "reason"},
		{"ttl below minimum", func() error {
			_, err := e.client.CheckAndReserve(e.ctx, &meteringv1.CheckAndReserveRequest{
				AccountId: "a", Items: []*meteringv1.UsageItem{item(tasks, 1, "")}, Ttl: &durationpb.Duration{Nanos: 500},
			})
			return err
		}, "ttl"},
		{"page token with a non-uuid id", func() error {
			_, err := e.admin.ListReservations(e.ctx, &meteringv1.ListReservationsRequest{AccountId: "a", PageToken: notUUIDToken})
			return err
		}, "page_token"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := requireCode(t, tt.call(), codes.InvalidArgument)
			assert.Contains(t, badFields(t, st), tt.field)
		})
	}
	assert.Equal(t, 0, e.count("reservations"))
	assert.Equal(t, 0, e.count("usage_events"))
}

func TestReserveKeyWithZeroTTLMatchesUnsetTTL(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	req := &meteringv1.CheckAndReserveRequest{AccountId: "a", Items: []*meteringv1.UsageItem{item(tasks, 1, "")}, IdempotencyKey: "k"}
	first, err := e.client.CheckAndReserve(e.ctx, req)
	require.NoError(t, err)

	req.Ttl = durationpb.New(0)
	again, err := e.client.CheckAndReserve(e.ctx, req)

	require.NoError(t, err)
	assert.True(t, again.GetReplayed())
	assert.Equal(t, first.GetReservation().GetId(), again.GetReservation().GetId())
}

func TestCommitOverflowIsInvalid(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.plan("big", limits{"storage_bytes": -1})
	e.account("a", "big")
	r := e.mustReserve("a", "upload-1", item(storage, math.MaxInt64-10, ""))
	_, err := e.admin.AdjustUsage(e.ctx, &meteringv1.AdjustUsageRequest{AccountId: "a", Metric: storage, Delta: 100, Reason: "test"})
	st := requireCode(t, err, codes.InvalidArgument)
	assert.Equal(t, []string{"delta"}, badFields(t, st), "the pending reservation counts toward overflow")

	_, err = e.admin.AdjustUsage(e.ctx, &meteringv1.AdjustUsageRequest{AccountId: "a", Metric: storage, Delta: 5, Reason: "test"})
	require.NoError(t, err)
	e.clock.Advance(metering.DefaultTTL)
	_, err = e.admin.AdjustUsage(e.ctx, &meteringv1.AdjustUsageRequest{AccountId: "a", Metric: storage, Delta: 50, Reason: "test"})
	require.NoError(t, err, "the expired reservation no longer counts")

	_, err = e.commit("a", r.GetId())

	st = requireCode(t, err, codes.InvalidArgument)
	assert.Equal(t, []string{"actual_items"}, badFields(t, st))
	assert.EqualValues(t, 55, e.usage("a", storage, "").GetUsed())
}

func TestSetAccountPlanRejectsAnchorChange(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	e.create("a", "", item(tasks, 2, ""))

	_, err := e.admin.SetAccountPlan(e.ctx, &meteringv1.SetAccountPlanRequest{
		AccountId: "a", PlanId: "pro", BillingAnchor: timestamppb.New(time.Date(2026, time.January, 15, 0, 0, 0, 0, time.UTC)),
	})

	st := requireCode(t, err, codes.FailedPrecondition)
	assert.Equal(t, metering.ReasonAnchorFixed, detail[*errdetails.ErrorInfo](t, st).GetReason())
	account, err := e.admin.GetAccount(e.ctx, &meteringv1.GetAccountRequest{AccountId: "a"})
	require.NoError(t, err)
	assert.Equal(t, "free", account.GetAccount().GetPlanId(), "a rejected change writes nothing")
	assert.EqualValues(t, 2, e.usage("a", tasks, "").GetUsed())

	_, err = e.admin.SetAccountPlan(e.ctx, &meteringv1.SetAccountPlanRequest{
		AccountId: "a", PlanId: "pro", BillingAnchor: timestamppb.New(time.Date(2026, time.January, 1, 0, 0, 0, 0, time.UTC)),
	})
	require.NoError(t, err, "the same anchor is accepted")
}

func TestDeletedResourceCanBeCountedAgain(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	e.create("a", "upload-1", item(storage, 100, ""))
	_, err := e.client.RecordDeletion(e.ctx, &meteringv1.RecordDeletionRequest{AccountId: "a", Metric: storage, ResourceId: "upload-1"})
	require.NoError(t, err)

	e.create("a", "upload-1", item(storage, 40, ""))
	assert.EqualValues(t, 40, e.usage("a", storage, "").GetUsed())

	res, err := e.client.RecordDeletion(e.ctx, &meteringv1.RecordDeletionRequest{AccountId: "a", Metric: storage, ResourceId: "upload-1"})
	require.NoError(t, err)
	assert.EqualValues(t, 40, res.GetSubtracted())
	assert.EqualValues(t, 0, e.usage("a", storage, "").GetUsed())
}

// A connection that breaks under a pooled connection is UNAVAILABLE, not
// INTERNAL. A proxy between the pool and PostgreSQL cuts every connection.
func TestDroppedConnectionIsUnavailable(t *testing.T) {
	t.Parallel()
	cfg, err := pgxpool.ParseConfig(pgtest.NewDatabase(t))
	require.NoError(t, err)
	proxy := startProxy(t, net.JoinHostPort(cfg.ConnConfig.Host, strconv.Itoa(int(cfg.ConnConfig.Port))))
	host, port, err := net.SplitHostPort(proxy.addr)
	require.NoError(t, err)
	portNumber, err := strconv.Atoi(port)
	require.NoError(t, err)
	cfg.ConnConfig.Host, cfg.ConnConfig.Port = host, uint16(portNumber)
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	e := newEnvWithPool(t, pool, false)
	e.account("a", "free")

	proxy.cutAll()
	_, err = e.reserve("a", item(tasks, 1, ""))

	code := status.Code(err)
	assert.True(t, code == codes.OK || code == codes.Unavailable, "got %v", err)
	assert.NotEqual(t, codes.Internal, code)
}

type proxy struct {
	addr  string
	mu    sync.Mutex
	conns []net.Conn
}

func startProxy(t *testing.T, target string) *proxy {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = lis.Close() })
	p := &proxy{addr: lis.Addr().String()}
	go func() {
		for {
			client, err := lis.Accept()
			if err != nil {
				return
			}
			server, err := net.Dial("tcp", target)
			if err != nil {
				_ = client.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, client, server)
			p.mu.Unlock()
			go func() { _, _ = io.Copy(server, client); _ = server.Close() }()
			go func() { _, _ = io.Copy(client, server); _ = client.Close() }()
		}
	}()
	t.Cleanup(p.cutAll)
	return p
}

func (p *proxy) cutAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		_ = c.Close()
	}
	p.conns = nil
}

// The command line issues tokens through the service without the RPC's
// checks, so the service itself must enforce the token rules.
func TestIssueServiceTokenRulesHoldWithoutRPC(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")

	tests := []struct {
		name  string
		req   metering.IssueTokenRequest
		field string
	}{
		{"admin bound to an account", metering.IssueTokenRequest{Name: "x", AccountID: "a", Scopes: []string{"admin"}}, "scopes[0]"},
		{"repeated scope", metering.IssueTokenRequest{Name: "x", Scopes: []string{"usage:write", "usage:write"}}, "scopes[1]"},
		{"unknown scope", metering.IssueTokenRequest{Name: "x", Scopes: []string{"root"}}, "scopes[0]"},
		{"agent without account", metering.IssueTokenRequest{Name: "x", AgentID: "ag", Scopes: []string{"usage:write"}}, "agent_id"},
		{"no name", metering.IssueTokenRequest{Scopes: []string{"usage:write"}}, "name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := e.svc.IssueServiceToken(e.ctx, tt.req)

			var invalid *metering.InvalidError
			require.ErrorAs(t, err, &invalid)
			assert.Equal(t, tt.field, invalid.Field)
		})
	}

	_, _, err := e.svc.IssueServiceToken(e.ctx, metering.IssueTokenRequest{Name: "x", AccountID: "nobody", Scopes: []string{"usage:read"}})
	assert.ErrorIs(t, err, metering.ErrAccountNotFound)
	assert.Equal(t, 0, e.count("service_tokens"))
}
