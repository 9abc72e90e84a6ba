package meteringapi_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/timestamppb"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
)

// expectedPeriodStart is the start of period k for an anchor, computed
// independently of the service: the anchor's day, clamped to the month's
// last day, k calendar months later, in UTC.
func expectedPeriodStart(anchor time.Time, k int) time.Time {
	first := time.Date(anchor.Year(), anchor.Month()+time.Month(k), 1, anchor.Hour(), anchor.Minute(), anchor.Second(), anchor.Nanosecond(), time.UTC)
	lastDay := first.AddDate(0, 1, -1).Day()
	return first.AddDate(0, 0, min(anchor.Day(), lastDay)-1)
}

func TestPeriodsFollowAnchorWithoutDrift(t *testing.T) {
	t.Parallel()
	anchors := []time.Time{
		time.Date(2024, time.January, 31, 0, 0, 0, 0, time.UTC),
		time.Date(2024, time.February, 29, 0, 0, 0, 0, time.UTC),
		time.Date(2025, time.March, 30, 23, 30, 0, 0, time.UTC),
	}
	for _, anchor := range anchors {
		t.Run(anchor.Format(time.DateOnly), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			e.accountWith(&meteringv1.SetAccountPlanRequest{AccountId: "a", PlanId: "free", BillingAnchor: timestamppb.New(anchor)})

			var previousEnd time.Time
			for k := range 24 {
				start, end := expectedPeriodStart(anchor, k), expectedPeriodStart(anchor, k+1)
				for _, at := range []time.Time{start, start.Add(time.Hour), end.Add(-time.Microsecond)} {
					e.clock.Set(at)
					res, err := e.client.GetCurrentUsage(e.ctx, &meteringv1.GetCurrentUsageRequest{AccountId: "a"})
					require.NoError(t, err)
					assert.Equal(t, start, res.GetPeriodStart().AsTime(), "period %d start at %s", k, at)
					assert.Equal(t, end, res.GetPeriodEnd().AsTime(), "period %d end at %s", k, at)
				}
				if k > 0 {
					assert.Equal(t, previousEnd, start, "period %d must start where the previous ended", k)
				}
				previousEnd = end
			}
		})
	}
}

func TestPeriodsAnchorOn31stClampsEachMonth(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	anchor := time.Date(2024, time.January, 31, 0, 0, 0, 0, time.UTC)
	e.accountWith(&meteringv1.SetAccountPlanRequest{AccountId: "a", PlanId: "free", BillingAnchor: timestamppb.New(anchor)})
	want := []string{"2024-01-31", "2024-02-29", "2024-03-31", "2024-04-30", "2024-05-31", "2024-06-30", "2025-01-31", "2025-02-28", "2025-03-31"}

	var got []string
	for _, k := range []int{0, 1, 2, 3, 4, 5, 12, 13, 14} {
		e.clock.Set(expectedPeriodStart(anchor, k).Add(time.Minute))
		res, err := e.admin.GetAccount(e.ctx, &meteringv1.GetAccountRequest{AccountId: "a"})
		require.NoError(t, err)
		got = append(got, res.GetPeriodStart().AsTime().Format(time.DateOnly))
	}

	assert.Equal(t, want, got)
}

func TestPeriodCounterResetsAndRunningTotalCarriesOver(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	e.create("a", "", item(tasks, 1, ""))
	e.create("a", "agent-1", item(agents, 1, ""))
	e.create("a", "doc-1", item(documents, 1, "task-1"))

	e.clock.Set(time.Date(2026, time.April, 1, 0, 0, 0, 0, time.UTC))

	assert.EqualValues(t, 0, e.usage("a", tasks, "").GetUsed(), "tasks reset in the new period")
	assert.EqualValues(t, 0, e.usage("a", documents, "").GetUsed(), "account documents reset in the new period")
	assert.EqualValues(t, 1, e.usage("a", documents, "task-1").GetUsed(), "documents per task carry over")
	assert.EqualValues(t, 1, e.usage("a", agents, "").GetUsed(), "agents carry over")
}

func TestPeriodLimitRejectsUntilNextPeriod(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.plan("small", limits{"tasks": 2})
	e.account("a", "small")
	e.create("a", "", item(tasks, 2, ""))

	_, err := e.reserve("a", item(tasks, 1, ""))
	requireCode(t, err, codes.ResourceExhausted)

	e.clock.Set(time.Date(2026, time.April, 1, 0, 0, 0, 0, time.UTC))
	_, err = e.reserve("a", item(tasks, 1, ""))
	require.NoError(t, err)
}

// A reservation made before a period ends and committed after counts in the
// period of the commit.
func TestCommitAcrossPeriodEndCountsInNewPeriod(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.account("a", "free")
	e.clock.Set(time.Date(2026, time.March, 31, 23, 59, 0, 0, time.UTC))
	r := e.mustReserve("a", "", item(tasks, 1, ""))

	e.clock.Set(time.Date(2026, time.April, 1, 0, 0, 30, 0, time.UTC))
	_, err := e.commit("a", r.GetId())

	require.NoError(t, err)
	assert.EqualValues(t, 1, e.usage("a", tasks, "").GetUsed())
	e.clock.Set(time.Date(2026, time.March, 31, 23, 59, 59, 0, time.UTC))
	assert.EqualValues(t, 0, e.usage("a", tasks, "").GetUsed(), "the old period holds nothing")
}

func TestPeriodsIgnoreSessionTimeZone(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	anchor := time.Date(2024, time.January, 31, 0, 0, 0, 0, time.UTC)
	e.accountWith(&meteringv1.SetAccountPlanRequest{AccountId: "a", PlanId: "free", BillingAnchor: timestamppb.New(anchor)})
	e.clock.Set(time.Date(2024, time.February, 29, 0, 30, 0, 0, time.UTC))

	for _, zone := range []string{"UTC", "America/St_Johns", "Pacific/Kiritimati", "Pacific/Pago_Pago"} {
		_, err := e.pool.Exec(e.ctx, fmt.Sprintf("ALTER DATABASE %q SET timezone TO %q", e.pool.Config().ConnConfig.Database, zone))
		require.NoError(t, err)
		e.pool.Reset()

		res, err := e.client.GetCurrentUsage(e.ctx, &meteringv1.GetCurrentUsageRequest{AccountId: "a"})
		require.NoError(t, err)
		assert.Equal(t, time.Date(2024, time.February, 29, 0, 0, 0, 0, time.UTC), res.GetPeriodStart().AsTime(), "zone %s", zone)
		assert.Equal(t, time.Date(2024, time.March, 31, 0, 0, 0, 0, time.UTC), res.GetPeriodEnd().AsTime(), "zone %s", zone)
	}
}
