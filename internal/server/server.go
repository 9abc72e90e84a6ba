// Package server runs the metering process: the gRPC API with health
// checking, reflection and Prometheus metrics, the sweeper of expired
// reservations, and a graceful shutdown.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	"github.com/metering/metering/internal/auth"
	"github.com/metering/metering/internal/metering"
	"github.com/metering/metering/internal/meteringapi"
	"github.com/metering/metering/internal/schema"
)

// metricsReadHeaderTimeout bounds how long a client of the metrics listener
// may take to send its request headers.
const metricsReadHeaderTimeout = 10 * time.Second

// Run validates cfg, applies the migrations when cfg.Migrate is set, and
// serves gRPC and metrics until ctx is done. It then shuts down gracefully
// and returns nil.
//
// Run starts even when PostgreSQL is unreachable, because the pool connects
// lazily. The gRPC health status stays NOT_SERVING until a ping succeeds. It
// returns an error when cfg is invalid, a listener cannot be opened, the
// migrations fail, or a listener fails while serving.
func Run(ctx context.Context, cfg Config, logger *slog.Logger, opts ...Option) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("invalid config: %w", err)
	}
	o := newOptions(opts)

	grpcListener, metricsListener, err := listen(ctx, cfg, o)
	if err != nil {
		return err
	}

	s, err := newServer(ctx, cfg, logger, o)
	if err != nil {
		closeListeners(grpcListener, metricsListener)
		return err
	}

	return s.serve(ctx, grpcListener, metricsListener)
}

// server contains the parts of a running metering process.
type server struct {
	cfg     Config
	logger  *slog.Logger
	pool    *pgxpool.Pool
	service *metering.Service
	auth    *auth.Authenticator
	grpc    *grpc.Server
	health  *health.Server
	metrics *http.Server
}

// newServer migrates the database when cfg.Migrate is set, opens the pool
// without connecting, and builds the gRPC and metrics servers.
func newServer(ctx context.Context, cfg Config, logger *slog.Logger, o options) (*server, error) {
	if cfg.Migrate {
		// The errors of Migrate already name the migration step.
		if err := schema.Migrate(ctx, cfg.DatabaseURL, logger); err != nil {
			return nil, err
		}
	}

	poolConfig, err := pgxpool.ParseConfig(cfg.DatabaseURL)
	if err != nil {
		return nil, fmt.Errorf("parse database URL: %w", err)
	}

	pool, err := pgxpool.NewWithConfig(ctx, poolConfig)
	if err != nil {
		return nil, fmt.Errorf("create database pool: %w", err)
	}

	registry := prometheus.NewRegistry()
	registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	rpcMetrics := grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram())
	registry.MustRegister(rpcMetrics)

	batchSizes := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "metering_batch_size",
		Help:    "Number of concurrent reserve or commit calls run as one database statement.",
		Buckets: []float64{1, 2, 4, 8, 16, 32, 64, 128},
	}, []string{"op"})
	registry.MustRegister(batchSizes)
	service := metering.New(metering.Config{
		Pool:    pool,
		Logger:  logger,
		Now:     time.Now,
		OnBatch: func(op string, size int) { batchSizes.WithLabelValues(op).Observe(float64(size)) },
	})
	api := meteringapi.New(service, logger, registry)

	authConfig, err := cfg.Auth.authConfig(service.TokenStore(), logger)
	if err != nil {
		service.Close()
		pool.Close()
		return nil, err
	}
	authenticator, err := auth.New(authConfig)
	if err != nil {
		service.Close()
		pool.Close()
		return nil, fmt.Errorf("configure authentication: %w", err)
	}
	policy := meteringapi.Policy()
	for method, rule := range PublicMethods() {
		policy[method] = rule
	}
	unaryAuth, streamAuth := auth.Interceptors(authenticator, policy)
	o.unaryInterceptors = append([]grpc.UnaryServerInterceptor{unaryAuth}, o.unaryInterceptors...)
	o.streamInterceptors = append([]grpc.StreamServerInterceptor{streamAuth}, o.streamInterceptors...)

	grpcServer := newGRPCServer(logger, rpcMetrics, o)
	api.Register(grpcServer)
	healthServer := health.NewServer()
	healthpb.RegisterHealthServer(grpcServer, healthServer)
	reflection.Register(grpcServer)
	rpcMetrics.InitializeMetrics(grpcServer)
	if err := checkPolicy(policy, grpcServer.GetServiceInfo()); err != nil {
		service.Close()
		pool.Close()
		return nil, err
	}

	// health.NewServer starts with "" SERVING, but nothing is known about
	// PostgreSQL until the first ping.
	for _, name := range healthServices {
		healthServer.SetServingStatus(name, healthpb.HealthCheckResponse_NOT_SERVING)
	}

	return &server{
		cfg:     cfg,
		logger:  logger,
		pool:    pool,
		service: service,
		auth:    authenticator,
		grpc:    grpcServer,
		health:  healthServer,
		metrics: NewMetricsServer(registry, logger),
	}, nil
}

// serve runs the servers and the background loops until ctx is done or a
// listener fails, then stops everything in order: health status, gRPC,
// sweeper, metrics, pool. It returns the listener failure, if any.
func (s *server) serve(ctx context.Context, grpcListener, metricsListener net.Listener) error {
	serveErrs := make(chan error, 2)
	servers := 1
	go func() { serveErrs <- s.serveGRPC(grpcListener) }()
	if metricsListener != nil {
		servers++
		go func() { serveErrs <- s.serveMetrics(metricsListener) }()
	}

	// The loops get contexts of their own, so that shutdown stops each at
	// its step and not all at once when ctx is cancelled.
	watchCtx, stopWatch := context.WithCancel(context.WithoutCancel(ctx))
	sweepCtx, stopSweep := context.WithCancel(context.WithoutCancel(ctx))
	var loops sync.WaitGroup
	watcher := databaseWatcher{pool: s.pool, health: s.health, interval: s.cfg.HealthInterval, logger: s.logger}
	loops.Go(func() { watcher.run(watchCtx) })
	loops.Go(func() { s.service.RunSweeper(sweepCtx, s.cfg.SweepInterval) })
	loops.Go(func() { s.auth.Run(sweepCtx) })

	s.logger.InfoContext(ctx, "metering server started",
		"config", s.cfg,
		"grpc_addr", grpcListener.Addr().String(),
		"metrics_addr", addrString(metricsListener),
	)

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-serveErrs:
		servers--
	}

	s.logger.InfoContext(ctx, "metering server stopping")
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.ShutdownTimeout)
	defer cancel()

	stopWatch()
	s.health.Shutdown()
	s.stopGRPC(shutdownCtx)
	s.service.Close()
	stopSweep()
	if metricsListener != nil {
		s.stopMetrics(shutdownCtx)
	}
	loops.Wait()
	for range servers {
		serveErr = errors.Join(serveErr, <-serveErrs)
	}
	s.pool.Close()

	if serveErr != nil {
		return serveErr
	}
	s.logger.InfoContext(ctx, "metering server stopped")

	return nil
}

func (s *server) serveGRPC(l net.Listener) error {
	if err := s.grpc.Serve(l); err != nil {
		return fmt.Errorf("serve gRPC on %s: %w", l.Addr(), err)
	}

	return nil
}

func (s *server) serveMetrics(l net.Listener) error {
	err := s.metrics.Serve(l)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}

	return fmt.Errorf("serve metrics on %s: %w", l.Addr(), err)
}

// stopGRPC waits for in-flight RPCs until ctx is done, then closes the
// connections that are still open. Open health Watch streams hold a graceful
// stop until then.
func (s *server) stopGRPC(ctx context.Context) {
	stopped := make(chan struct{})
	go func() {
		s.grpc.GracefulStop()
		close(stopped)
	}()

	select {
	case <-stopped:
	case <-ctx.Done():
		s.logger.WarnContext(ctx, "graceful gRPC stop timed out, closing open connections",
			"shutdown_timeout", s.cfg.ShutdownTimeout)
		s.grpc.Stop()
		<-stopped
	}
}

func (s *server) stopMetrics(ctx context.Context) {
	err := s.metrics.Shutdown(ctx)
	if err == nil {
		return
	}

	s.logger.WarnContext(ctx, "graceful metrics server stop failed, closing open connections", "error", err)
	if err := s.metrics.Close(); err != nil {
		s.logger.WarnContext(ctx, "close metrics server failed", "error", err)
	}
}

// NewMetricsServer returns an HTTP server that serves the metrics of registry
// on GET /metrics and logs its errors to logger. The caller starts it with
// Serve and stops it with Shutdown.
func NewMetricsServer(registry *prometheus.Registry, logger *slog.Logger) *http.Server {
	errorLog := slog.NewLogLogger(logger.Handler(), slog.LevelError)

	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(registry, promhttp.HandlerOpts{
		ErrorLog: errorLog,
		Registry: registry,
	}))

	return &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: metricsReadHeaderTimeout,
		ErrorLog:          errorLog,
	}
}

// listen returns the listeners given in o, or opens them on the addresses
// in cfg. The metrics listener is nil when metrics are disabled.
func listen(ctx context.Context, cfg Config, o options) (grpcListener, metricsListener net.Listener, err error) {
	var lc net.ListenConfig

	grpcListener = o.grpcListener
	if grpcListener == nil {
		grpcListener, err = lc.Listen(ctx, "tcp", cfg.ListenAddr)
		if err != nil {
			closeListeners(o.metricsListener)
			return nil, nil, fmt.Errorf("listen for gRPC on %s: %w", cfg.ListenAddr, err)
		}
	}

	metricsListener = o.metricsListener
	if metricsListener == nil && cfg.MetricsAddr != "" {
		metricsListener, err = lc.Listen(ctx, "tcp", cfg.MetricsAddr)
		if err != nil {
			closeListeners(grpcListener)
			return nil, nil, fmt.Errorf("listen for metrics on %s: %w", cfg.MetricsAddr, err)
		}
	}

	return grpcListener, metricsListener, nil
}

// closeListeners closes the non-nil listeners. Their errors are dropped
// because a caller only closes them on its way out with an earlier error.
func closeListeners(listeners ...net.Listener) {
	for _, l := range listeners {
		if l != nil {
			_ = l.Close()
		}
	}
}

func addrString(l net.Listener) string {
	if l == nil {
		return "disabled"
	}

	return l.Addr().String()
}

// PublicMethods returns the rules of the methods that need no credential:
// the gRPC health service, for load balancers, and server reflection, for
// grpcurl.
func PublicMethods() auth.Policy {
	public := auth.Rule{Public: true}
	return auth.Policy{
		healthpb.Health_Check_FullMethodName:                             public,
		healthpb.Health_Watch_FullMethodName:                             public,
		healthpb.Health_List_FullMethodName:                              public,
		"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo":      public,
		"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": public,
	}
}

// checkPolicy returns an error when a rule is malformed or a registered
// method has no rule, which would deny every call to it. It also rejects a
// rule for a method the server does not have, such as a typo that leaves the
// real method unlisted.
func checkPolicy(policy auth.Policy, info map[string]grpc.ServiceInfo) error {
	if err := policy.Validate(); err != nil {
		return fmt.Errorf("invalid authorization policy: %w", err)
	}
	if missing := policy.Missing(info); len(missing) > 0 {
		return fmt.Errorf("methods without an authorization rule, which would deny every call: %v", missing)
	}
	if unused := policy.Unused(info); len(unused) > 0 {
		return fmt.Errorf("authorization rules for methods the server does not have: %v", unused)
	}
	return nil
}

// MissingRules returns the methods registered on the metering server that
// have no authorization rule, which Run refuses to start with.
func MissingRules() []string {
	policy := meteringapi.Policy()
	for method, rule := range PublicMethods() {
		policy[method] = rule
	}
	s := grpc.NewServer()
	meteringapi.New(nil, nil, nil).Register(s)
	healthpb.RegisterHealthServer(s, health.NewServer())
	reflection.Register(s)
	return policy.Missing(s.GetServiceInfo())
}
