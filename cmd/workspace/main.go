// Command workspace serves the workspace gRPC API (agents, tasks, documents,
// messages and attachments), counting every create in Metering, or applies
// the workspace migrations and exits. Run it with -h for the commands and
// flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/metering/metering/internal/server"
	"github.com/metering/metering/internal/workspaceserver"
)

const usageHeader = `Usage: workspace [command] [flags]

Commands:
  serve    serve the gRPC API and /metrics until SIGINT or SIGTERM (default)
  migrate  apply the workspace migrations to -database-url and exit

Each flag falls back to the environment variable named in its help, and then
to its default.

Flags:
`

// usageError is an error in the command line or the configuration.
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }

func (e *usageError) Unwrap() error { return e.err }

func main() {
	var level slog.LevelVar
	logger := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: &level}))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// After the first signal, restore the default handling, so that a
	// second one ends a shutdown that hangs.
	go func() {
		<-ctx.Done()
		stop()
	}()

	err := run(ctx, os.Args[1:], logger, &level)
	stop()

	os.Exit(exitCode(err, logger))
}

// run parses the command line and runs the command. It sets level from the
// configuration.
func run(ctx context.Context, args []string, logger *slog.Logger, level *slog.LevelVar) error {
	command := "serve"
	if len(args) > 0 && (args[0] == "serve" || args[0] == "migrate") {
		command, args = args[0], args[1:]
	} else if len(args) > 0 && args[0] != "" && args[0][0] != '-' {
		return &usageError{fmt.Errorf("unknown command %q, must be serve or migrate", args[0])}
	}

	fs := flag.NewFlagSet("workspace", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfg, err := workspaceserver.ConfigFromFlags(fs, args, os.LookupEnv)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(os.Stdout, usageHeader)
		fs.SetOutput(os.Stdout)
		fs.PrintDefaults()
		return err
	}
	if err != nil {
		return &usageError{err}
	}
	level.Set(cfg.Level())

	// Migrating needs only the database.
	if command == "migrate" {
		if err := server.ValidateDatabaseURL(cfg.DatabaseURL); err != nil {
			return &usageError{fmt.Errorf("invalid configuration: DatabaseURL (-database-url, DATABASE_URL): %w", err)}
		}
		return workspaceserver.Migrate(ctx, cfg.DatabaseURL, logger)
	}

	if err := cfg.Validate(); err != nil {
		return &usageError{fmt.Errorf("invalid configuration:\n%w", err)}
	}

	return workspaceserver.Run(ctx, cfg, logger)
}

// exitCode reports err and returns the exit code for it: 0 on success or
// help, 2 on bad usage, 1 on any other error.
func exitCode(err error, logger *slog.Logger) int {
	var usageErr *usageError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &usageErr):
		fmt.Fprintf(os.Stderr, "workspace: %v\nRun 'workspace -h' for usage.\n", err)
		return 2
	default:
		logger.Error("workspace failed", "error", err)
		return 1
	}
}
