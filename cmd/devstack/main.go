// Command devstack runs Metering and the workspace server in one process for
// development. It finds or starts PostgreSQL, applies both sets of
// migrations and creates the development JWT secret when missing. Then it
// issues the workspace's Metering token and an operator token, and creates
// the walkthrough's account unless it exists. It prints the credentials a
// newcomer needs, with example grpcurl commands. SIGINT or SIGTERM stops both
// servers.
//
// Without DATABASE_URL it uses the database "metering" on the server that
// internal/localpg finds or starts.
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
	// After the first signal, restore the default handling, so that a
	// second one ends a shutdown that hangs.
	go func() {
		<-ctx.Done()
		stop()
	}()

	var level slog.LevelVar
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: &level}))

	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, logger, &level)
	stop()

	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
	default:
		logger.Error("devstack failed", "error", err)
		os.Exit(1)
	}
}

// run parses the flags and runs the stack until ctx is done. It prints the
// credentials and examples to out once both servers listen.
func run(ctx context.Context, args []string, getenv func(string) string, out io.Writer, logger *slog.Logger, level *slog.LevelVar) error {
	cfg, err := parseFlags(args, getenv)
	if err != nil {
		return err
	}
	level.Set(cfg.level)

	return runStack(ctx, cfg, getenv, out, logger)
}
