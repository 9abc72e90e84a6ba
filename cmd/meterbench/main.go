// Command meterbench is the load benchmark of the Metering server. It
// measures the hot-path RPCs at several concurrencies against the floor,
// the gRPC health Check on the same server and client, and checks after
// each cell that no limit was exceeded and that the counters equal the
// ledger. Run it with -h for the scenarios and flags, or as `make bench`;
// docs/BENCHMARKS.md explains the method and records the figures.
package main

import (
	"context"
	"errors"
	"flag"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)

	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	err := run(ctx, os.Args[1:], logger, os.Stdin, os.Stdout, os.Stderr)
	stop()

	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		os.Exit(0)
	case errors.Is(err, errChecksFailed):
		logger.Error("meterbench finished with failed checks")
	default:
		logger.Error("meterbench failed", "error", err)
	}
	os.Exit(1)
}

// run runs the benchmark, or the server process when args start with
// serverCommand.
func run(ctx context.Context, args []string, logger *slog.Logger, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == serverCommand {
		return runServerProcess(ctx, args[1:], stdin, stdout, stderr)
	}

	cfg, err := configFromFlags(args, stderr)
	if err != nil {
		return err
	}
	if err := cfg.Validate(); err != nil {
		return err
	}

	return runBench(ctx, cfg, logger, stdout, stderr)
}
