// Package workspaceserver runs the workspace server process: the workspace
// gRPC services with authentication, health checking, reflection and
// Prometheus metrics, a client of Metering, and a graceful shutdown.
package workspaceserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	workspacev1 "github.com/metering/metering/gen/workspace/v1"
	"github.com/metering/metering/internal/auth"
	"github.com/metering/metering/internal/schema"
	"github.com/metering/metering/internal/server"
	"github.com/metering/metering/internal/workspace"
	workspacemigrations "github.com/metering/metering/migrations/workspace"
)

// blobDirMode is the permission of a blob directory that Run creates.
const blobDirMode = 0o750

// meteringReconnectBackoff paces the reconnections to Metering after it
// went away. While the connection is down, calls fail at once with
// UNAVAILABLE, so the delay bounds how long creates keep failing after
// Metering is back: at most MaxDelay, 5 s, in place of grpc-go's default of
// 120 s.
var meteringReconnectBackoff = backoff.Config{
	BaseDelay:  100 * time.Millisecond,
	Multiplier: 1.6,
	Jitter:     0.2,
	MaxDelay:   5 * time.Second,
}

// healthServices are the names whose health status follows PostgreSQL: ""
// for the server as a whole, and each workspace service.
var healthServices = []string{
	"",
	workspacev1.AgentService_ServiceDesc.ServiceName,
	workspacev1.TaskService_ServiceDesc.ServiceName,
	workspacev1.DocumentService_ServiceDesc.ServiceName,
	workspacev1.MessageService_ServiceDesc.ServiceName,
}

// Migrate applies the workspace migrations to the database at databaseURL.
// They create the schema workspace and record their version in the table
// workspace_schema_migrations, apart from Metering's.
func Migrate(ctx context.Context, databaseURL string, logger *slog.Logger) error {
	set := schema.Set{FS: workspacemigrations.FS, Table: workspacemigrations.Table}
	if err := schema.MigrateSet(ctx, databaseURL, set, logger); err != nil {
		return fmt.Errorf("workspace migrations: %w", err)
	}

	return nil
}

// Run validates cfg, reads its key files, applies the migrations when
// cfg.Migrate is set, and serves gRPC and metrics until ctx is done. It then
// shuts down gracefully and returns nil.
//
// Run starts even when PostgreSQL or Metering is unreachable, because both
// connections are made lazily. The gRPC health status stays NOT_SERVING until
// a PostgreSQL ping succeeds; creates fail with UNAVAILABLE while Metering
// cannot be reached. It returns an error when cfg is invalid, a file cannot
// be read, a listener cannot be opened, the migrations fail, or a listener
// fails while serving.
func Run(ctx context.Context, cfg Config, logger *slog.Logger, opts ...Option) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("invalid config: %w", err)
	}
	o := newOptions(opts)

	files, err := readFiles(cfg)
	if err != nil {
		closeListeners(o.grpcListener, o.metricsListener)
		return err
	}

	grpcListener, metricsListener, err := listen(ctx, cfg, o)
	if err != nil {
		return err
	}

	s, err := newServer(ctx, cfg, files, logger, o)
	if err != nil {
		closeListeners(grpcListener, metricsListener)
		return err
	}

	return s.serve(ctx, grpcListener, metricsListener)
}

// keyFiles are the contents of the files that Config names.
type keyFiles struct {
	meteringToken string
	auth          auth.Config
}

// readFiles reads the Metering token and the JWT key files, and creates the
// blob directory when missing.
func readFiles(cfg Config) (keyFiles, error) {
	token, err := server.ReadKeyFile(cfg.MeteringTokenFile)
	if err != nil {
		return keyFiles{}, fmt.Errorf("read the Metering token file: %w", err)
	}

	a := auth.Config{
		Issuer:        cfg.Auth.JWTIssuer,
		Audience:      cfg.Auth.JWTAudience,
		Leeway:        cfg.Auth.JWTLeeway,
		TokenCacheTTL: cfg.Auth.TokenCacheTTL,
		Now:           time.Now,
	}
	if cfg.Auth.JWTSecretFile != "" {
		if a.HS256Secret, err = server.ReadKeyFile(cfg.Auth.JWTSecretFile); err != nil {
			return keyFiles{}, fmt.Errorf("read the JWT secret file: %w", err)
		}
	}
	if cfg.Auth.JWKSFile != "" {
		if a.JWKS, err = server.ReadKeyFile(cfg.Auth.JWKSFile); err != nil {
			return keyFiles{}, fmt.Errorf("read the JWKS file: %w", err)
		}
	}

	if err := os.MkdirAll(cfg.BlobDir, blobDirMode); err != nil {
		return keyFiles{}, fmt.Errorf("create the blob directory: %w", err)
	}

	return keyFiles{meteringToken: string(token), auth: a}, nil
}

// process contains the parts of a running workspace server.
type process struct {
	cfg      Config
	logger   *slog.Logger
	pool     *pgxpool.Pool
	service  *workspace.Service
	metering *grpc.ClientConn
	auth     *auth.Authenticator
	grpc     *grpc.Server
	health   *health.Server
	metrics  *http.Server
}

// newServer migrates the database when cfg.Migrate is set, opens the pool and
// the Metering connection without connecting, and builds the gRPC and
// metrics servers.
func newServer(ctx context.Context, cfg Config, files keyFiles, logger *slog.Logger, o options) (*process, error) {
	if cfg.Migrate {
		if err := Migrate(ctx, cfg.DatabaseURL, logger); err != nil {
			return nil, err
		}
	}

	poolConfig, err := newPoolConfig(cfg.DatabaseURL)
	if err != nil {
		return nil, err
	}
	pool, err := pgxpool.NewWithConfig(ctx, poolConfig)
	if err != nil {
		return nil, fmt.Errorf("create database pool: %w", err)
	}

	// NOTE: the connection to Metering is plaintext, as Metering serves
	// only plaintext gRPC; run both on one host or a private network.
	meteringConn, err := grpc.NewClient(cfg.MeteringAddr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithPerRPCCredentials(serviceTokenCredentials{token: files.meteringToken}),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: meteringReconnectBackoff, MinConnectTimeout: cfg.MeteringTimeout}),
	)
	if err != nil {
		pool.Close()
		return nil, fmt.Errorf("create Metering client for %s: %w", cfg.MeteringAddr, err)
	}

	p, err := buildServer(cfg, files, pool, meteringConn, logger, o)
	if err != nil {
		_ = meteringConn.Close()
		pool.Close()
		return nil, err
	}

	return p, nil
}

// newPoolConfig returns the pool configuration of databaseURL, with
// DefaultDatabaseMaxConns connections unless its pool_max_conns sets
// another number.
func newPoolConfig(databaseURL string) (*pgxpool.Config, error) {
	poolConfig, err := pgxpool.ParseConfig(databaseURL)
	if err != nil {
		return nil, fmt.Errorf("parse database URL: %w", err)
	}

	// pgxpool.ParseConfig removes pool_max_conns from the parameters it
	// passes on, so the connection string is parsed again to tell a
	// pool_max_conns it sets from pgx's default.
	connConfig, err := pgx.ParseConfig(databaseURL)
	if err != nil {
		return nil, fmt.Errorf("parse database URL: %w", err)
	}
	if _, set := connConfig.RuntimeParams["pool_max_conns"]; !set {
		poolConfig.MaxConns = DefaultDatabaseMaxConns
	}

	return poolConfig, nil
}

// buildServer builds the service, the authenticator and the gRPC and metrics
// servers, and checks that every registered method has an access rule.
func buildServer(cfg Config, files keyFiles, pool *pgxpool.Pool, meteringConn *grpc.ClientConn, logger *slog.Logger, o options) (*process, error) {
	svc, err := workspace.New(workspace.Config{
		Pool:                 pool,
		Metering:             meteringv1.NewMeteringServiceClient(meteringConn),
		BlobDir:              cfg.BlobDir,
		ReservationTTL:       cfg.ReservationTTL,
		UploadReservationTTL: cfg.UploadReservationTTL,
		MaxUploadBytes:       cfg.MaxUploadBytes,
		UploadIdleTimeout:    cfg.UploadIdleTimeout,
		MeteringTimeout:      cfg.MeteringTimeout,
		Now:                  time.Now,
		Logger:               logger,
		WriteHook:            o.writeHook,
	})
	if err != nil {
		return nil, err
	}

	authConfig := files.auth
	authConfig.Tokens = svc.TokenStore()
	authConfig.Logger = logger
	authenticator, err := auth.New(authConfig)
	if err != nil {
		return nil, fmt.Errorf("configure authentication: %w", err)
	}

	policy := workspace.Policy()
	for method, rule := range server.PublicMethods() {
		policy[method] = rule
	}
	unaryAuth, streamAuth := auth.Interceptors(authenticator, policy)

	registry := prometheus.NewRegistry()
	registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	rpcMetrics := grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram())
	registry.MustRegister(rpcMetrics)

	grpcServer := server.NewGRPCServer(logger, rpcMetrics,
		server.WithUnaryInterceptors(unaryAuth),
		server.WithStreamInterceptors(streamAuth),
	)
	svc.Register(grpcServer)
	healthServer := health.NewServer()
	healthpb.RegisterHealthServer(grpcServer, healthServer)
	reflection.Register(grpcServer)
	rpcMetrics.InitializeMetrics(grpcServer)
	if err := CheckPolicy(policy, grpcServer.GetServiceInfo()); err != nil {
		return nil, err
	}

	// health.NewServer starts with "" SERVING, but nothing is known about
	// PostgreSQL until the first ping.
	for _, name := range healthServices {
		healthServer.SetServingStatus(name, healthpb.HealthCheckResponse_NOT_SERVING)
	}

	return &process{
		cfg:      cfg,
		logger:   logger,
		pool:     pool,
		service:  svc,
		metering: meteringConn,
		auth:     authenticator,
		grpc:     grpcServer,
		health:   healthServer,
		metrics:  server.NewMetricsServer(registry, logger),
	}, nil
}

// CheckPolicy returns an error when a rule of policy is malformed or names an
// unknown scope. It also returns one when a method in info has no rule,
// because every call to it would be denied, and when a rule names a method
// that info does not have.
func CheckPolicy(policy auth.Policy, info map[string]grpc.ServiceInfo) error {
	if err := policy.ValidateWithScopes(workspace.Scopes()); err != nil {
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

// serve runs the servers and the background loops until ctx is done or a
// listener fails, then stops everything in order: health status, gRPC,
// loops, metrics, the service's background tasks, Metering connection,
// pool. It returns the listener failure, if any.
func (p *process) serve(ctx context.Context, grpcListener, metricsListener net.Listener) error {
	serveErrs := make(chan error, 2)
	servers := 1
	go func() { serveErrs <- p.serveGRPC(grpcListener) }()
	if metricsListener != nil {
		servers++
		go func() { serveErrs <- p.serveMetrics(metricsListener) }()
	}

	loopCtx, stopLoops := context.WithCancel(context.WithoutCancel(ctx))
	var loops sync.WaitGroup
	loops.Go(func() {
		server.WatchDatabase(loopCtx, p.pool, p.health, healthServices, p.cfg.HealthInterval, p.logger)
	})
	loops.Go(func() { p.auth.Run(loopCtx) })
	loops.Go(func() { p.sweepBlobDir(loopCtx) })

	p.logger.InfoContext(ctx, "workspace server started",
		"config", p.cfg,
		"grpc_addr", grpcListener.Addr().String(),
		"metrics_addr", addrString(metricsListener),
	)

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-serveErrs:
		servers--
	}

	p.logger.InfoContext(ctx, "workspace server stopping")
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.cfg.ShutdownTimeout)
	defer cancel()

	p.health.Shutdown()
	p.stopGRPC(shutdownCtx)
	stopLoops()
	if metricsListener != nil {
		if err := p.metrics.Shutdown(shutdownCtx); err != nil {
			p.logger.WarnContext(ctx, "graceful metrics server stop failed, closing open connections", "error", err)
			_ = p.metrics.Close()
		}
	}
	loops.Wait()
	for range servers {
		serveErr = errors.Join(serveErr, <-serveErrs)
	}
	// The background tasks settle creates and release reservations, so
	// they need Metering and the pool until they end.
	p.service.Close(shutdownCtx)
	if err := p.metering.Close(); err != nil {
		p.logger.WarnContext(ctx, "close Metering connection failed", "error", err)
	}
	p.pool.Close()

	if serveErr != nil {
		return serveErr
	}
	p.logger.InfoContext(ctx, "workspace server stopped")

	return nil
}

// sweepBlobDir runs the start-up sweep of the blob directory, and runs it
// again every HealthInterval after a failure, such as an unavailable
// database, until it succeeds or ctx is done.
func (p *process) sweepBlobDir(ctx context.Context) {
	for {
		err := p.service.SweepBlobDir(ctx)
		if err == nil {
			return
		}
		p.logger.WarnContext(ctx, "sweep of the blob directory failed; retrying", "error", err, "retry_interval", p.cfg.HealthInterval)

		select {
		case <-ctx.Done():
			return
		case <-time.After(p.cfg.HealthInterval):
		}
	}
}

func (p *process) serveGRPC(l net.Listener) error {
	if err := p.grpc.Serve(l); err != nil {
		return fmt.Errorf("serve gRPC on %s: %w", l.Addr(), err)
	}

	return nil
}

func (p *process) serveMetrics(l net.Listener) error {
	err := p.metrics.Serve(l)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}

	return fmt.Errorf("serve metrics on %s: %w", l.Addr(), err)
}

// stopGRPC waits for in-flight RPCs until ctx is done, then closes the
// connections that are still open.
func (p *process) stopGRPC(ctx context.Context) {
	stopped := make(chan struct{})
	go func() {
		p.grpc.GracefulStop()
		close(stopped)
	}()

	select {
	case <-stopped:
	case <-ctx.Done():
		p.logger.WarnContext(ctx, "graceful gRPC stop timed out, closing open connections",
			"shutdown_timeout", p.cfg.ShutdownTimeout)
		p.grpc.Stop()
		<-stopped
	}
}

// listen returns the listeners given in o, or opens them on the addresses in
// cfg. The metrics listener is nil when metrics are disabled.
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

// serviceTokenCredentials sends the workspace's Metering token with every
// call to Metering. It never prints the token.
type serviceTokenCredentials struct {
	token string
}

// GetRequestMetadata returns the x-service-token metadata.
func (c serviceTokenCredentials) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{auth.MetadataServiceToken: c.token}, nil
}

// RequireTransportSecurity reports false: Metering serves plaintext gRPC.
func (serviceTokenCredentials) RequireTransportSecurity() bool {
	return false
}

// String masks the token.
func (serviceTokenCredentials) String() string {
	return "serviceTokenCredentials{token:[redacted]}"
}
