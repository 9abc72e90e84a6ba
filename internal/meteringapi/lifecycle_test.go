package meteringapi_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	"github.com/metering/metering/internal/metering"
)

func (e *env) reserveTTL(account string, ttl time.Duration, list ...*meteringv1.UsageItem) *meteringv1.Reservation {
	e.t.Helper()
	res, err := e.client.CheckAndReserve(e.ctx, &meteringv1.CheckAndReserveRequest{AccountId: account, Items: list, Ttl: durationpb.New(ttl)})
	require.NoError(e.t, err)
	return res.GetReservation()
}

func TestReserveDefaultTTL(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")

	r := e.mustReserve("a", "", item(tasks, 1, ""))

	assert.Equal(t, metering.DefaultTTL, r.GetExpiresAt().AsTime().Sub(r.GetCreatedAt().AsTime()))
	assert.Equal(t, startTime, r.GetCreatedAt().AsTime())
}

// Expired reservations stop counting at their expiry, with no sweeper
// running.
func TestExpiredReservationStopsCountingWithoutSweeper(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.plan("small", limits{"tasks": 1})
	e.account("a", "small")
	first := e.reserveTTL("a", time.Minute, item(tasks, 1, ""))
	_, err := e.reserve("a", item(tasks, 1, ""))
	requireCode(t, err, codes.ResourceExhausted)

	e.clock.Advance(time.Minute)

	assert.EqualValues(t, 0, e.usage("a", tasks, "").GetReserved())
	second, err := e.reserve("a", item(tasks, 1, ""))
	require.NoError(t, err, "the expired reservation must not hold capacity")
	list, err := e.admin.ListReservations(e.ctx, &meteringv1.ListReservationsRequest{AccountId: "a"})
	require.NoError(t, err)
	require.Len(t, list.GetReservations(), 2)
	assert.Equal(t, second.GetReservation().GetId(), list.GetReservations()[0].GetId())
	assert.Equal(t, meteringv1.ReservationState_RESERVATION_STATE_PENDING, list.GetReservations()[0].GetState())
	assert.Equal(t, first.GetId(), list.GetReservations()[1].GetId())
	assert.Equal(t, meteringv1.ReservationState_RESERVATION_STATE_EXPIRED, list.GetReservations()[1].GetState())
}

func TestCommitExpiredFailsWhenCapacityTaken(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.plan("small", limits{"tasks": 1})
	e.account("a", "small")
	first := e.reserveTTL("a", time.Minute, item(tasks, 1, ""))
	e.clock.Advance(2 * time.Minute)
	e.create("a", "", item(tasks, 1, ""))

	_, err := e.commit("a", first.GetId())

	st := requireCode(t, err, codes.FailedPrecondition)
	info := detail[*errdetails.ErrorInfo](t, st)
	assert.Equal(t, metering.ReasonReservationExpired, info.GetReason())
	assert.Equal(t, "tasks", info.GetMetadata()["metric"])
	assert.EqualValues(t, 1, e.usage("a", tasks, "").GetUsed(), "the expired commit must not count")
}

func TestCommitExpiredSucceedsWhenCapacityFree(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.plan("small", limits{"tasks": 1})
	e.account("a", "small")
	first := e.reserveTTL("a", time.Minute, item(tasks, 1, ""))
	e.clock.Advance(2 * time.Minute)
	n, err := e.svc.ExpireReservations(e.ctx)
	require.NoError(t, err)
	require.EqualValues(t, 1, n, "the sweeper marks the reservation expired")

	res, err := e.commit("a", first.GetId())

	require.NoError(t, err)
	assert.Equal(t, meteringv1.ReservationState_RESERVATION_STATE_COMMITTED, res.GetReservation().GetState())
	assert.EqualValues(t, 1, e.usage("a", tasks, "").GetUsed())
}

func TestSweeperMarksOnlyExpired(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	e.reserveTTL("a", time.Minute, item(tasks, 1, ""))
	e.reserveTTL("a", time.Hour, item(tasks, 1, ""))
	e.clock.Advance(time.Minute)

	n, err := e.svc.ExpireReservations(e.ctx)

	require.NoError(t, err)
	assert.EqualValues(t, 1, n)
	var pending int
	require.NoError(t, e.pool.QueryRow(e.ctx, "SELECT count(*) FROM metering.reservations WHERE state = 'pending'").Scan(&pending))
	assert.Equal(t, 1, pending)
}

func TestReleaseStates(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	release := func(id string) (*meteringv1.ReleaseResponse, error) {
		return e.client.Release(e.ctx, &meteringv1.ReleaseRequest{AccountId: "a", ReservationId: id})
	}

	pending := e.mustReserve("a", "", item(tasks, 1, ""))
	res, err := release(pending.GetId())
	require.NoError(t, err)
	assert.Equal(t, meteringv1.ReservationState_RESERVATION_STATE_RELEASED, res.GetReservation().GetState())
	assert.EqualValues(t, 0, e.usage("a", tasks, "").GetReserved())

	_, err = release(pending.GetId())
	require.NoError(t, err, "releasing twice is OK")

	_, err = e.commit("a", pending.GetId())
	st := requireCode(t, err, codes.FailedPrecondition)
	assert.Equal(t, metering.ReasonReservationReleased, detail[*errdetails.ErrorInfo](t, st).GetReason())

	expired := e.reserveTTL("a", time.Second, item(tasks, 1, ""))
	e.clock.Advance(time.Second)
	_, err = release(expired.GetId())
	require.NoError(t, err, "releasing an expired reservation is OK")

	committed := e.mustReserve("a", "", item(tasks, 1, ""))
	_, err = e.commit("a", committed.GetId())
	require.NoError(t, err)
	_, err = release(committed.GetId())
	st = requireCode(t, err, codes.FailedPrecondition)
	assert.Equal(t, metering.ReasonReservationCommitted, detail[*errdetails.ErrorInfo](t, st).GetReason())
	assert.EqualValues(t, 1, e.usage("a", tasks, "").GetUsed())
}

func TestReserveIdempotentRetryReturnsSameReservation(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	req := &meteringv1.CheckAndReserveRequest{AccountId: "a", Items: []*meteringv1.UsageItem{item(tasks, 1, "")}, IdempotencyKey: "create-task-1"}

	first, err := e.client.CheckAndReserve(e.ctx, req)
	require.NoError(t, err)
	again, err := e.client.CheckAndReserve(e.ctx, req)
	require.NoError(t, err)

	assert.False(t, first.GetReplayed())
	assert.True(t, again.GetReplayed())
	assert.Equal(t, first.GetReservation().GetId(), again.GetReservation().GetId())
	assert.EqualValues(t, 1, e.usage("a", tasks, "").GetReserved())

	_, err = e.commit("a", first.GetReservation().GetId())
	require.NoError(t, err)
	afterCommit, err := e.client.CheckAndReserve(e.ctx, req)
	require.NoError(t, err)
	assert.Equal(t, first.GetReservation().GetId(), afterCommit.GetReservation().GetId())
	assert.Equal(t, meteringv1.ReservationState_RESERVATION_STATE_COMMITTED, afterCommit.GetReservation().GetState())
	assert.EqualValues(t, 1, e.usage("a", tasks, "").GetUsed())
	assert.EqualValues(t, 0, e.usage("a", tasks, "").GetReserved())
}

func TestReserveTenConcurrentRetriesCountOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	req := &meteringv1.CheckAndReserveRequest{AccountId: "a", Items: []*meteringv1.UsageItem{item(tasks, 1, "")}, IdempotencyKey: "k"}

	for round := range 5 {
		req.IdempotencyKey = fmt.Sprintf("key-%d", round)
		ids := make([]string, 10)
		errs := make([]error, 10)
		var wg sync.WaitGroup
		for i := range ids {
			wg.Go(func() {
				res, err := e.client.CheckAndReserve(e.ctx, req)
				errs[i] = err
				ids[i] = res.GetReservation().GetId()
			})
		}
		wg.Wait()

		for i := range ids {
			require.NoError(t, errs[i])
			assert.Equal(t, ids[0], ids[i], "round %d copy %d", round, i)
		}
	}
	assert.EqualValues(t, 5, e.usage("a", tasks, "").GetReserved())
	assert.Equal(t, 5, e.count("reservations"))
}

func TestReserveKeyReusedForOtherRequestRejected(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	_, err := e.client.CheckAndReserve(e.ctx, &meteringv1.CheckAndReserveRequest{
		AccountId: "a", Items: []*meteringv1.UsageItem{item(tasks, 1, "")}, IdempotencyKey: "key-1",
	})
	require.NoError(t, err)

	_, err = e.client.CheckAndReserve(e.ctx, &meteringv1.CheckAndReserveRequest{
		AccountId: "a", Items: []*meteringv1.UsageItem{item(tasks, 2, "")}, IdempotencyKey: "key-1",
	})

	st := requireCode(t, err, codes.InvalidArgument)
	assert.Contains(t, st.Message(), `"key-1"`)
	assert.Equal(t, []string{"idempotency_key"}, badFields(t, st))
	assert.EqualValues(t, 1, e.usage("a", tasks, "").GetReserved())
}

func TestIdempotencyKeysAreScopedPerAccount(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	e.account("b", "free")
	req := func(account string) *meteringv1.CheckAndReserveRequest {
		return &meteringv1.CheckAndReserveRequest{AccountId: account, Items: []*meteringv1.UsageItem{item(tasks, 1, "")}, IdempotencyKey: "shared"}
	}

	ra, err := e.client.CheckAndReserve(e.ctx, req("a"))
	require.NoError(t, err)
	rb, err := e.client.CheckAndReserve(e.ctx, req("b"))
	require.NoError(t, err)

	assert.NotEqual(t, ra.GetReservation().GetId(), rb.GetReservation().GetId())
	assert.False(t, rb.GetReplayed())
	assert.EqualValues(t, 1, e.usage("b", tasks, "").GetReserved())
}

func TestCommitTwiceIsReplayed(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	r := e.mustReserve("a", "agent-1", item(agents, 1, ""))

	first, err := e.commit("a", r.GetId())
	require.NoError(t, err)
	again, err := e.commit("a", r.GetId())
	require.NoError(t, err)

	assert.False(t, first.GetReplayed())
	assert.True(t, again.GetReplayed())
	assert.EqualValues(t, 1, e.usage("a", agents, "").GetUsed())

	_, err = e.client.Commit(e.ctx, &meteringv1.CommitRequest{
		AccountId: "a", ReservationId: r.GetId(), ActualItems: []*meteringv1.UsageItem{item(agents, 0, "")},
	})
	st := requireCode(t, err, codes.FailedPrecondition)
	assert.Equal(t, metering.ReasonCommitMismatch, detail[*errdetails.ErrorInfo](t, st).GetReason())
}

func TestRecordUsageRetryCountsOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.plan("small", limits{"messages": 2})
	e.account("a", "small")
	req := &meteringv1.RecordUsageRequest{AccountId: "a", Items: []*meteringv1.UsageItem{item(messages, 3, "")}, IdempotencyKey: "msg-1"}

	first, err := e.client.RecordUsage(e.ctx, req)
	require.NoError(t, err)
	again, err := e.client.RecordUsage(e.ctx, req)
	require.NoError(t, err)

	assert.True(t, again.GetReplayed())
	require.Len(t, first.GetExceeded(), 1, "recording is never rejected but reports the exceeded limit")
	assert.Equal(t, messages, first.GetExceeded()[0].GetMetric())
	assert.EqualValues(t, 3, e.usage("a", messages, "").GetUsed())
	assert.EqualValues(t, 0, e.usage("a", messages, "").GetRemaining())
}

func TestRecordDeletionLowersRunningTotalsOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	e.create("a", "agent-1", item(agents, 1, ""))
	e.create("a", "doc-1", item(documents, 1, "task-1"))
	e.create("a", "upload-1", item(storage, 500, ""))
	deleteResource := func(m meteringv1.Metric, resource string) (*meteringv1.RecordDeletionResponse, error) {
		return e.client.RecordDeletion(e.ctx, &meteringv1.RecordDeletionRequest{AccountId: "a", Metric: m, ResourceId: resource})
	}

	for range 2 {
		_, err := deleteResource(agents, "agent-1")
		require.NoError(t, err)
		_, err = deleteResource(documents, "doc-1")
		require.NoError(t, err)
		res, err := deleteResource(storage, "upload-1")
		require.NoError(t, err)
		assert.EqualValues(t, 500, res.GetSubtracted())
	}

	assert.EqualValues(t, 0, e.usage("a", agents, "").GetUsed())
	assert.EqualValues(t, 0, e.usage("a", storage, "").GetUsed())
	assert.EqualValues(t, 0, e.usage("a", documents, "task-1").GetUsed(), "the document frees its slot in the task")
	assert.EqualValues(t, 1, e.usage("a", documents, "").GetUsed(), "the period counter keeps what happened")

	_, err := deleteResource(agents, "agent-unknown")
	requireCode(t, err, codes.NotFound)
	_, err = deleteResource(tasks, "task-1")
	st := requireCode(t, err, codes.InvalidArgument)
	assert.Equal(t, []string{"metric"}, badFields(t, st))
}

func TestDeletionFreesCapacity(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.plan("small", limits{"documents/parent": 1})
	e.account("a", "small")
	e.create("a", "doc-1", item(documents, 1, "task-1"))
	_, err := e.reserve("a", item(documents, 1, "task-1"))
	st := requireCode(t, err, codes.ResourceExhausted)
	assert.Equal(t, "PARENT_LIMIT_EXCEEDED", detail[*errdetails.ErrorInfo](t, st).GetReason())
	_, err = e.reserve("a", item(documents, 1, "task-2"))
	require.NoError(t, err, "another task has its own limit")
	_, err = e.reserve("a", item(documents, 1, ""))
	require.NoError(t, err, "a document without a task skips the per-task limit")

	_, err = e.client.RecordDeletion(e.ctx, &meteringv1.RecordDeletionRequest{AccountId: "a", Metric: documents, ResourceId: "doc-1"})
	require.NoError(t, err)

	_, err = e.reserve("a", item(documents, 1, "task-1"))
	require.NoError(t, err)
	assert.EqualValues(t, 3, e.usage("a", documents, "").GetReserved(), "every document counts for the account")
}

func TestCommitRunningTotalRequiresResource(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	r := e.mustReserve("a", "", item(agents, 1, ""))

	_, err := e.commit("a", r.GetId())
	st := requireCode(t, err, codes.InvalidArgument)
	assert.Equal(t, []string{"resource_id"}, badFields(t, st))

	_, err = e.client.Commit(e.ctx, &meteringv1.CommitRequest{AccountId: "a", ReservationId: r.GetId(), ResourceId: "agent-1"})
	require.NoError(t, err)
	r2 := e.mustReserve("a", "", item(agents, 1, ""))
	_, err = e.client.Commit(e.ctx, &meteringv1.CommitRequest{AccountId: "a", ReservationId: r2.GetId(), ResourceId: "agent-1"})
	requireCode(t, err, codes.AlreadyExists)
	assert.EqualValues(t, 1, e.usage("a", agents, "").GetUsed())
}

func TestAdjustUsageRecordsCorrection(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	e.create("a", "", item(tasks, 3, ""))
	req := &meteringv1.AdjustUsageRequest{AccountId: "a", Metric: tasks, Delta: -2, Reason: "double-counted import", IdempotencyKey: "fix-1"}

	res, err := e.admin.AdjustUsage(e.ctx, req)
	require.NoError(t, err)
	again, err := e.admin.AdjustUsage(e.ctx, req)
	require.NoError(t, err)

	assert.EqualValues(t, 1, res.GetUsage().GetUsed())
	assert.True(t, again.GetReplayed())
	assert.EqualValues(t, 1, e.usage("a", tasks, "").GetUsed())
	var reason string
	require.NoError(t, e.pool.QueryRow(e.ctx, "SELECT reason FROM metering.usage_events WHERE kind = 'adjustment'").Scan(&reason))
	assert.Equal(t, "double-counted import", reason)

	_, err = e.admin.AdjustUsage(e.ctx, &meteringv1.AdjustUsageRequest{AccountId: "a", Metric: tasks, Delta: -5, Reason: "too much"})
	st := requireCode(t, err, codes.FailedPrecondition)
	assert.Equal(t, metering.ReasonCounterNegative, detail[*errdetails.ErrorInfo](t, st).GetReason())
}
