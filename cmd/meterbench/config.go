package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"time"
)

// Defaults of the Config fields. The full benchmark of `make bench` uses
// them; `make bench-smoke` shortens the cells and lowers the account count.
const (
	defaultDuration         = 10 * time.Second
	defaultWarmup           = 2 * time.Second
	defaultConcurrencies    = "1,16,64"
	defaultScenarios        = "a,b,c,d,e"
	defaultAccounts         = 10_000
	defaultHotLimit         = 100
	defaultRPCTimeout       = 10 * time.Second
	defaultSetupConcurrency = 32
	defaultServerLogLevel   = "info"
)

// Bounds of the Config fields, so that a typo cannot start a run that does
// not end or that fills the memory.
const (
	maxDuration      = 10 * time.Minute
	maxConcurrency   = 1024
	maxAccounts      = 1_000_000
	maxSetupParallel = 256
	maxPoolConns     = 1000
)

// Config configures one benchmark run. Build it with defaultConfig or
// configFromFlags and check it with Validate.
type Config struct {
	// Duration is how long each cell (one scenario at one concurrency) is
	// measured, after its warm-up.
	Duration time.Duration `json:"duration_ns"`

	// Warmup is how long each cell runs before measuring starts. The calls
	// made during the warm-up count for the checks but not for the table.
	Warmup time.Duration `json:"warmup_ns"`

	// Concurrencies lists the numbers of concurrent callers, one cell each.
	Concurrencies []int `json:"concurrencies"`

	// Scenarios lists the scenarios to run, in order. The floor always runs.
	Scenarios []scenarioID `json:"scenarios"`

	// Accounts is the number of accounts that scenarios (a), (d) and (e)
	// draw from, uniformly.
	Accounts int `json:"accounts"`

	// HotLimit is the tasks limit of the account of scenario (c). Each cell
	// of (c) gets a fresh account, which reaches this limit early in its
	// warm-up.
	HotLimit int64 `json:"hot_limit"`

	// CPUProfile and MemProfile, when set, are the paths of the server's CPU
	// and allocation profiles. Each cell writes its own file, named after
	// the scenario and the concurrency (see profilePath).
	CPUProfile string `json:"cpuprofile,omitempty"`
	MemProfile string `json:"memprofile,omitempty"`

	// JSONPath, when set, is the file that receives the results as JSON.
	JSONPath string `json:"-"`

	// RPCTimeout is the deadline of each RPC.
	RPCTimeout time.Duration `json:"rpc_timeout_ns"`

	// SetupConcurrency is the number of concurrent SetAccountPlan calls that
	// create the accounts.
	SetupConcurrency int `json:"setup_concurrency"`

	// ServerLogLevel is the server's log level. The default, info, is the
	// server's own default, as in production: it logs failed calls only.
	ServerLogLevel string `json:"server_log_level"`

	// PoolMaxConns, when above zero, sets the server's pool_max_conns. Zero
	// keeps pgxpool's default, max(4, number of CPUs).
	PoolMaxConns int `json:"pool_max_conns"`

	// IdempotencyKeys makes CheckAndReserve and RecordUsage carry a unique
	// idempotency key, as callers that retry do.
	IdempotencyKeys bool `json:"idempotency_keys"`

	// KeepDatabase leaves the benchmark database in place at the end, for
	// inspection.
	KeepDatabase bool `json:"keep_database"`
}

// defaultConfig returns a Config with every default set.
func defaultConfig() Config {
	cfg := Config{
		Duration:         defaultDuration,
		Warmup:           defaultWarmup,
		Accounts:         defaultAccounts,
		HotLimit:         defaultHotLimit,
		RPCTimeout:       defaultRPCTimeout,
		SetupConcurrency: defaultSetupConcurrency,
		ServerLogLevel:   defaultServerLogLevel,
		IdempotencyKeys:  true,
	}
	cfg.Concurrencies, _ = parseConcurrencies(defaultConcurrencies)
	cfg.Scenarios, _ = parseScenarios(defaultScenarios)

	return cfg
}

// configFromFlags parses args into a Config. It returns flag.ErrHelp for -h
// and the parse errors of the list flags; it does not call Validate.
func configFromFlags(args []string, output io.Writer) (Config, error) {
	cfg := defaultConfig()
	fs := flag.NewFlagSet("meterbench", flag.ContinueOnError)
	fs.SetOutput(output)
	fs.Usage = func() {
		fmt.Fprint(output, usageText)
		fs.PrintDefaults()
	}

	concurrencies := fs.String("concurrency", defaultConcurrencies, "comma-separated numbers of concurrent callers, one cell each")
	scenarios := fs.String("scenarios", defaultScenarios, "comma-separated scenarios to run, from a, b, c, d, e (the floor always runs)")
	fs.DurationVar(&cfg.Duration, "duration", cfg.Duration, "measured time of each cell")
	fs.DurationVar(&cfg.Warmup, "warmup", cfg.Warmup, "time each cell runs before measuring starts")
	fs.IntVar(&cfg.Accounts, "accounts", cfg.Accounts, "number of accounts that scenarios a, d and e draw from uniformly")
	fs.Int64Var(&cfg.HotLimit, "hot-limit", cfg.HotLimit, "tasks limit of the account of scenario c")
	fs.StringVar(&cfg.CPUProfile, "cpuprofile", "", "write the server's CPU profile of each cell to this path, with -SCENARIO-cCONCURRENCY before the extension")
	fs.StringVar(&cfg.MemProfile, "memprofile", "", "write the server's allocation profile of each cell to this path, with -SCENARIO-cCONCURRENCY before the extension")
	fs.StringVar(&cfg.JSONPath, "json", "", "also write the results as JSON to this file")
	fs.DurationVar(&cfg.RPCTimeout, "rpc-timeout", cfg.RPCTimeout, "deadline of each RPC")
	fs.IntVar(&cfg.SetupConcurrency, "setup-concurrency", cfg.SetupConcurrency, "concurrent SetAccountPlan calls while creating the accounts")
	fs.StringVar(&cfg.ServerLogLevel, "server-log-level", cfg.ServerLogLevel, "log level of the server: debug, info, warn or error (info logs failed calls, debug every call)")
	fs.IntVar(&cfg.PoolMaxConns, "pool-max-conns", 0, "PostgreSQL connections of the server's pool; 0 keeps the pgxpool default, max(4, CPUs)")
	fs.BoolVar(&cfg.IdempotencyKeys, "idempotency-keys", cfg.IdempotencyKeys, "send a unique idempotency key with each CheckAndReserve and RecordUsage")
	fs.BoolVar(&cfg.KeepDatabase, "keep-database", false, "keep the benchmark database at the end instead of dropping it")

	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	if fs.NArg() > 0 {
		return Config{}, fmt.Errorf("unexpected arguments %q: meterbench takes only flags", fs.Args())
	}

	var errs []error
	var err error
	if cfg.Concurrencies, err = parseConcurrencies(*concurrencies); err != nil {
		errs = append(errs, fmt.Errorf("-concurrency %q: %w", *concurrencies, err))
	}
	if cfg.Scenarios, err = parseScenarios(*scenarios); err != nil {
		errs = append(errs, fmt.Errorf("-scenarios %q: %w", *scenarios, err))
	}

	return cfg, errors.Join(errs...)
}

const usageText = `Usage: meterbench [flags]

meterbench measures a Metering server under load. It finds or starts
PostgreSQL (DATABASE_URL wins when set), creates a throwaway database with
synchronous_commit on, starts the server on 127.0.0.1 in a child process,
creates plans, accounts and service tokens, and runs each scenario at each
concurrency, next to the floor (the gRPC health Check on the same server and
client). It prints RPCs per second, latency percentiles, errors by code and
the ratio to the floor, then checks that no limit was exceeded and that the
counters equal the ledger. It exits with status 1 when a check fails.

Scenarios:
  a  CheckAndReserve then Commit, accounts drawn uniformly from -accounts
  b  CheckAndReserve then Commit on one hot account whose limit is never reached
  c  CheckAndReserve (then Commit when granted) on one hot account at its limit
  d  RecordUsage, accounts drawn uniformly from -accounts
  e  GetCurrentUsage, accounts drawn uniformly from -accounts

Flags:
`

// Validate checks every field and returns one error per invalid field,
// joined with errors.Join. Each error names the flag and the rule.
func (c Config) Validate() error {
	var errs []error

	if c.Duration <= 0 || c.Duration > maxDuration {
		errs = append(errs, fmt.Errorf("-duration %s: must be above 0 and at most %s", c.Duration, maxDuration))
	}
	if c.Warmup < 0 || c.Warmup > maxDuration {
		errs = append(errs, fmt.Errorf("-warmup %s: must be between 0 and %s", c.Warmup, maxDuration))
	}
	if len(c.Concurrencies) == 0 {
		errs = append(errs, errors.New("-concurrency: must list at least one number"))
	}
	for _, n := range c.Concurrencies {
		if n < 1 || n > maxConcurrency {
			errs = append(errs, fmt.Errorf("-concurrency %d: must be between 1 and %d", n, maxConcurrency))
		}
	}
	if c.Accounts < 1 || c.Accounts > maxAccounts {
		errs = append(errs, fmt.Errorf("-accounts %d: must be between 1 and %d", c.Accounts, maxAccounts))
	}
	if c.HotLimit < 1 {
		errs = append(errs, fmt.Errorf("-hot-limit %d: must be at least 1", c.HotLimit))
	}
	if c.RPCTimeout <= 0 {
		errs = append(errs, fmt.Errorf("-rpc-timeout %s: must be above 0", c.RPCTimeout))
	}
	if c.SetupConcurrency < 1 || c.SetupConcurrency > maxSetupParallel {
		errs = append(errs, fmt.Errorf("-setup-concurrency %d: must be between 1 and %d", c.SetupConcurrency, maxSetupParallel))
	}
	if _, err := parseLogLevel(c.ServerLogLevel); err != nil {
		errs = append(errs, fmt.Errorf("-server-log-level %q: %w", c.ServerLogLevel, err))
	}
	if c.PoolMaxConns < 0 || c.PoolMaxConns > maxPoolConns {
		errs = append(errs, fmt.Errorf("-pool-max-conns %d: must be between 0 and %d", c.PoolMaxConns, maxPoolConns))
	}

	return errors.Join(errs...)
}

// parseConcurrencies parses a comma-separated list of integers. Range
// checks are left to Validate.
func parseConcurrencies(s string) ([]int, error) {
	var out []int
	for field := range strings.SplitSeq(s, ",") {
		field = strings.TrimSpace(field)
		if field == "" {
			continue
		}
		n, err := strconv.Atoi(field)
		if err != nil {
			return nil, fmt.Errorf("%q is not an integer", field)
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, errors.New("must list at least one number")
	}

	return out, nil
}

// parseScenarios parses a comma-separated list of scenario letters, keeping
// the order given and dropping repeats.
func parseScenarios(s string) ([]scenarioID, error) {
	var out []scenarioID
	seen := map[scenarioID]bool{}
	for field := range strings.SplitSeq(s, ",") {
		id := scenarioID(strings.TrimSpace(field))
		if id == "" {
			continue
		}
		if _, ok := scenarioTitles[id]; !ok || id == scenarioFloor {
			return nil, fmt.Errorf("unknown scenario %q, must be one of a, b, c, d, e", id)
		}
		if !seen[id] {
			seen[id] = true
			out = append(out, id)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("must list at least one scenario")
	}

	return out, nil
}

// parseLogLevel parses debug, info, warn or error.
func parseLogLevel(s string) (slog.Level, error) {
	switch s {
	case "debug":
		return slog.LevelDebug, nil
	case "info":
		return slog.LevelInfo, nil
	case "warn":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}

	return 0, errors.New("must be debug, info, warn or error")
}
