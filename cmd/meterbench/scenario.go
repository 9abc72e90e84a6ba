package main

import (
	"fmt"
	"strings"
)

// scenarioID names a scenario by the letter the benchmark's documentation
// uses, or "floor".
type scenarioID string

// The scenarios. The floor is the cheapest RPC the server has, the gRPC
// health Check, so its throughput is what the server, the client and gRPC
// cost without Metering's work.
const (
	scenarioFloor   scenarioID = "floor"
	scenarioSpread  scenarioID = "a"
	scenarioHot     scenarioID = "b"
	scenarioAtLimit scenarioID = "c"
	scenarioRecord  scenarioID = "d"
	scenarioRead    scenarioID = "e"
)

// scenarioTitles describes each scenario; %d stands for the number of
// accounts where the scenario draws from them.
var scenarioTitles = map[scenarioID]string{
	scenarioFloor:   "floor: gRPC health Check on the same server, client and concurrency",
	scenarioSpread:  "(a) CheckAndReserve then Commit, accounts drawn uniformly from %d",
	scenarioHot:     "(b) CheckAndReserve then Commit on one hot account whose limit is never reached",
	scenarioAtLimit: "(c) CheckAndReserve on one hot account at its limit of %d tasks, Commit when granted",
	scenarioRecord:  "(d) RecordUsage, accounts drawn uniformly from %d",
	scenarioRead:    "(e) GetCurrentUsage, accounts drawn uniformly from %d",
}

// title returns the description of id for a run with cfg.
func (id scenarioID) title(cfg Config) string {
	t := scenarioTitles[id]
	switch id {
	case scenarioAtLimit:
		return fmt.Sprintf(t, cfg.HotLimit)
	case scenarioSpread, scenarioRecord, scenarioRead:
		return fmt.Sprintf(t, cfg.Accounts)
	}

	return t
}

// method is an RPC that the benchmark calls.
type method int

const (
	methodCheck method = iota
	methodReserve
	methodCommit
	methodRecord
	methodGetUsage
	numMethods
)

// methodNames are the RPC names, without their service.
var methodNames = [numMethods]string{"Check", "CheckAndReserve", "Commit", "RecordUsage", "GetCurrentUsage"}

func (m method) String() string { return methodNames[m] }

// methods returns the RPCs that id calls, in the order they are printed.
func (id scenarioID) methods() []method {
	switch id {
	case scenarioFloor:
		return []method{methodCheck}
	case scenarioSpread, scenarioHot, scenarioAtLimit:
		return []method{methodReserve, methodCommit}
	case scenarioRecord:
		return []method{methodRecord}
	case scenarioRead:
		return []method{methodGetUsage}
	}

	return nil
}

// Account ids. Their prefixes differ, so that a check can sum the counters
// of one group with starts_with.
const (
	spreadAccountPrefix  = "bench-acct-"
	hotAccountID         = "bench-hot"
	limitedAccountPrefix = "bench-limited-"
)

// Plan ids.
const (
	// benchPlan limits every metric far above what a run can use, so that
	// the limits are checked on every call but never reached.
	benchPlan = "meterbench"
	// limitedPlan limits tasks to Config.HotLimit, for scenario (c).
	limitedPlan = "meterbench-limited"
	// unreachedLimit is every limit of benchPlan: a trillion, which at a
	// million calls per second takes eleven days to reach.
	unreachedLimit int64 = 1_000_000_000_000
)

// spreadAccountIDs returns the ids of the n accounts that scenarios (a),
// (d) and (e) draw from.
func spreadAccountIDs(n int) []string {
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("%s%07d", spreadAccountPrefix, i)
	}

	return ids
}

// limitedAccountID returns the account of the cell of scenario (c) at
// concurrency.
func limitedAccountID(concurrency int) string {
	return fmt.Sprintf("%sc%d", limitedAccountPrefix, concurrency)
}

// writtenCounter names the counters a scenario increments, for the check
// that they equal the calls the client saw acknowledged: the metric, and
// the account id or the prefix of the account ids.
type writtenCounter struct {
	metric string
	// accountPrefix matches the account ids with starts_with.
	accountPrefix string
}

// writes returns the counters that scenario id increments in the cell at
// concurrency, and false when it writes none.
func (id scenarioID) writes(concurrency int) (writtenCounter, bool) {
	switch id {
	case scenarioSpread:
		return writtenCounter{metric: "tasks", accountPrefix: spreadAccountPrefix}, true
	case scenarioHot:
		return writtenCounter{metric: "tasks", accountPrefix: hotAccountID}, true
	case scenarioAtLimit:
		return writtenCounter{metric: "tasks", accountPrefix: limitedAccountID(concurrency)}, true
	case scenarioRecord:
		return writtenCounter{metric: "messages", accountPrefix: spreadAccountPrefix}, true
	}

	return writtenCounter{}, false
}

// cumulativeKey returns the key under which the client's acknowledged
// writes add up across cells: scenarios that write the same counters in
// every cell share one sum, and each cell of (c) has an account of its own.
func (id scenarioID) cumulativeKey(concurrency int) string {
	w, _ := id.writes(concurrency)
	return strings.Join([]string{w.metric, w.accountPrefix}, "/")
}
