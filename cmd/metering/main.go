// Command metering serves the Metering gRPC API, or applies the database
// migrations and exits. Run it with -h for the commands and flags.
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

	"github.com/metering/metering/internal/schema"
	"github.com/metering/metering/internal/server"
)

const usageHeader = `Usage: metering [command] [flags]

Commands:
  serve    serve the gRPC API and /metrics until SIGINT or SIGTERM (default)
  migrate  apply the database migrations and exit
  token    mint a development JWT or issue a service token (metering token -h)

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
	if len(args) > 0 && args[0] == "token" {
		return runToken(ctx, args[1:], logger)
	}

	command := "serve"
	if len(args) > 0 && (args[0] == "serve" || args[0] == "migrate") {
		command, args = args[0], args[1:]
	} else if len(args) > 0 && args[0] != "" && args[0][0] != '-' {
		return &usageError{fmt.Errorf("unknown command %q, must be serve, migrate or token", args[0])}
	}

	fs := flag.NewFlagSet("metering", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfg, err := server.ConfigFromFlags(fs, args, os.LookupEnv)
	if errors.Is(err, flag.ErrHelp) {
		printUsage(os.Stdout, fs)
		return err
	}
	if err != nil {
		return &usageError{err}
	}

	if err := cfg.Validate(); err != nil {
		return &usageError{fmt.Errorf("invalid configuration:\n%w", err)}
	}
	level.Set(cfg.Level())

	// Migrate logs the versions before and after, and its errors name
	// the migration step.
	if command == "migrate" {
		return schema.Migrate(ctx, cfg.DatabaseURL, logger)
	}

	return server.Run(ctx, cfg, logger)
}

func printUsage(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprint(w, usageHeader)
	fs.SetOutput(w)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
}

// exitCode reports err and returns the exit code for it: 0 on success or
// help, 2 on bad usage, 1 on any other error.
func exitCode(err error, logger *slog.Logger) int {
	var usageErr *usageError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &usageErr):
		fmt.Fprintf(os.Stderr, "metering: %v\nRun 'metering -h' for usage.\n", err)
		return 2
	default:
		logger.Error("metering failed", "error", err)
		return 1
	}
}
