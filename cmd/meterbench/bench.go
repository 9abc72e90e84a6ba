package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	"github.com/metering/metering/internal/metering"
)

const (
	// setupRPCTimeout bounds each RPC that creates plans and accounts.
	setupRPCTimeout = 30 * time.Second

	// accountSetupTimeout bounds creating all accounts.
	accountSetupTimeout = 10 * time.Minute

	// healthPollInterval is the pause between two health Checks while the
	// server starts.
	healthPollInterval = 100 * time.Millisecond
)

// errChecksFailed is returned when the run finished but a check failed.
var errChecksFailed = errors.New("a check failed: see the checks table")

// bench is one benchmark run.
type bench struct {
	cfg    Config
	logger *slog.Logger
	out    io.Writer
	errOut io.Writer

	client   *loadClient
	server   *serverProcess
	checker  checker
	accounts []string
	// runID makes the idempotency keys of this run unique.
	runID string
	// seed seeds the workers' random sources.
	seed uint64

	// acknowledged and unknown add up the writes of every cell per
	// scenarioID.cumulativeKey, for checkTotals.
	acknowledged map[string]int64
	unknown      map[string]int64
}

// runBench runs the benchmark that cfg describes and prints the report to
// out, and the end of the server log to errOut when the run fails. It
// returns errChecksFailed when the run finished but a check failed.
func runBench(ctx context.Context, cfg Config, logger *slog.Logger, out, errOut io.Writer) (err error) {
	b := &bench{
		cfg:          cfg,
		logger:       logger,
		out:          out,
		errOut:       errOut,
		acknowledged: map[string]int64{},
		unknown:      map[string]int64{},
	}
	if b.runID, b.seed, err = newRunID(); err != nil {
		return err
	}

	db, err := createDatabase(ctx, logger)
	if db.name != "" {
		defer func() {
			if cfg.KeepDatabase {
				logger.InfoContext(ctx, "kept benchmark database", "database", db.name)
				return
			}
			if dropErr := db.drop(ctx); dropErr != nil {
				err = errors.Join(err, dropErr)
				return
			}
			logger.InfoContext(ctx, "dropped benchmark database", "database", db.name)
		}()
	}
	if err != nil {
		return err
	}

	pool, err := pgxpool.New(ctx, db.url)
	if err != nil {
		return fmt.Errorf("connect to the benchmark database: %w", err)
	}
	defer pool.Close()

	settings, err := readSettings(ctx, pool)
	if err != nil {
		return err
	}
	service := metering.New(metering.Config{Pool: pool, Logger: logger})
	b.checker = checker{pool: pool, service: service}
	tokens, err := issueTokens(ctx, service)
	if err != nil {
		return err
	}

	// The deferred stop also covers a server process that started but
	// never reported SERVING.
	defer func() { err = errors.Join(err, b.stopServer(err != nil)) }()
	if err := b.startServer(ctx, db.url, tokens); err != nil {
		return err
	}

	if err := b.setUp(ctx); err != nil {
		return err
	}

	rep := report{Machine: readMachine(), Database: settings, Config: cfg}
	printHeader(out, rep)

	cells, err := b.runCells(ctx)
	rep.Cells = cells
	printTables(out, cfg, cells)
	if err != nil {
		return err
	}

	passed := printChecks(out, cells)
	if cfg.JSONPath != "" {
		if err := writeJSON(cfg.JSONPath, rep); err != nil {
			return err
		}
	}
	if !passed {
		return errChecksFailed
	}

	return nil
}

// newRunID returns a random run id and seed.
func newRunID() (string, uint64, error) {
	var buf [8]byte
	if _, err := rand.Read(buf[:]); err != nil {
		return "", 0, fmt.Errorf("generate run id: %w", err)
	}

	return hex.EncodeToString(buf[:4]), binary.LittleEndian.Uint64(buf[:]), nil
}

// startServer starts the server process and a client, and waits until the
// server reports SERVING.
func (b *bench) startServer(ctx context.Context, databaseURL string, tokens serviceTokens) error {
	serverURL, err := serverDatabaseURL(databaseURL, b.cfg.PoolMaxConns)
	if err != nil {
		return err
	}

	b.server, err = startServerProcess(ctx, serverURL, b.cfg.ServerLogLevel)
	if err != nil {
		return err
	}
	b.logger.InfoContext(ctx, "started server process", "grpc_addr", b.server.addr, "log", b.server.logPath)

	b.client, err = dialClient(b.server.addr, tokens)
	if err != nil {
		return err
	}

	return b.waitServing(ctx)
}

// waitServing polls the health Check until it returns SERVING, the server
// process exits or serverStartTimeout passes.
func (b *bench) waitServing(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, serverStartTimeout)
	defer cancel()

	var lastErr error
	for {
		resp, err := b.client.health.Check(ctx, &healthpb.HealthCheckRequest{})
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
		lastErr = err
		if err == nil {
			lastErr = fmt.Errorf("health status %s", resp.GetStatus())
		}

		select {
		case <-b.server.exited:
			return fmt.Errorf("the server process exited before serving (%v); its log is in %s", b.server.waitErr, b.server.logPath)
		case <-ctx.Done():
			return fmt.Errorf("the server did not report SERVING within %s: %w; its log is in %s", serverStartTimeout, lastErr, b.server.logPath)
		case <-time.After(healthPollInterval):
		}
	}
}

// stopServer closes the client and stops the server process. After a
// failed run it prints the end of the server log and keeps the file;
// otherwise it removes the file.
func (b *bench) stopServer(failed bool) error {
	var errs []error
	if b.client != nil {
		if err := b.client.conn.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close gRPC client: %w", err))
		}
	}
	if b.server == nil {
		return errors.Join(errs...)
	}

	if err := b.server.stop(); err != nil {
		errs = append(errs, err)
	}
	if failed || len(errs) > 0 {
		b.logger.Error("the run failed; the end of the server log follows", "log", b.server.logPath)
		fmt.Fprintln(b.errOut, b.server.logTail(serverLogTailLines))
		return errors.Join(errs...)
	}
	if err := b.server.removeLog(); err != nil {
		errs = append(errs, fmt.Errorf("remove the server log: %w", err))
	}

	return errors.Join(errs...)
}

// setUp creates the plans, the spread accounts and the hot account through
// the admin API.
func (b *bench) setUp(ctx context.Context) error {
	adminCtx := b.client.adminContext(ctx)

	if err := b.upsertPlan(adminCtx, benchPlan, unreachedLimit); err != nil {
		return err
	}
	if err := b.upsertPlan(adminCtx, limitedPlan, b.cfg.HotLimit); err != nil {
		return err
	}

	b.accounts = spreadAccountIDs(b.cfg.Accounts)
	start := time.Now()
	if err := b.createAccounts(adminCtx, append([]string{hotAccountID}, b.accounts...), benchPlan); err != nil {
		return err
	}
	b.logger.InfoContext(ctx, "created accounts", "accounts", len(b.accounts)+1, "elapsed", time.Since(start).Round(time.Millisecond))

	return nil
}

// upsertPlan creates plan id with every limit at unreachedLimit except the
// account's tasks limit, which is tasksLimit.
func (b *bench) upsertPlan(ctx context.Context, id string, tasksLimit int64) error {
	plan := &meteringv1.Plan{Id: id, DisplayName: id}
	for _, info := range metering.Catalog {
		metric := meteringv1.Metric(meteringv1.Metric_value["METRIC_"+strings.ToUpper(string(info.Metric))])
		accountMax := unreachedLimit
		if metric == meteringv1.Metric_METRIC_TASKS {
			accountMax = tasksLimit
		}
		plan.Limits = append(plan.Limits, &meteringv1.Limit{
			Metric: metric,
			Scope:  meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT,
			Bound:  &meteringv1.Limit_Max{Max: accountMax},
		})
		if info.ParentKind != "" {
			plan.Limits = append(plan.Limits, &meteringv1.Limit{
				Metric: metric,
				Scope:  meteringv1.LimitScope_LIMIT_SCOPE_PARENT,
				Bound:  &meteringv1.Limit_Max{Max: unreachedLimit},
			})
		}
	}

	ctx, cancel := context.WithTimeout(ctx, setupRPCTimeout)
	defer cancel()
	if _, err := b.client.admin.UpsertPlan(ctx, &meteringv1.UpsertPlanRequest{Plan: plan}); err != nil {
		return fmt.Errorf("upsert plan %q: %w", id, err)
	}

	return nil
}

// createAccounts puts every account in ids on plan with SetAccountPlan
// calls, SetupConcurrency at a time. ctx carries the admin token.
func (b *bench) createAccounts(ctx context.Context, ids []string, plan string) error {
	ctx, cancel := context.WithTimeout(ctx, accountSetupTimeout)
	defer cancel()

	g, ctx := errgroup.WithContext(ctx)
	g.SetLimit(b.cfg.SetupConcurrency)
	for _, id := range ids {
		g.Go(func() error {
			callCtx, cancel := context.WithTimeout(ctx, setupRPCTimeout)
			defer cancel()

			_, err := b.client.admin.SetAccountPlan(callCtx, &meteringv1.SetAccountPlanRequest{AccountId: id, PlanId: plan})
			if err != nil {
				return fmt.Errorf("set account %q plan %q: %w", id, plan, err)
			}
			return nil
		})
	}

	return g.Wait()
}

// runCells runs the floor and every scenario at each concurrency, the
// floor first, so that each ratio compares cells measured minutes apart at
// most. It returns the cells finished so far with the first error.
func (b *bench) runCells(ctx context.Context) ([]cellResult, error) {
	var cells []cellResult
	for _, concurrency := range b.cfg.Concurrencies {
		var floor float64
		for _, id := range append([]scenarioID{scenarioFloor}, b.cfg.Scenarios...) {
			cell, err := b.runCell(ctx, id, concurrency)
			if err != nil {
				return cells, fmt.Errorf("scenario %s at concurrency %d: %w", id, concurrency, err)
			}
			if id == scenarioFloor {
				floor = cell.All.RPCsPerSecond
			}
			if floor > 0 {
				cell.RatioToFloor = cell.All.RPCsPerSecond / floor
			}
			cells = append(cells, cell)

			b.logger.InfoContext(ctx, "cell finished", "scenario", id, "concurrency", concurrency,
				"rpcs_per_second", int64(cell.All.RPCsPerSecond), "ratio_to_floor", fmt.Sprintf("%.2f", cell.RatioToFloor),
				"p50", cell.All.P50, "p99", cell.All.P99)
		}
	}

	return cells, nil
}

// cellResult is the outcome of one scenario at one concurrency.
type cellResult struct {
	Scenario    scenarioID `json:"scenario"`
	Concurrency int        `json:"concurrency"`
	// Window is the measured time.
	Window time.Duration `json:"window_ns"`
	// All covers every RPC of the cell; Methods has one entry per RPC when
	// the scenario calls more than one.
	All          rpcStats   `json:"all"`
	Methods      []rpcStats `json:"methods,omitempty"`
	RatioToFloor float64    `json:"ratio_to_floor"`
	// CPU is the CPU used during the window.
	CPU      cpuUsage      `json:"cpu"`
	Granted  int64         `json:"granted"`
	Rejected int64         `json:"rejected"`
	Checks   []checkResult `json:"checks"`
}

// runCell runs scenario id at concurrency: a warm-up, then the measured
// window, then the checks.
func (b *bench) runCell(ctx context.Context, id scenarioID, concurrency int) (cellResult, error) {
	plan := &cellPlan{
		scenario:    id,
		concurrency: concurrency,
		accounts:    b.accounts,
		rpcTimeout:  b.cfg.RPCTimeout,
		maxSamples:  max(1, maxSamplesPerCell/concurrency),
	}
	if b.cfg.IdempotencyKeys {
		plan.keyPrefix = fmt.Sprintf("%s-%s-c%d-", b.runID, id, concurrency)
	}
	switch id {
	case scenarioHot:
		plan.account = hotAccountID
	case scenarioAtLimit:
		plan.account = limitedAccountID(concurrency)
		plan.expectRejections = true
		if err := b.createAccounts(b.client.adminContext(ctx), []string{plan.account}, limitedPlan); err != nil {
			return cellResult{}, err
		}
	}

	workers, usage, err := b.runWorkers(ctx, plan)
	if err != nil {
		return cellResult{}, err
	}

	cell := summariseCell(plan, workers, b.cfg.Duration)
	cell.CPU = usage
	cell.Checks = b.runChecks(ctx, plan, workers, cell)

	return cell, nil
}

// runWorkers runs the workers of one cell. During the window it measures
// the CPU used and, when asked, profiles the server.
func (b *bench) runWorkers(ctx context.Context, plan *cellPlan) ([]*worker, cpuUsage, error) {
	start := time.Now()
	plan.windowStart = start.Add(b.cfg.Warmup)
	plan.windowEnd = plan.windowStart.Add(b.cfg.Duration)

	usageCtx := b.client.usageContext(ctx)
	workers := make([]*worker, plan.concurrency)
	for i := range workers {
		workers[i] = newWorker(usageCtx, b.client, plan, i, b.seed)
	}

	var wg sync.WaitGroup
	for _, w := range workers {
		wg.Go(w.run)
	}

	var (
		usage           cpuUsage
		profilesStarted bool
		profileErr      error
	)
	monitor := make(chan struct{})
	go func() {
		defer close(monitor)
		if !sleepUntil(ctx, plan.windowStart) {
			return
		}
		if b.cfg.CPUProfile != "" || b.cfg.MemProfile != "" {
			profileErr = b.startProfiles(ctx, plan)
			profilesStarted = profileErr == nil
		}
		first := takeCPUSnapshot(b.server.cmd.Process.Pid, b.checker.backendPIDs(ctx))
		if !sleepUntil(ctx, plan.windowEnd) {
			return
		}
		usage = takeCPUSnapshot(b.server.cmd.Process.Pid, b.checker.backendPIDs(ctx)).usageSince(first)
	}()

	wg.Wait()
	<-monitor
	if profilesStarted {
		profileErr = b.server.stopProfiles(ctx)
	}

	if err := ctx.Err(); err != nil {
		return nil, cpuUsage{}, err
	}
	if profileErr != nil {
		return nil, cpuUsage{}, profileErr
	}
	for _, w := range workers {
		if w.rec.full {
			return nil, cpuUsage{}, fmt.Errorf("more than %d RPCs in one cell: shorten -duration", maxSamplesPerCell)
		}
	}

	return workers, usage, nil
}

// sleepUntil waits until t and reports false when ctx ends first.
func sleepUntil(ctx context.Context, t time.Time) bool {
	timer := time.NewTimer(time.Until(t))
	defer timer.Stop()

	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// startProfiles starts the server's profiles of the cell.
func (b *bench) startProfiles(ctx context.Context, plan *cellPlan) error {
	cpuPath, memPath := profilePath(b.cfg.CPUProfile, plan.scenario, plan.concurrency), profilePath(b.cfg.MemProfile, plan.scenario, plan.concurrency)
	// The server process resolves relative paths in the same working
	// directory, but absolute ones make the log lines unambiguous.
	for _, p := range []*string{&cpuPath, &memPath} {
		if *p == "" {
			continue
		}
		abs, err := filepath.Abs(*p)
		if err != nil {
			return fmt.Errorf("resolve profile path %s: %w", *p, err)
		}
		*p = abs
	}

	return b.server.startProfiles(ctx, cpuPath, memPath)
}

// summariseCell merges the workers' recorders into the cell's statistics.
func summariseCell(plan *cellPlan, workers []*worker, window time.Duration) cellResult {
	cell := cellResult{Scenario: plan.scenario, Concurrency: plan.concurrency, Window: window}

	methods := plan.scenario.methods()
	var all []time.Duration
	var allErrors map[codes.Code]int64
	for _, m := range methods {
		var samples []time.Duration
		var errs map[codes.Code]int64
		for _, w := range workers {
			samples = append(samples, w.rec.samples[m]...)
			errs = mergeErrors(errs, w.rec.errors[m])
		}
		all = append(all, samples...)
		allErrors = mergeErrors(allErrors, errs)
		if len(methods) > 1 {
			cell.Methods = append(cell.Methods, summarise(m.String(), samples, errs, window))
		}
	}
	name := methods[0].String()
	if len(methods) > 1 {
		name = "all"
	}
	cell.All = summarise(name, all, allErrors, window)

	for _, w := range workers {
		cell.Granted += w.rec.granted
		cell.Rejected += w.rec.rejected
	}

	return cell
}

// runChecks runs the checks that apply to the cell.
func (b *bench) runChecks(ctx context.Context, plan *cellPlan, workers []*worker, cell cellResult) []checkResult {
	unexpected := map[string]int64{}
	var acknowledged, unknown int64
	for _, w := range workers {
		for key, n := range w.rec.unexpectedCodes {
			unexpected[key] += n
		}
		acknowledged += w.rec.acknowledged
		unknown += w.rec.unknownWrites
	}

	checks := []checkResult{checkUnexpected(unexpected)}
	if plan.scenario == scenarioFloor {
		return checks
	}

	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()

	checks = append(checks, b.checker.checkLimits(ctx), b.checker.checkLedger(ctx))
	if written, ok := plan.scenario.writes(plan.concurrency); ok {
		key := plan.scenario.cumulativeKey(plan.concurrency)
		b.acknowledged[key] += acknowledged
		b.unknown[key] += unknown
		checks = append(checks, b.checker.checkTotals(ctx, written, b.acknowledged[key], b.unknown[key]))
	}
	if plan.scenario == scenarioAtLimit {
		checks = append(checks, checkGrants(b.cfg.HotLimit, cell.Granted, cell.Rejected, len(unexpected) > 0))
	}

	return checks
}
