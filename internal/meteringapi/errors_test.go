package meteringapi_test

import (
	"context"
	"math"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
)

func TestLimitErrorDetails(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.plan("small", limits{"tasks": 2, "agents": 1})
	e.account("acct-1", "small")
	e.create("acct-1", "", item(tasks, 1, ""))
	e.mustReserve("acct-1", "", item(tasks, 1, ""))

	_, err := e.reserve("acct-1", item(tasks, 1, ""))

	st := requireCode(t, err, codes.ResourceExhausted)
	quota := detail[*errdetails.QuotaFailure](t, st)
	require.Len(t, quota.GetViolations(), 1)
	assert.Equal(t, "accounts/acct-1/metrics/tasks", quota.GetViolations()[0].GetSubject())
	info := detail[*errdetails.ErrorInfo](t, st)
	assert.Equal(t, "PLAN_LIMIT_EXCEEDED", info.GetReason())
	assert.Equal(t, map[string]string{
		"account_id": "acct-1", "metric": "tasks", "scope": "account", "limit": "2", "used": "1",
		"reserved": "1", "requested": "1", "period_end": "2026-04-01T00:00:00Z",
	}, info.GetMetadata())
	retry := detail[*errdetails.RetryInfo](t, st)
	assert.Equal(t, time.Date(2026, time.April, 1, 0, 0, 0, 0, time.UTC).Sub(startTime), retry.GetRetryDelay().AsDuration())
}

func TestLimitErrorRunningTotalHasNoRetryInfo(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.plan("small", limits{"agents": 1, "documents/parent": 1})
	e.account("a", "small")
	e.create("a", "agent-1", item(agents, 1, ""))
	e.create("a", "doc-1", item(documents, 1, "task-9"))

	for _, it := range []*meteringv1.UsageItem{item(agents, 1, ""), item(documents, 1, "task-9")} {
		_, err := e.reserve("a", it)

		st := requireCode(t, err, codes.ResourceExhausted)
		for _, d := range st.Details() {
			_, isRetry := d.(*errdetails.RetryInfo)
			assert.False(t, isRetry, "waiting does not free a running total")
		}
	}
	_, err := e.reserve("a", item(documents, 1, "task-9"))
	st := requireCode(t, err, codes.ResourceExhausted)
	assert.Equal(t, "accounts/a/metrics/documents/parents/task-9", detail[*errdetails.QuotaFailure](t, st).GetViolations()[0].GetSubject())
	assert.Equal(t, "task-9", detail[*errdetails.ErrorInfo](t, st).GetMetadata()["parent_id"])
}

func TestBadInputIsRejectedAndWritesNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	long := strings.Repeat("x", 129)
	badUTF8 := "acct-\xff"
	reservationID := "3b241101-e2bb-4255-8caf-4136c566a962"

	reserve := func(r *meteringv1.CheckAndReserveRequest) func() error {
		return func() error { _, err := e.client.CheckAndReserve(e.ctx, r); return err }
	}
	one := []*meteringv1.UsageItem{item(tasks, 1, "")}
	tests := []struct {
		name  string
		call  func() error
		field string
	}{
		{"empty account", reserve(&meteringv1.CheckAndReserveRequest{Items: one}), "account_id"},
		{"long account", reserve(&meteringv1.CheckAndReserveRequest{AccountId: long, Items: one}), "account_id"},
		{"invalid utf-8 account", reserve(&meteringv1.CheckAndReserveRequest{AccountId: badUTF8, Items: one}), "account_id"},
		{"no items", reserve(&meteringv1.CheckAndReserveRequest{AccountId: "a"}), "items"},
		{"unknown metric", reserve(&meteringv1.CheckAndReserveRequest{AccountId: "a", Items: []*meteringv1.UsageItem{item(0, 1, "")}}), "items[0].metric"},
		{"undefined metric", reserve(&meteringv1.CheckAndReserveRequest{AccountId: "a", Items: []*meteringv1.UsageItem{item(99, 1, "")}}), "items[0].metric"},
		{"zero amount", reserve(&meteringv1.CheckAndReserveRequest{AccountId: "a", Items: []*meteringv1.UsageItem{item(tasks, 0, "")}}), "items[0].amount"},
		{"negative amount", reserve(&meteringv1.CheckAndReserveRequest{AccountId: "a", Items: []*meteringv1.UsageItem{item(tasks, -1, "")}}), "items[0].amount"},
		{"repeated metric", reserve(&meteringv1.CheckAndReserveRequest{AccountId: "a", Items: []*meteringv1.UsageItem{item(documents, 1, "t1"), item(documents, 1, "t2")}}), "items[1].metric"},
		{"repeated metric after one item per metric", reserve(&meteringv1.CheckAndReserveRequest{AccountId: "a", Items: []*meteringv1.UsageItem{
			item(agents, 1, ""), item(tasks, 1, ""), item(documents, 1, ""), item(messages, 1, ""), item(storage, 1, ""), item(tasks, 1, ""),
		}}), "items[5].metric"},
		{"parent on metric without parent limit", reserve(&meteringv1.CheckAndReserveRequest{AccountId: "a", Items: []*meteringv1.UsageItem{item(tasks, 1, "t1")}}), "items[0].parent_id"},
		{"long parent", reserve(&meteringv1.CheckAndReserveRequest{AccountId: "a", Items: []*meteringv1.UsageItem{item(documents, 1, long)}}), "items[0].parent_id"},
		{"invalid utf-8 parent", reserve(&meteringv1.CheckAndReserveRequest{AccountId: "a", Items: []*meteringv1.UsageItem{item(documents, 1, "\xc3")}}), "items[0].parent_id"},
		{"long key", reserve(&meteringv1.CheckAndReserveRequest{AccountId: "a", Items: one, IdempotencyKey: long}), "idempotency_key"},
		{"long resource", reserve(&meteringv1.CheckAndReserveRequest{AccountId: "a", Items: one, ResourceId: long}), "resource_id"},
		{"negative ttl", reserve(&meteringv1.CheckAndReserveRequest{AccountId: "a", Items: one, Ttl: durationpb.New(-time.Second)}), "ttl"},
		{"ttl above max", reserve(&meteringv1.CheckAndReserveRequest{AccountId: "a", Items: one, Ttl: durationpb.New(time.Hour + time.Second)}), "ttl"},
		{"invalid ttl", reserve(&meteringv1.CheckAndReserveRequest{AccountId: "a", Items: one, Ttl: &durationpb.Duration{Seconds: 1, Nanos: -1}}), "ttl"},
		{"sum overflows int64", func() error {
			_, err := e.client.RecordUsage(e.ctx, &meteringv1.RecordUsageRequest{AccountId: "a", Items: []*meteringv1.UsageItem{item(messages, math.MaxInt64, "")}})
			return err
		}, "items"},
		{"commit bad reservation id", func() error {
			_, err := e.client.Commit(e.ctx, &meteringv1.CommitRequest{AccountId: "a", ReservationId: "not-a-uuid"})
			return err
		}, "reservation_id"},
		{"commit negative actual", func() error {
			_, err := e.client.Commit(e.ctx, &meteringv1.CommitRequest{AccountId: "a", ReservationId: reservationID, ActualItems: []*meteringv1.UsageItem{item(tasks, -1, "")}})
			return err
		}, "actual_items[0].amount"},
		{"release empty reservation id", func() error {
			_, err := e.client.Release(e.ctx, &meteringv1.ReleaseRequest{AccountId: "a"})
			return err
		}, "reservation_id"},
		{"record running total without resource", func() error {
			_, err := e.client.RecordUsage(e.ctx, &meteringv1.RecordUsageRequest{AccountId: "a", Items: []*meteringv1.UsageItem{item(storage, 10, "")}})
			return err
		}, "resource_id"},
		{"deletion without resource", func() error {
			_, err := e.client.RecordDeletion(e.ctx, &meteringv1.RecordDeletionRequest{AccountId: "a", Metric: agents})
			return err
		}, "resource_id"},
		{"usage invalid utf-8 parent", func() error {
			_, err := e.client.GetCurrentUsage(e.ctx, &meteringv1.GetCurrentUsageRequest{AccountId: "a", ParentId: "\xff"})
			return err
		}, "parent_id"},
		{"adjust without reason", func() error {
			_, err := e.admin.AdjustUsage(e.ctx, &meteringv1.AdjustUsageRequest{AccountId: "a", Metric: tasks, Delta: 1})
			return err
		}, "reason"},
		{"adjust zero delta", func() error {
			_, err := e.admin.AdjustUsage(e.ctx, &meteringv1.AdjustUsageRequest{AccountId: "a", Metric: tasks, Reason: "r"})
			return err
		}, "delta"},
		{"plan bad id", func() error {
			_, err := e.admin.UpsertPlan(e.ctx, &meteringv1.UpsertPlanRequest{Plan: &meteringv1.Plan{Id: "Bad Id"}})
			return err
		}, "plan.id"},
		{"plan missing limits", func() error {
			_, err := e.admin.UpsertPlan(e.ctx, &meteringv1.UpsertPlanRequest{Plan: &meteringv1.Plan{Id: "p"}})
			return err
		}, "plan.limits"},
		{"plan limit without bound", func() error {
			_, err := e.admin.UpsertPlan(e.ctx, &meteringv1.UpsertPlanRequest{Plan: &meteringv1.Plan{Id: "p", Limits: []*meteringv1.Limit{{Metric: tasks, Scope: meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT}}}})
			return err
		}, "plan.limits[0]"},
		{"account bad plan id", func() error {
			_, err := e.admin.SetAccountPlan(e.ctx, &meteringv1.SetAccountPlanRequest{AccountId: "b", PlanId: ""})
			return err
		}, "plan_id"},
		{"list negative page size", func() error {
			_, err := e.admin.ListReservations(e.ctx, &meteringv1.ListReservationsRequest{AccountId: "a", PageSize: -1})
			return err
		}, "page_size"},
		{"list bad page token", func() error {
			_, err := e.admin.ListReservations(e.ctx, &meteringv1.ListReservationsRequest{AccountId: "a", PageToken: "zz"})
			return err
		}, "page_token"},
	}
	e.create("a", "", item(messages, 1, ""))

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()

			st := requireCode(t, err, codes.InvalidArgument)
			assert.Contains(t, badFields(t, st), tt.field)
			assert.Contains(t, st.Message(), tt.field)
		})
	}
	assert.Equal(t, 1, e.count("reservations"), "bad input must write no reservation")
	assert.Equal(t, 1, e.count("usage_events"), "bad input must write no ledger row")
	assert.Equal(t, 1, e.count("counters"))
	assert.Equal(t, 0, e.count("idempotency_keys"))
	assert.Equal(t, 1, e.count("accounts"))
}

func TestUnknownAccountAndReservationNotFound(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	e.account("b", "free")
	theirs := e.mustReserve("b", "", item(tasks, 1, ""))

	_, err := e.reserve("nobody", item(tasks, 1, ""))
	requireCode(t, err, codes.NotFound)
	_, err = e.client.GetCurrentUsage(e.ctx, &meteringv1.GetCurrentUsageRequest{AccountId: "nobody"})
	requireCode(t, err, codes.NotFound)
	_, err = e.commit("a", "3b241101-e2bb-4255-8caf-4136c566a962")
	requireCode(t, err, codes.NotFound)

	_, err = e.commit("a", theirs.GetId())
	requireCode(t, err, codes.NotFound)
	_, err = e.client.Release(e.ctx, &meteringv1.ReleaseRequest{AccountId: "a", ReservationId: theirs.GetId()})
	requireCode(t, err, codes.NotFound)
	assert.EqualValues(t, 1, e.usage("b", tasks, "").GetReserved(), "another account cannot touch b's reservation")

	_, err = e.admin.SetAccountPlan(e.ctx, &meteringv1.SetAccountPlanRequest{AccountId: "c", PlanId: "no-such-plan"})
	requireCode(t, err, codes.NotFound)
}

func TestDatabaseUnreachableIsUnavailable(t *testing.T) {
	t.Parallel()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := lis.Addr().String()
	require.NoError(t, lis.Close())
	cfg, err := pgxpool.ParseConfig("postgres://postgres@" + addr + "/postgres?connect_timeout=2")
	require.NoError(t, err)
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	e := newEnvWithPool(t, pool, false)

	_, err = e.reserve("a", item(tasks, 1, ""))
	st := requireCode(t, err, codes.Unavailable)
	assert.NotContains(t, st.Message(), addr, "the message must not leak connection details")

	_, err = e.client.GetCurrentUsage(e.ctx, &meteringv1.GetCurrentUsageRequest{AccountId: "a"})
	requireCode(t, err, codes.Unavailable)
	_, err = e.admin.ListPlans(e.ctx, &meteringv1.ListPlansRequest{})
	requireCode(t, err, codes.Unavailable)
}

func TestSeededPlans(t *testing.T) {
	t.Parallel()
	e := newEnv(t)

	res, err := e.admin.ListPlans(e.ctx, &meteringv1.ListPlansRequest{})

	require.NoError(t, err)
	byID := map[string]*meteringv1.Plan{}
	for _, p := range res.GetPlans() {
		byID[p.GetId()] = p
		assert.Len(t, p.GetLimits(), 6, "plan %s lists every limit", p.GetId())
	}
	require.Contains(t, byID, "free")
	require.Contains(t, byID, "pro")
	require.Contains(t, byID, "enterprise")
	free := byID["free"].GetLimits()
	assert.Equal(t, agents, free[0].GetMetric())
	assert.EqualValues(t, 3, free[0].GetMax())
	for _, l := range byID["enterprise"].GetLimits() {
		assert.True(t, l.GetUnlimited(), "enterprise %s %s", l.GetMetric(), l.GetScope())
	}

	e.account("big", "enterprise")
	u := e.usage("big", storage, "")
	assert.True(t, u.GetUnlimited())
	assert.Nil(t, u.Limit, "an unlimited counter has no limit value")
	assert.Nil(t, u.Remaining)
}

func TestUpsertPlanReplacesLimits(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.plan("team", limits{"tasks": 5})
	e.account("a", "team")
	assert.EqualValues(t, 5, e.usage("a", tasks, "").GetLimit())

	e.plan("team", limits{"tasks": -1})

	u := e.usage("a", tasks, "")
	assert.True(t, u.GetUnlimited())
	_, err := e.reserve("a", item(tasks, 1_000_000, ""))
	require.NoError(t, err)
}

func TestSetAccountPlanKeepsAnchorAndMode(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.accountWith(&meteringv1.SetAccountPlanRequest{AccountId: "a", PlanId: "free", EnforcementMode: meteringv1.EnforcementMode_ENFORCEMENT_MODE_TRACK_ONLY})

	res, err := e.admin.SetAccountPlan(e.ctx, &meteringv1.SetAccountPlanRequest{AccountId: "a", PlanId: "pro"})

	require.NoError(t, err)
	assert.False(t, res.GetCreated())
	assert.Equal(t, "pro", res.GetAccount().GetPlanId())
	assert.Equal(t, startTime, res.GetAccount().GetBillingAnchor().AsTime(), "a new account without an anchor is anchored now")
	assert.Equal(t, meteringv1.EnforcementMode_ENFORCEMENT_MODE_TRACK_ONLY, res.GetAccount().GetEnforcementMode())
}

func TestListReservationsPages(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	var want []string
	for range 5 {
		r := e.mustReserve("a", "", item(tasks, 1, ""))
		want = append([]string{r.GetId()}, want...)
		e.clock.Advance(time.Second)
	}

	var got []string
	token := ""
	for {
		res, err := e.admin.ListReservations(e.ctx, &meteringv1.ListReservationsRequest{AccountId: "a", PageSize: 2, PageToken: token})
		require.NoError(t, err)
		for _, r := range res.GetReservations() {
			got = append(got, r.GetId())
		}
		token = res.GetNextPageToken()
		if token == "" {
			break
		}
	}

	assert.Equal(t, want, got)
	_, err := e.admin.ListReservations(e.ctx, &meteringv1.ListReservationsRequest{AccountId: "nobody"})
	assert.Equal(t, codes.NotFound, status.Code(err))
}
