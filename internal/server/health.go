package server

import (
	"context"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
)

// minPingTimeout is the shortest time a PostgreSQL ping gets, so that a
// short HealthInterval does not mark a slow but working database down.
const minPingTimeout = time.Second

// healthServices are the names whose health status follows PostgreSQL: ""
// for the server as a whole, and each metering service.
var healthServices = []string{
	"",
	meteringv1.MeteringService_ServiceDesc.ServiceName,
	meteringv1.MeteringAdminService_ServiceDesc.ServiceName,
}

// databaseWatcher pings PostgreSQL and sets the health status of services,
// or of healthServices when services is nil, from the result.
type databaseWatcher struct {
	pool     *pgxpool.Pool
	health   *health.Server
	services []string
	interval time.Duration
	logger   *slog.Logger
}

// WatchDatabase pings PostgreSQL through pool at once and then every
// interval until ctx is done, and sets the health status of each name in
// services to SERVING while the pings succeed and to NOT_SERVING while they
// fail. It logs only the changes. A ping gets max(interval, 1s) to succeed.
func WatchDatabase(ctx context.Context, pool *pgxpool.Pool, health *health.Server, services []string, interval time.Duration, logger *slog.Logger) {
	databaseWatcher{pool: pool, health: health, services: services, interval: interval, logger: logger}.run(ctx)
}

// run pings at once and then every interval until ctx is done. It logs only
// the changes between reachable and unreachable, not every ping.
func (w databaseWatcher) run(ctx context.Context) {
	ticker := time.NewTicker(w.interval)
	defer ticker.Stop()

	var reachable, known bool
	for {
		err := w.ping(ctx)
		if ctx.Err() != nil {
			return
		}

		if !known || reachable != (err == nil) {
			known = true
			reachable = err == nil
			w.setStatus(ctx, err)
		}

		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

func (w databaseWatcher) ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, max(w.interval, minPingTimeout))
	defer cancel()

	return w.pool.Ping(ctx)
}

func (w databaseWatcher) setStatus(ctx context.Context, pingErr error) {
	status := healthpb.HealthCheckResponse_SERVING
	if pingErr != nil {
		status = healthpb.HealthCheckResponse_NOT_SERVING
	}

	services := w.services
	if services == nil {
		services = healthServices
	}
	for _, service := range services {
		w.health.SetServingStatus(service, status)
	}

	if pingErr != nil {
		w.logger.WarnContext(ctx, "database unreachable, health status set to NOT_SERVING", "error", pingErr)
		return
	}
	w.logger.InfoContext(ctx, "database reachable, health status set to SERVING")
}
