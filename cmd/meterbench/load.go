package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	"github.com/metering/metering/internal/auth"
)

// maxSamplesPerCell bounds the latency samples kept in one cell, 128 MiB of
// durations. A cell that would exceed it fails with an error that suggests
// a shorter -duration, so that no run fills the memory.
const maxSamplesPerCell = 16 << 20

// errNotServing stands for a health Check that returned a status other than
// SERVING.
var errNotServing = status.Error(codes.Unavailable, "health status is not SERVING")

// loadClient is the one gRPC client of a run. The floor and every scenario
// use the same connection.
type loadClient struct {
	conn     *grpc.ClientConn
	metering meteringv1.MeteringServiceClient
	admin    meteringv1.MeteringAdminServiceClient
	health   healthpb.HealthClient
	tokens   serviceTokens
}

// dialClient returns a client of the server at addr, a 127.0.0.1 address.
// It connects lazily, on the first RPC.
func dialClient(addr string, tokens serviceTokens) (*loadClient, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("create gRPC client for %s: %w", addr, err)
	}

	return &loadClient{
		conn:     conn,
		metering: meteringv1.NewMeteringServiceClient(conn),
		admin:    meteringv1.NewMeteringAdminServiceClient(conn),
		health:   healthpb.NewHealthClient(conn),
		tokens:   tokens,
	}, nil
}

// usageContext returns ctx with the usage:write token in its outgoing
// metadata. Every load RPC, the health Check included, carries it, so the
// floor pays the same metadata cost as the scenarios.
func (c *loadClient) usageContext(ctx context.Context) context.Context {
	return metadata.NewOutgoingContext(ctx, metadata.Pairs(auth.MetadataServiceToken, c.tokens.usage))
}

// adminContext returns ctx with the admin token in its outgoing metadata.
func (c *loadClient) adminContext(ctx context.Context) context.Context {
	return metadata.NewOutgoingContext(ctx, metadata.Pairs(auth.MetadataServiceToken, c.tokens.admin))
}

// cellPlan is the parameters that the workers of one cell share. It is
// read-only while they run.
type cellPlan struct {
	scenario    scenarioID
	concurrency int
	// account is the hot account of scenarios (b) and (c).
	account string
	// accounts are the ids that (a), (d) and (e) draw from.
	accounts []string
	// expectRejections makes RESOURCE_EXHAUSTED on CheckAndReserve an
	// expected outcome, as in scenario (c).
	expectRejections bool
	// windowStart and windowEnd bound the measurement: an RPC that
	// completes in [windowStart, windowEnd) is counted and timed.
	windowStart time.Time
	windowEnd   time.Time
	rpcTimeout  time.Duration
	// keyPrefix makes the idempotency keys of the cell unique in the run.
	// Empty sends no keys.
	keyPrefix string
	// maxSamples bounds the samples of each worker.
	maxSamples int
}

// worker is one concurrent caller. Each worker owns its random source and
// recorder, so the hot loop shares nothing but the gRPC connection.
type worker struct {
	ctx    context.Context
	client *loadClient
	plan   *cellPlan
	rng    *rand.Rand
	id     int
	seq    int
	rec    recorder
}

// newWorker returns worker id of the cell. ctx carries the usage token.
func newWorker(ctx context.Context, client *loadClient, plan *cellPlan, id int, seed uint64) *worker {
	return &worker{
		ctx:    ctx,
		client: client,
		plan:   plan,
		rng:    rand.New(rand.NewPCG(seed, uint64(id))),
		id:     id,
		rec:    newRecorder(plan.windowStart, plan.windowEnd, plan.maxSamples),
	}
}

// run calls the scenario's RPCs until the window ends, ctx ends or the
// worker has maxSamples samples.
func (w *worker) run() {
	for !w.rec.full && w.ctx.Err() == nil && time.Now().Before(w.plan.windowEnd) {
		w.step()
	}
}

// step makes one call of the scenario: one RPC, or a reserve and a commit.
func (w *worker) step() {
	switch w.plan.scenario {
	case scenarioFloor:
		w.check()
	case scenarioSpread:
		w.reserveCommit(w.randomAccount())
	case scenarioHot, scenarioAtLimit:
		w.reserveCommit(w.plan.account)
	case scenarioRecord:
		w.record(w.randomAccount())
	case scenarioRead:
		w.getUsage(w.randomAccount())
	}
}

func (w *worker) randomAccount() string {
	return w.plan.accounts[w.rng.IntN(len(w.plan.accounts))]
}

// nextKey returns a new idempotency key, or "" when the cell sends none.
func (w *worker) nextKey() string {
	if w.plan.keyPrefix == "" {
		return ""
	}
	w.seq++

	return w.plan.keyPrefix + strconv.Itoa(w.id) + "-" + strconv.Itoa(w.seq)
}

func (w *worker) rpcContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(w.ctx, w.plan.rpcTimeout)
}

func (w *worker) check() {
	ctx, cancel := w.rpcContext()
	start := time.Now()
	resp, err := w.client.health.Check(ctx, &healthpb.HealthCheckRequest{})
	cancel()
	if err == nil && resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		err = errNotServing
	}

	if code := w.rec.observe(methodCheck, start, err); code != codes.OK {
		w.rec.unexpected(methodCheck, code)
	}
}

// reserveCommit reserves one task of account and commits it when granted.
func (w *worker) reserveCommit(account string) {
	ctx, cancel := w.rpcContext()
	start := time.Now()
	resp, err := w.client.metering.CheckAndReserve(ctx, &meteringv1.CheckAndReserveRequest{
		AccountId:      account,
		Items:          []*meteringv1.UsageItem{{Metric: meteringv1.Metric_METRIC_TASKS, Amount: 1}},
		IdempotencyKey: w.nextKey(),
	})
	cancel()

	code := w.rec.observe(methodReserve, start, err)
	switch {
	case code == codes.OK:
		w.rec.granted++
	case code == codes.ResourceExhausted && w.plan.expectRejections:
		w.rec.rejected++
		return
	default:
		w.rec.unexpected(methodReserve, code)
		return
	}

	ctx, cancel = w.rpcContext()
	start = time.Now()
	_, err = w.client.metering.Commit(ctx, &meteringv1.CommitRequest{
		AccountId:     account,
		ReservationId: resp.GetReservation().GetId(),
	})
	cancel()

	if code := w.rec.observe(methodCommit, start, err); code != codes.OK {
		w.rec.unexpected(methodCommit, code)
		w.rec.unknownWrites++
		return
	}
	w.rec.acknowledged++
}

// record records one message of account.
func (w *worker) record(account string) {
	ctx, cancel := w.rpcContext()
	start := time.Now()
	_, err := w.client.metering.RecordUsage(ctx, &meteringv1.RecordUsageRequest{
		AccountId:      account,
		Items:          []*meteringv1.UsageItem{{Metric: meteringv1.Metric_METRIC_MESSAGES, Amount: 1}},
		IdempotencyKey: w.nextKey(),
	})
	cancel()

	if code := w.rec.observe(methodRecord, start, err); code != codes.OK {
		w.rec.unexpected(methodRecord, code)
		w.rec.unknownWrites++
		return
	}
	w.rec.acknowledged++
}

func (w *worker) getUsage(account string) {
	ctx, cancel := w.rpcContext()
	start := time.Now()
	_, err := w.client.metering.GetCurrentUsage(ctx, &meteringv1.GetCurrentUsageRequest{AccountId: account})
	cancel()

	if code := w.rec.observe(methodGetUsage, start, err); code != codes.OK {
		w.rec.unexpected(methodGetUsage, code)
	}
}

// recorder collects the results of one worker in one cell.
type recorder struct {
	windowStart, windowEnd time.Time
	maxSamples             int
	count                  int
	full                   bool

	// samples and errors cover the RPCs that completed in the window.
	samples [numMethods][]time.Duration
	errors  [numMethods]map[codes.Code]int64

	// The rest covers every call of the cell, the warm-up included.
	granted  int64
	rejected int64
	// acknowledged counts commits and recorded usage that returned OK.
	acknowledged int64
	// unknownWrites counts commits and recorded usage that failed in a way
	// that leaves open whether the server applied them.
	unknownWrites   int64
	unexpectedCodes map[string]int64
}

func newRecorder(windowStart, windowEnd time.Time, maxSamples int) recorder {
	return recorder{windowStart: windowStart, windowEnd: windowEnd, maxSamples: maxSamples}
}

// observe records an RPC of m that started at start and ended now with
// err, and returns err's status code.
func (r *recorder) observe(m method, start time.Time, err error) codes.Code {
	end := time.Now()
	code := status.Code(err)
	if end.Before(r.windowStart) || !end.Before(r.windowEnd) {
		return code
	}

	r.samples[m] = append(r.samples[m], end.Sub(start))
	if code != codes.OK {
		if r.errors[m] == nil {
			r.errors[m] = map[codes.Code]int64{}
		}
		r.errors[m][code]++
	}
	r.count++
	if r.count >= r.maxSamples {
		r.full = true
	}

	return code
}

// unexpected counts a status code that the scenario does not expect.
func (r *recorder) unexpected(m method, code codes.Code) {
	if r.unexpectedCodes == nil {
		r.unexpectedCodes = map[string]int64{}
	}
	r.unexpectedCodes[m.String()+" "+code.String()]++
}
