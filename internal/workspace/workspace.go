// Package workspace implements the resource services of the SaaS:
// AgentService, TaskService, DocumentService and MessageService
// (proto/workspace/v1). They keep their rows in the PostgreSQL schema
// workspace and count every create in Metering, which they reach only
// through its gRPC API with their own service token.
//
// Every create runs through one guard (see guard.go): reserve the capacity
// in Metering, write the rows in a database transaction, commit the
// reservation, then commit the transaction. A failed write releases the
// reservation; a failed commit rolls the write back. When Metering cannot be
// reached, creates fail with UNAVAILABLE and write nothing. A commit whose
// response is lost is settled with a release, in the background when
// needed, so Metering's counters end up equal to the rows.
package workspace

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	workspacev1 "github.com/metering/metering/gen/workspace/v1"
)

// Defaults and limits of Config.
const (
	// DefaultReservationTTL is how long Metering holds the capacity of a
	// create between the reservation and the commit.
	DefaultReservationTTL = 2 * time.Minute
	// DefaultUploadReservationTTL is how long Metering holds the storage of
	// an upload, which lasts as long as the client takes to send the bytes.
	DefaultUploadReservationTTL = 30 * time.Minute
	// MinReservationTTL and MaxReservationTTL are the TTLs Metering accepts.
	MinReservationTTL = time.Second
	MaxReservationTTL = time.Hour
	// DefaultMaxUploadBytes is the largest upload accepted: 1 GiB.
	DefaultMaxUploadBytes = 1 << 30
	// DefaultUploadIdleTimeout is the longest pause between two messages of
	// an upload.
	DefaultUploadIdleTimeout = 30 * time.Second
	// MaxChunkBytes is the largest chunk of an upload: 1 MiB. A larger
	// chunk gets INVALID_ARGUMENT. A message over gRPC's receive limit of
	// 4 MiB, the grpc-go default that the server keeps, never reaches the
	// handler: gRPC itself rejects it with RESOURCE_EXHAUSTED and no quota
	// details.
	MaxChunkBytes = 1 << 20
	// DefaultMeteringTimeout bounds one call to Metering, and the Metering
	// calls that a create or delete makes while its transaction is open.
	DefaultMeteringTimeout = 5 * time.Second
	// DefaultMeteringAttempts is how many times a Metering call that failed
	// with UNAVAILABLE or a timeout is made in all. Every retried call is
	// idempotent: reservations and recorded usage carry an idempotency key,
	// and commits, releases and deletions are idempotent by id.
	DefaultMeteringAttempts = 4
	// DefaultMeteringBackoff is the pause before the first retry; it doubles
	// before each further one.
	DefaultMeteringBackoff = 50 * time.Millisecond
)

// Config configures a Service. The zero value of each optional field selects
// its default.
type Config struct {
	// Pool connects to the database that holds the workspace schema.
	// Required.
	Pool *pgxpool.Pool
	// Metering is a client of Metering whose connection sends the
	// workspace's service token (scope usage:write, all accounts) with every
	// call. Required.
	Metering meteringv1.MeteringServiceClient
	// BlobDir is the directory that holds the bytes of attachments, one file
	// per attachment, and the temporary files of uploads in progress. It
	// must exist. Required.
	BlobDir string
	// ReservationTTL is the TTL of the reservations of creates.
	ReservationTTL time.Duration
	// UploadReservationTTL is the TTL of the reservations of uploads.
	UploadReservationTTL time.Duration
	// MaxUploadBytes is the largest declared size of an upload.
	MaxUploadBytes int64
	// UploadIdleTimeout is the longest pause between two messages of an
	// upload. A longer one aborts the upload and releases its storage. An
	// upload as a whole must end within UploadReservationTTL.
	UploadIdleTimeout time.Duration
	// MeteringTimeout bounds each call to Metering. It also bounds how
	// long a create's or delete's transaction stays open waiting for
	// Metering: once for the commit, and once more for the release that
	// settles a commit without a response.
	MeteringTimeout time.Duration
	// MeteringAttempts is how many times a Metering call is made before an
	// UNAVAILABLE or timed-out result is final.
	MeteringAttempts int
	// MeteringBackoff is the pause before the first retry of a Metering
	// call.
	MeteringBackoff time.Duration
	// Now returns the current time for the create and update times of rows.
	// Nil selects time.Now.
	Now func() time.Time
	// Logger receives the errors that are not returned to a caller, such as
	// a failed release. Nil discards them.
	Logger *slog.Logger
	// WriteHook, when set, runs in the transaction of every guarded create
	// after its rows are written and before Metering's commit. An error
	// from it fails the write as a database error would: the transaction is
	// rolled back and the reservation released. Tests use it to inject
	// failures; production leaves it nil.
	WriteHook func(ctx context.Context, w Write) error
}

// Write describes a guarded create to Config.WriteHook.
type Write struct {
	AccountID string
	// Operation is the RPC method name, such as "CreateTask".
	Operation string
	// ResourceID is the id of the row being created.
	ResourceID string
}

// Validate checks c and returns every problem found, joined with
// errors.Join, or nil.
func (c Config) Validate() error {
	var errs []error

	if c.Pool == nil {
		errs = append(errs, errors.New("Pool is required"))
	}
	if c.Metering == nil {
		errs = append(errs, errors.New("Metering is required"))
	}
	if c.BlobDir == "" {
		errs = append(errs, errors.New("BlobDir is required"))
	}
	for _, ttl := range []struct {
		name  string
		value time.Duration
	}{
		{"ReservationTTL", c.ReservationTTL},
		{"UploadReservationTTL", c.UploadReservationTTL},
	} {
		if ttl.value != 0 && (ttl.value < MinReservationTTL || ttl.value > MaxReservationTTL) {
			errs = append(errs, fmt.Errorf("%s is %s; it must be zero (the default) or from %s to %s", ttl.name, ttl.value, MinReservationTTL, MaxReservationTTL))
		}
	}
	if c.MaxUploadBytes < 0 {
		errs = append(errs, fmt.Errorf("MaxUploadBytes is %d; it must not be negative", c.MaxUploadBytes))
	}
	if c.UploadIdleTimeout < 0 {
		errs = append(errs, fmt.Errorf("UploadIdleTimeout is %s; it must not be negative", c.UploadIdleTimeout))
	}
	if c.MeteringTimeout < 0 {
		errs = append(errs, fmt.Errorf("MeteringTimeout is %s; it must not be negative", c.MeteringTimeout))
	}
	if c.MeteringAttempts < 0 {
		errs = append(errs, fmt.Errorf("MeteringAttempts is %d; it must not be negative", c.MeteringAttempts))
	}
	if c.MeteringBackoff < 0 {
		errs = append(errs, fmt.Errorf("MeteringBackoff is %s; it must not be negative", c.MeteringBackoff))
	}

	return errors.Join(errs...)
}

// withDefaults returns c with every zero optional field set to its default.
func (c Config) withDefaults() Config {
	if c.ReservationTTL == 0 {
		c.ReservationTTL = DefaultReservationTTL
	}
	if c.UploadReservationTTL == 0 {
		c.UploadReservationTTL = DefaultUploadReservationTTL
	}
	if c.MaxUploadBytes == 0 {
		c.MaxUploadBytes = DefaultMaxUploadBytes
	}
	if c.UploadIdleTimeout == 0 {
		c.UploadIdleTimeout = DefaultUploadIdleTimeout
	}
	if c.MeteringTimeout == 0 {
		c.MeteringTimeout = DefaultMeteringTimeout
	}
	if c.MeteringAttempts == 0 {
		c.MeteringAttempts = DefaultMeteringAttempts
	}
	if c.MeteringBackoff == 0 {
		c.MeteringBackoff = DefaultMeteringBackoff
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}

	return c
}

// Service runs the workspace RPCs. It is safe for concurrent use. Close
// stops its background tasks.
type Service struct {
	cfg    Config
	pool   *pgxpool.Pool
	meter  *meter
	blobs  blobStore
	logger *slog.Logger
	// outageLog limits the log records of an unreachable database or
	// Metering.
	outageLog *rate.Sometimes
	// tasks runs the releases and settlements that outlive a request.
	tasks *tasks
	// reservationUsers counts the attempts that use each reservation.
	reservationUsers *reservationUsers
}

// New validates cfg and returns a Service.
func New(cfg Config) (*Service, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid workspace config: %w", err)
	}
	cfg = cfg.withDefaults()

	return &Service{
		cfg:  cfg,
		pool: cfg.Pool,
		meter: &meter{
			client:   cfg.Metering,
			timeout:  cfg.MeteringTimeout,
			attempts: cfg.MeteringAttempts,
			backoff:  cfg.MeteringBackoff,
		},
		blobs:            blobStore{dir: cfg.BlobDir},
		logger:           cfg.Logger,
		outageLog:        &rate.Sometimes{Interval: outageLogInterval},
		tasks:            newTasks(),
		reservationUsers: &reservationUsers{},
	}, nil
}

// Register registers the four workspace services on r.
func (s *Service) Register(r grpc.ServiceRegistrar) {
	workspacev1.RegisterAgentServiceServer(r, &agentServer{svc: s})
	workspacev1.RegisterTaskServiceServer(r, &taskServer{svc: s})
	workspacev1.RegisterDocumentServiceServer(r, &documentServer{svc: s})
	workspacev1.RegisterMessageServiceServer(r, &messageServer{svc: s})
}

// now returns the current time in UTC at the microsecond precision of
// PostgreSQL, so a returned row equals the stored one.
func (s *Service) now() time.Time {
	return s.cfg.Now().UTC().Truncate(time.Microsecond)
}
