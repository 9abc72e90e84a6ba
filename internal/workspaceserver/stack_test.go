package workspaceserver_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	workspacev1 "github.com/metering/metering/gen/workspace/v1"
	"github.com/metering/metering/internal/auth"
	"github.com/metering/metering/internal/pgtest"
	"github.com/metering/metering/internal/server"
	"github.com/metering/metering/internal/workspace"
	"github.com/metering/metering/internal/workspaceserver"
)

const (
	testIssuer   = "workspace-test"
	testAudience = "metering"
	// testPlan is the plan of the accounts the tests create, with small
	// limits that the tests reach.
	testPlan = "ws-test"
	// stopTimeout bounds the wait for a server to stop.
	stopTimeout = 15 * time.Second
)

// Limits of testPlan.
const (
	agentLimit             = 3
	taskLimit              = 10
	documentLimit          = 100
	documentsPerTask       = 3
	storageLimit     int64 = 1000
)

var testSecret = []byte("workspace-test-secret-of-at-least-32-bytes!!")

// stack is Metering and a workspace server on one test database, with
// clients of both.
type stack struct {
	t           *testing.T
	databaseURL string
	pool        *pgxpool.Pool
	secretFile  string
	tokenFile   string
	blobDir     string
	logs        *logBuffer

	meteringAddr string
	metering     meteringv1.MeteringServiceClient
	admin        meteringv1.MeteringAdminServiceClient
	operator     context.Context

	workspaceAddr string
	conn          *grpc.ClientConn
	clients

	hooks *hooks
}

// clients are the clients of one workspace server.
type clients struct {
	agents    workspacev1.AgentServiceClient
	tasks     workspacev1.TaskServiceClient
	documents workspacev1.DocumentServiceClient
	messages  workspacev1.MessageServiceClient
}

func newClients(conn *grpc.ClientConn) clients {
	return clients{
		agents:    workspacev1.NewAgentServiceClient(conn),
		tasks:     workspacev1.NewTaskServiceClient(conn),
		documents: workspacev1.NewDocumentServiceClient(conn),
		messages:  workspacev1.NewMessageServiceClient(conn),
	}
}

// stackOptions change the workspace server of a stack. Zero fields keep
// the defaults of startWorkspace.
type stackOptions struct {
	reservationTTL       time.Duration
	uploadReservationTTL time.Duration
	uploadIdleTimeout    time.Duration
	meteringTimeout      time.Duration
	// meteringAddr replaces the address of Metering, for a workspace that
	// cannot reach it.
	meteringAddr string
}

// startStack starts Metering and a workspace server with its migrations on
// a new database, creates testPlan and issues the workspace's Metering
// token. Both servers stop at the end of the test.
func startStack(t *testing.T, opts stackOptions) *stack {
	t.Helper()
	s := &stack{
		t:           t,
		databaseURL: pgtest.NewDatabase(t),
		logs:        &logBuffer{},
		hooks:       &hooks{byAccount: map[string]func(workspace.Write) error{}},
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("server log:\n%s", s.logs.String())
		}
	})

	dir := t.TempDir()
	s.secretFile = filepath.Join(dir, "jwt-secret")
	require.NoError(t, os.WriteFile(s.secretFile, testSecret, 0o600))
	s.blobDir = filepath.Join(dir, "blobs")

	var err error
	s.pool, err = pgxpool.New(t.Context(), s.databaseURL)
	require.NoError(t, err)
	t.Cleanup(s.pool.Close)

	s.startMetering()
	s.setUpMetering()

	meteringAddr := s.meteringAddr
	if opts.meteringAddr != "" {
		meteringAddr = opts.meteringAddr
	}
	s.workspaceAddr, s.conn = s.startWorkspace(meteringAddr, opts)
	s.clients = newClients(s.conn)

	return s
}

func (s *stack) logger() *slog.Logger {
	return slog.New(slog.NewJSONHandler(s.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// startMetering runs the Metering server on a free port.
func (s *stack) startMetering() {
	t := s.t
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s.meteringAddr = l.Addr().String()

	cfg := server.DefaultConfig()
	cfg.DatabaseURL = s.databaseURL
	cfg.ListenAddr = s.meteringAddr
	cfg.MetricsAddr = ""
	cfg.HealthInterval = 100 * time.Millisecond
	cfg.ShutdownTimeout = 5 * time.Second
	cfg.Auth.JWTIssuer = testIssuer
	cfg.Auth.JWTAudience = testAudience
	cfg.Auth.JWTSecretFile = s.secretFile
	runInBackground(t, "metering", func(ctx context.Context) error {
		return server.Run(ctx, cfg, s.logger(), server.WithGRPCListener(l))
	})

	conn := dial(t, s.meteringAddr)
	s.metering = meteringv1.NewMeteringServiceClient(conn)
	s.admin = meteringv1.NewMeteringAdminServiceClient(conn)
	s.operator = metadata.NewOutgoingContext(context.Background(), s.bearer(auth.DevClaims{Subject: "ops", PlatformAdmin: true}))
}

// setUpMetering creates testPlan and writes the workspace's Metering token
// to a file.
func (s *stack) setUpMetering() {
	t := s.t
	s.upsertPlan(testPlan, storageLimit)

	issued, err := s.admin.IssueServiceToken(s.operator, &meteringv1.IssueServiceTokenRequest{
		Name: "workspace", Scopes: []string{auth.ScopeUsageWrite},
	})
	require.NoError(t, err)
	s.tokenFile = filepath.Join(t.TempDir(), "metering-token")
	require.NoError(t, os.WriteFile(s.tokenFile, []byte(issued.GetPlaintext()+"\n"), 0o600))
}

// upsertPlan creates or updates the plan with the limits of testPlan, but
// storage bytes of storage.
func (s *stack) upsertPlan(id string, storage int64) {
	limit := func(metric meteringv1.Metric, scope meteringv1.LimitScope, max int64) *meteringv1.Limit {
		return &meteringv1.Limit{Metric: metric, Scope: scope, Bound: &meteringv1.Limit_Max{Max: max}}
	}
	_, err := s.admin.UpsertPlan(s.operator, &meteringv1.UpsertPlanRequest{Plan: &meteringv1.Plan{
		Id:          id,
		DisplayName: "Workspace tests",
		Limits: []*meteringv1.Limit{
			limit(meteringv1.Metric_METRIC_AGENTS, meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT, agentLimit),
			limit(meteringv1.Metric_METRIC_TASKS, meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT, taskLimit),
			limit(meteringv1.Metric_METRIC_DOCUMENTS, meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT, documentLimit),
			limit(meteringv1.Metric_METRIC_DOCUMENTS, meteringv1.LimitScope_LIMIT_SCOPE_PARENT, documentsPerTask),
			{Metric: meteringv1.Metric_METRIC_MESSAGES, Scope: meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT, Bound: &meteringv1.Limit_Unlimited{Unlimited: true}},
			limit(meteringv1.Metric_METRIC_STORAGE_BYTES, meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT, storage),
		},
	}})
	require.NoError(s.t, err)
}

// startWorkspace runs a workspace server on a free port that reaches
// Metering at meteringAddr, and returns its address and a connection.
func (s *stack) startWorkspace(meteringAddr string, opts stackOptions) (string, *grpc.ClientConn) {
	t := s.t
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)

	cfg := workspaceserver.DefaultConfig()
	cfg.ListenAddr = l.Addr().String()
	cfg.DatabaseURL = s.databaseURL
	cfg.MeteringAddr = meteringAddr
	cfg.MeteringTokenFile = s.tokenFile
	cfg.BlobDir = s.blobDir
	cfg.MetricsAddr = ""
	cfg.Migrate = true
	cfg.MeteringTimeout = 2 * time.Second
	cfg.HealthInterval = 100 * time.Millisecond
	cfg.ShutdownTimeout = 5 * time.Second
	cfg.Auth.JWTIssuer = testIssuer
	cfg.Auth.JWTAudience = testAudience
	cfg.Auth.JWTSecretFile = s.secretFile
	cfg.Auth.TokenCacheTTL = 50 * time.Millisecond
	if opts.reservationTTL != 0 {
		cfg.ReservationTTL = opts.reservationTTL
	}
	if opts.uploadReservationTTL != 0 {
		cfg.UploadReservationTTL = opts.uploadReservationTTL
	}
	if opts.uploadIdleTimeout != 0 {
		cfg.UploadIdleTimeout = opts.uploadIdleTimeout
	}
	if opts.meteringTimeout != 0 {
		cfg.MeteringTimeout = opts.meteringTimeout
	}

	runInBackground(t, "workspace", func(ctx context.Context) error {
		return workspaceserver.Run(ctx, cfg, s.logger(), workspaceserver.WithGRPCListener(l), workspaceserver.WithWriteHook(s.hooks.run))
	})
	// Run applies the migrations before it serves; the tests read the
	// tables directly, so they wait for them.
	s.waitForSchema()

	return cfg.ListenAddr, dial(t, cfg.ListenAddr)
}

// waitForSchema waits until the workspace migrations have run.
func (s *stack) waitForSchema() {
	require.EventuallyWithT(s.t, func(c *assert.CollectT) {
		var exists bool
		err := s.pool.QueryRow(context.Background(), "SELECT to_regclass('workspace.requests') IS NOT NULL").Scan(&exists)
		require.NoError(c, err)
		assert.True(c, exists)
	}, stopTimeout, 10*time.Millisecond)
}

// runInBackground runs fn until the end of the test, then cancels its
// context and checks that it returned nil.
func runInBackground(t *testing.T, name string, fn func(ctx context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()

	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			assert.NoError(t, err, "%s server", name)
		case <-time.After(stopTimeout):
			t.Errorf("%s server did not stop within %s", name, stopTimeout)
		}
	})
}

func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })

	return conn
}

func (s *stack) bearer(claims auth.DevClaims) metadata.MD {
	token, err := auth.MintDevJWT(testSecret, testIssuer, testAudience, claims, time.Now(), time.Hour)
	require.NoError(s.t, err)

	return metadata.Pairs(auth.MetadataAuthorization, "Bearer "+token)
}

// newAccount puts a new account on testPlan, anchored a day ago so that the
// billing period does not end during the test.
func (s *stack) newAccount(name string) string {
	account := name + "-" + workspaceTestSuffix()
	_, err := s.admin.SetAccountPlan(s.operator, &meteringv1.SetAccountPlanRequest{
		AccountId:     account,
		PlanId:        testPlan,
		BillingAnchor: timestamppb.New(time.Now().Add(-24 * time.Hour)),
	})
	require.NoError(s.t, err)

	return account
}

// user returns a context with the JWT of member alice of account.
func (s *stack) user(account string) context.Context {
	return metadata.NewOutgoingContext(context.Background(),
		s.bearer(auth.DevClaims{Subject: "alice", AccountID: account, Role: auth.RoleMember}))
}

// workspaceTestSuffix returns 8 random characters that keep the accounts of
// the tests of one stack apart.
func workspaceTestSuffix() string {
	return strings.ToLower(rand.Text()[:8])
}

// runtime returns a context with a runtime token.
func runtime(token string) context.Context {
	return metadata.NewOutgoingContext(context.Background(), metadata.Pairs(auth.MetadataServiceToken, token))
}

// counter is one counter of GetCurrentUsage.
type counter struct {
	used     int64
	reserved int64
}

// usage returns the account's counter of metric, or the counter of the
// parent when parent is set.
func (s *stack) usage(t testing.TB, account string, metric meteringv1.Metric, parent string) counter {
	t.Helper()
	resp, err := s.metering.GetCurrentUsage(s.operator, &meteringv1.GetCurrentUsageRequest{AccountId: account, ParentId: parent})
	require.NoError(t, err)

	for _, u := range resp.GetUsage() {
		if u.GetMetric() != metric {
			continue
		}
		if parent == "" && u.GetScope() == meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT ||
			parent != "" && u.GetScope() == meteringv1.LimitScope_LIMIT_SCOPE_PARENT && u.GetParentId() == parent {
			return counter{used: u.GetUsed(), reserved: u.GetReserved()}
		}
	}

	return counter{}
}

// used returns the used amount of the account's counter of metric.
func (s *stack) used(t testing.TB, account string, metric meteringv1.Metric) int64 {
	t.Helper()

	return s.usage(t, account, metric, "").used
}

// rows returns the number of rows of the account in a workspace table.
func (s *stack) rows(t testing.TB, table, account string) int {
	t.Helper()
	var n int
	err := s.pool.QueryRow(context.Background(), "SELECT count(*) FROM workspace."+table+" WHERE account_id = $1", account).Scan(&n)
	require.NoError(t, err)

	return n
}

// blobFiles returns the names of the files in the blob directory.
func (s *stack) blobFiles(t testing.TB) []string {
	t.Helper()
	entries, err := os.ReadDir(s.blobDir)
	require.NoError(t, err)

	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}

	return names
}

// blobPath returns the path of the file with the bytes of the attachment.
func (s *stack) blobPath(t testing.TB, attachmentID string) string {
	t.Helper()
	var name string
	err := s.pool.QueryRow(context.Background(), "SELECT coalesce(blob_name, id) FROM workspace.attachments WHERE id = $1", attachmentID).Scan(&name)
	require.NoError(t, err)

	return filepath.Join(s.blobDir, name)
}

// hooks runs a write hook per account, so the tests that share a stack
// inject failures into their own account only.
type hooks struct {
	mu        sync.Mutex
	byAccount map[string]func(workspace.Write) error
}

func (h *hooks) set(account string, hook func(workspace.Write) error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.byAccount[account] = hook
}

func (h *hooks) run(_ context.Context, w workspace.Write) error {
	h.mu.Lock()
	hook := h.byAccount[w.AccountID]
	h.mu.Unlock()

	if hook == nil {
		return nil
	}

	return hook(w)
}

// upload sends an upload: the header, then data in chunks of chunkSize.
func upload(ctx context.Context, client workspacev1.MessageServiceClient, account string, header *workspacev1.UploadHeader, data []byte, chunkSize int) (*workspacev1.UploadAttachmentResponse, error) {
	stream, err := client.UploadAttachment(ctx)
	if err != nil {
		return nil, err
	}

	err = stream.Send(&workspacev1.UploadAttachmentRequest{
		AccountId: account,
		Payload:   &workspacev1.UploadAttachmentRequest_Header{Header: header},
	})
	for len(data) > 0 && err == nil {
		n := min(chunkSize, len(data))
		err = stream.Send(&workspacev1.UploadAttachmentRequest{Payload: &workspacev1.UploadAttachmentRequest_Chunk{Chunk: data[:n]}})
		data = data[n:]
	}
	// Send returns io.EOF when the server ended the stream early; the
	// status comes from CloseAndRecv.
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}

	return stream.CloseAndRecv()
}

// waitFor calls cond every 20 ms until it returns true or timeout passes,
// and reports whether it returned true. It runs cond in the test's
// goroutine, so cond may use require.
func waitFor(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}

	return true
}

// requireCode fails the test unless err has the code.
func requireCode(t testing.TB, want codes.Code, err error) *status.Status {
	t.Helper()
	st := status.Convert(err)
	require.Equal(t, want.String(), st.Code().String(), "error: %v", err)

	return st
}

// badFields returns the fields of the BadRequest detail of st.
func badFields(st *status.Status) []string {
	var fields []string
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				fields = append(fields, v.GetField())
			}
		}
	}

	return fields
}

// errorInfoReason returns the reason of the ErrorInfo detail of st.
func errorInfoReason(st *status.Status) string {
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info.GetReason()
		}
	}

	return ""
}

// logBuffer collects log records. It is safe for concurrent use.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()

	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()

	return b.buf.String()
}
