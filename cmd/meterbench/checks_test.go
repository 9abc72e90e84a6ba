package main

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/metering/metering/internal/metering"
	"github.com/metering/metering/internal/pgtest"
)

// newTestChecker returns a checker on a fresh database with account acme
// on the seeded free plan, whose messages limit is 1,000 per period.
func newTestChecker(t *testing.T) (checker, *metering.Service) {
	t.Helper()
	pool := pgtest.NewPool(t)
	service := metering.New(metering.Config{Pool: pool})
	_, _, err := service.SetAccountPlan(context.Background(), metering.SetAccountRequest{AccountID: "acme", PlanID: "free"})
	require.NoError(t, err)

	return checker{pool: pool, service: service}, service
}

func recordMessages(t *testing.T, service *metering.Service, amount int64) {
	t.Helper()
	_, err := service.RecordUsage(context.Background(), metering.RecordRequest{
		AccountID: "acme",
		Items:     []metering.Item{{Metric: metering.Messages, Amount: amount}},
		Actor:     "test",
	})
	require.NoError(t, err)
}

func TestCheckLimitsPassesAtLimit(t *testing.T) {
	t.Parallel()
	c, service := newTestChecker(t)
	recordMessages(t, service, 1000)

	res := c.checkLimits(context.Background())

	assert.True(t, res.OK, res.Detail)
	assert.Equal(t, "1 counters checked", res.Detail)
}

func TestCheckLimitsFailsOverLimit(t *testing.T) {
	t.Parallel()
	c, service := newTestChecker(t)
	// RecordUsage is never rejected for quota, so it can pass the limit.
	recordMessages(t, service, 1001)

	res := c.checkLimits(context.Background())

	assert.False(t, res.OK)
	assert.Contains(t, res.Detail, "1 of 1 counters over their limit")
	assert.Contains(t, res.Detail, "acme messages used 1001 + reserved 0 > limit 1000")
}

func TestCheckLimitsCountsPendingReservations(t *testing.T) {
	t.Parallel()
	c, service := newTestChecker(t)
	recordMessages(t, service, 999)
	_, err := service.Reserve(context.Background(), metering.ReserveRequest{
		AccountID: "acme",
		Items:     []metering.Item{{Metric: metering.Messages, Amount: 1}},
		Actor:     "test",
	})
	require.NoError(t, err)
	_, err = c.pool.Exec(context.Background(), "UPDATE metering.counters SET used = used + 1 WHERE account_id = 'acme'")
	require.NoError(t, err)

	res := c.checkLimits(context.Background())

	assert.False(t, res.OK)
	assert.Contains(t, res.Detail, "acme messages used 1000 + reserved 1 > limit 1000")
}

func TestCheckLedgerFailsOnChangedCounter(t *testing.T) {
	t.Parallel()
	c, service := newTestChecker(t)
	recordMessages(t, service, 5)
	require.True(t, c.checkLedger(context.Background()).OK)

	_, err := c.pool.Exec(context.Background(), "UPDATE metering.counters SET used = used + 1 WHERE account_id = 'acme'")
	require.NoError(t, err)
	res := c.checkLedger(context.Background())

	assert.False(t, res.OK)
	assert.Contains(t, res.Detail, "acme messages")
	assert.Contains(t, res.Detail, "counter 6 ledger 5")
}

func TestCheckTotalsComparesWithClient(t *testing.T) {
	t.Parallel()
	c, service := newTestChecker(t)
	recordMessages(t, service, 7)
	written := writtenCounter{metric: "messages", accountPrefix: "ac"}

	tests := []struct {
		name                  string
		acknowledged, unknown int64
		wantOK                bool
	}{
		{"equal", 7, 0, true},
		{"server lost writes", 8, 0, false},
		{"server applied unacknowledged writes", 6, 0, false},
		{"unknown outcomes cover the difference", 6, 1, true},
		{"unknown outcomes too few", 5, 1, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := c.checkTotals(context.Background(), written, tt.acknowledged, tt.unknown)
			assert.Equal(t, tt.wantOK, res.OK, res.Detail)
			assert.Contains(t, res.Detail, "server 7")
		})
	}
}

func TestCheckGrants(t *testing.T) {
	tests := []struct {
		name                     string
		limit, granted, rejected int64
		unexpected               bool
		wantOK                   bool
		wantDetail               string
	}{
		{"exactly the limit", 10, 10, 90, false, true, "10 granted of limit 10, 90 rejected"},
		{"over the limit", 10, 11, 89, false, false, "over-admission"},
		{"under the limit while asked for more", 10, 9, 91, false, false, "under-admission"},
		{"under the limit after unexpected errors", 10, 9, 91, true, true, "9 granted"},
		{"asked for less than the limit", 10, 4, 0, false, true, "4 granted"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := checkGrants(tt.limit, tt.granted, tt.rejected, tt.unexpected)
			assert.Equal(t, tt.wantOK, res.OK, res.Detail)
			assert.Contains(t, res.Detail, tt.wantDetail)
		})
	}
}

func TestCheckUnexpectedListsCodes(t *testing.T) {
	assert.True(t, checkUnexpected(nil).OK)

	res := checkUnexpected(map[string]int64{"Commit DeadlineExceeded": 2, "CheckAndReserve Unavailable": 1})

	assert.False(t, res.OK)
	assert.Equal(t, "CheckAndReserve Unavailable: 1, Commit DeadlineExceeded: 2", res.Detail)
}
