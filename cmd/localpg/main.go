// Command localpg prints the connection URL of a PostgreSQL server for
// development, starting a private cluster in .data/postgres when no server is
// available. It writes only the URL to standard output and logs to standard
// error, so that a shell can use it as
//
//	DATABASE_URL=${DATABASE_URL:-$(go run ./cmd/localpg)}
//
// With -database NAME it creates that database when missing and prints its
// URL. With -stop it stops the private cluster instead.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/metering/metering/internal/localpg"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(ctx, logger, os.Args[1:]); err != nil {
		logger.ErrorContext(ctx, "localpg failed", "error", err)
		stop()
		os.Exit(1)
	}
}

func run(ctx context.Context, logger *slog.Logger, args []string) error {
	flags := flag.NewFlagSet("localpg", flag.ContinueOnError)
	stopCluster := flags.Bool("stop", false, "stop the private cluster in .data/postgres instead of printing a URL")
	database := flags.String("database", "", "create this database when missing and print its URL instead of the server's (ignored when DATABASE_URL is set)")
	if err := flags.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}

	opts := localpg.Options{Logger: logger}
	if *stopCluster {
		return localpg.Stop(ctx, opts)
	}

	databaseURL, err := localpg.Find(ctx, opts)
	if err != nil {
		return err
	}
	if *database != "" && os.Getenv("DATABASE_URL") == "" {
		databaseURL, err = localpg.EnsureDatabase(ctx, databaseURL, *database)
		if err != nil {
			return err
		}
	}

	_, err = fmt.Println(databaseURL)
	return err
}
