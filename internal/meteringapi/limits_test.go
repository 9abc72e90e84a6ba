package meteringapi_test

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
)

const (
	agents    = meteringv1.Metric_METRIC_AGENTS
	tasks     = meteringv1.Metric_METRIC_TASKS
	documents = meteringv1.Metric_METRIC_DOCUMENTS
	messages  = meteringv1.Metric_METRIC_MESSAGES
	storage   = meteringv1.Metric_METRIC_STORAGE_BYTES
)

// reserveConcurrently runs n reservations at once and returns how many were
// granted, failing the test on any error but RESOURCE_EXHAUSTED.
func (e *env) reserveConcurrently(n int, request func(i int) []*meteringv1.UsageItem, account func(i int) string) int {
	e.t.Helper()
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		granted int
		errs    []error
	)
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			_, err := e.reserve(account(i), request(i)...)
			mu.Lock()
			defer mu.Unlock()
			switch status.Code(err) {
			case codes.OK:
				granted++
			case codes.ResourceExhausted:
			default:
				errs = append(errs, err)
			}
		})
	}
	close(start)
	wg.Wait()
	require.Empty(e.t, errs, "only RESOURCE_EXHAUSTED may reject a reservation")
	return granted
}

func TestReserveConcurrentAtLimitGrantsExactlyLimit(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const limit, callers, rounds = 10, 64, 5
	e.plan("small", limits{"tasks": limit})

	for round := range rounds {
		account := fmt.Sprintf("acct-%d", round)
		e.account(account, "small")

		granted := e.reserveConcurrently(callers,
			func(int) []*meteringv1.UsageItem { return []*meteringv1.UsageItem{item(tasks, 1, "")} },
			func(int) string { return account })

		assert.Equal(t, limit, granted, "round %d", round)
		u := e.usage(account, tasks, "")
		assert.EqualValues(t, limit, u.GetReserved(), "round %d reserved", round)
		assert.EqualValues(t, 0, u.GetRemaining(), "round %d remaining", round)
	}
	assert.Greater(t, e.batches.max("reserve"), 1, "concurrent reserves must run in batches")
}

// TestCoalescedReserveCommitReleaseAtLimit runs reserves, commits and
// releases from 64 callers at once, so batches mix accounts, grants and
// rejections, and checks the limits and the ledger after each round.
func TestCoalescedReserveCommitReleaseAtLimit(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const limit, callers = 20, 64
	e.plan("small", limits{"tasks": limit, "agents": limit})
	accounts := []string{"a", "b"}
	for _, a := range accounts {
		e.account(a, "small")
	}

	committed := map[string]int64{}
	for round := range 3 {
		var wg sync.WaitGroup
		var mu sync.Mutex
		for i := range callers {
			wg.Go(func() {
				account := accounts[i%len(accounts)]
				res, err := e.client.CheckAndReserve(e.ctx, &meteringv1.CheckAndReserveRequest{
					AccountId: account, Items: []*meteringv1.UsageItem{item(tasks, 1, ""), item(agents, 1, "")},
					ResourceId: fmt.Sprintf("agent-%d-%d", round, i),
				})
				if status.Code(err) == codes.ResourceExhausted {
					return
				}
				if !assert.NoError(t, err) {
					return
				}
				id := res.GetReservation().GetId()
				if i%3 == 0 {
					_, err = e.client.Release(e.ctx, &meteringv1.ReleaseRequest{AccountId: account, ReservationId: id})
					assert.NoError(t, err)
					return
				}
				_, err = e.commit(account, id)
				if assert.NoError(t, err) {
					mu.Lock()
					committed[account]++
					mu.Unlock()
				}
			})
		}
		wg.Wait()

		for _, a := range accounts {
			u := e.usage(a, agents, "")
			assert.LessOrEqual(t, u.GetUsed(), int64(limit), "round %d account %s", round, a)
			assert.Equal(t, committed[a], u.GetUsed(), "round %d account %s: every successful commit counts once", round, a)
			assert.EqualValues(t, u.GetUsed(), e.usage(a, tasks, "").GetUsed(), "round %d account %s: both items commit together", round, a)
			assert.EqualValues(t, 0, u.GetReserved(), "round %d account %s", round, a)
		}
		e.requireReconciled()
	}
	assert.Greater(t, e.batches.max("reserve"), 1, "concurrent reserves must run in batches")
}

func TestReserveConcurrentPerParentLimitIsExact(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.plan("small", limits{"documents/parent": 5, "documents": 1000})
	e.account("a", "small")

	granted := e.reserveConcurrently(64,
		func(int) []*meteringv1.UsageItem { return []*meteringv1.UsageItem{item(documents, 1, "task-1")} },
		func(int) string { return "a" })

	assert.Equal(t, 5, granted)
	assert.EqualValues(t, 5, e.usage("a", documents, "task-1").GetReserved())
	assert.EqualValues(t, 5, e.usage("a", documents, "").GetReserved())
}

// Multi-item reservations in every item order, on several accounts at once,
// must neither deadlock nor pass a limit.
func TestReserveConcurrentMultiItemNeverDeadlocks(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.plan("small", limits{"agents": 7, "tasks": 9, "documents": 11, "documents/parent": 3, "messages": 13})
	accounts := []string{"a", "b", "c"}
	for _, a := range accounts {
		e.account(a, "small")
	}
	metrics := []meteringv1.Metric{agents, tasks, documents, messages}

	for round := range 3 {
		seed := uint64(round)
		rng := rand.New(rand.NewPCG(seed, seed))
		requests := make([][]*meteringv1.UsageItem, 64)
		for i := range requests {
			for _, j := range rng.Perm(len(metrics))[:1+rng.IntN(len(metrics))] {
				parent := ""
				if metrics[j] == documents {
					parent = fmt.Sprintf("task-%d", rng.IntN(3))
				}
				requests[i] = append(requests[i], item(metrics[j], 1, parent))
			}
		}
		e.reserveConcurrently(len(requests),
			func(i int) []*meteringv1.UsageItem { return requests[i] },
			func(i int) string { return accounts[i%len(accounts)] })
	}

	for _, a := range accounts {
		for m, max := range map[meteringv1.Metric]int64{agents: 7, tasks: 9, documents: 11, messages: 13} {
			assert.LessOrEqual(t, e.usage(a, m, "").GetReserved(), max, "account %s metric %s", a, m)
		}
		for p := range 3 {
			assert.LessOrEqual(t, e.usage(a, documents, fmt.Sprintf("task-%d", p)).GetReserved(), int64(3))
		}
	}
}

func TestReserveAllItemsOrNone(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.plan("small", limits{"agents": 1, "tasks": 5})
	e.account("a", "small")
	e.create("a", "agent-1", item(agents, 1, ""))

	_, err := e.reserve("a", item(tasks, 1, ""), item(agents, 1, ""))

	requireCode(t, err, codes.ResourceExhausted)
	assert.EqualValues(t, 0, e.usage("a", tasks, "").GetReserved(), "the task item must not be held")
	assert.Equal(t, 1, e.count("reservations"))
}

func TestCommitLowerAmountFreesTheRest(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.plan("small", limits{"storage_bytes": 100})
	e.account("a", "small")
	r := e.mustReserve("a", "upload-1", item(storage, 80, ""))

	res, err := e.client.Commit(e.ctx, &meteringv1.CommitRequest{
		AccountId: "a", ReservationId: r.GetId(), ActualItems: []*meteringv1.UsageItem{item(storage, 30, "")},
	})

	require.NoError(t, err)
	assert.Equal(t, meteringv1.ReservationState_RESERVATION_STATE_COMMITTED, res.GetReservation().GetState())
	assert.EqualValues(t, 30, res.GetReservation().GetCommittedItems()[0].GetAmount())
	u := e.usage("a", storage, "")
	assert.EqualValues(t, 30, u.GetUsed())
	assert.EqualValues(t, 0, u.GetReserved())
	assert.EqualValues(t, 70, u.GetRemaining())
}

func TestCommitAboveReservedIsInvalid(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	r := e.mustReserve("a", "upload-1", item(storage, 10, ""))

	_, err := e.client.Commit(e.ctx, &meteringv1.CommitRequest{
		AccountId: "a", ReservationId: r.GetId(), ActualItems: []*meteringv1.UsageItem{item(storage, 11, "")},
	})

	st := requireCode(t, err, codes.InvalidArgument)
	assert.Equal(t, []string{"actual_items[0].amount"}, badFields(t, st))
	assert.EqualValues(t, 0, e.usage("a", storage, "").GetUsed())
	assert.EqualValues(t, 10, e.usage("a", storage, "").GetReserved(), "the reservation stays pending")
}

func TestTrackOnlyGrantsAndReportsWouldExceed(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.plan("small", limits{"tasks": 1})
	e.accountWith(&meteringv1.SetAccountPlanRequest{
		AccountId: "a", PlanId: "small", EnforcementMode: meteringv1.EnforcementMode_ENFORCEMENT_MODE_TRACK_ONLY,
	})
	e.create("a", "", item(tasks, 1, ""))

	res, err := e.reserve("a", item(tasks, 2, ""))

	require.NoError(t, err)
	require.Len(t, res.GetWouldExceed(), 1)
	v := res.GetWouldExceed()[0]
	assert.Equal(t, tasks, v.GetMetric())
	assert.EqualValues(t, 1, v.GetLimit())
	assert.EqualValues(t, 1, v.GetUsed())
	assert.EqualValues(t, 2, v.GetRequested())
	_, err = e.commit("a", res.GetReservation().GetId())
	require.NoError(t, err)
	assert.EqualValues(t, 3, e.usage("a", tasks, "").GetUsed())

	usage, err := e.client.GetCurrentUsage(e.ctx, &meteringv1.GetCurrentUsageRequest{AccountId: "a"})
	require.NoError(t, err)
	assert.Equal(t, meteringv1.EnforcementMode_ENFORCEMENT_MODE_TRACK_ONLY, usage.GetEnforcementMode())
}
