package workspaceserver_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	workspacev1 "github.com/metering/metering/gen/workspace/v1"
	"github.com/metering/metering/internal/workspace"
)

// settleTimeout bounds the wait for a create or delete to converge after
// Metering responds again.
const settleTimeout = 15 * time.Second

// holdOnFirstWrite makes the proxy hold Metering's responses from the first
// guarded write of the account on, so Metering applies the commit that
// follows but its response does not arrive.
func holdOnFirstWrite(t *testing.T, s *stack, p *proxy, account string) {
	t.Helper()
	var held atomic.Bool
	s.hooks.set(account, func(workspace.Write) error {
		if held.CompareAndSwap(false, true) {
			p.hold(true)
		}
		return nil
	})
	t.Cleanup(func() { p.hold(false) })
}

func TestClientDeadlineDuringCommitKeepsCreate(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	p := startProxy(t, s.meteringAddr)
	_, conn := s.startWorkspace(p.addr, stackOptions{})
	held := newClients(conn)
	account := s.newAccount("deadline")
	user := s.user(account)
	holdOnFirstWrite(t, s, p, account)
	req := &workspacev1.CreateAgentRequest{AccountId: account, Name: "late", RequestId: "late-1"}

	ctx, cancel := context.WithTimeout(user, 800*time.Millisecond)
	defer cancel()
	_, err := held.agents.CreateAgent(ctx, req)
	requireCode(t, codes.DeadlineExceeded, err)
	p.hold(false)

	// Metering applied the commit before its response was held, so the agent
	// must exist once the response arrives.
	waitFor(settleTimeout, func() bool { return s.rows(t, "agents", account) == 1 })
	assert.Equal(t, 1, s.rows(t, "agents", account), "the row of the counted agent")
	assert.Equal(t, counter{used: 1}, s.usage(t, account, meteringv1.Metric_METRIC_AGENTS, ""))

	again, err := held.agents.CreateAgent(user, req)
	require.NoError(t, err)
	assert.Equal(t, "late", again.GetAgent().GetName(), "a retry returns the agent")
	assert.Equal(t, counter{used: 1}, s.usage(t, account, meteringv1.Metric_METRIC_AGENTS, ""), "and counts nothing")
}

func TestClientDeadlineDuringReserveFreesCapacity(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	p := startProxy(t, s.meteringAddr)
	_, conn := s.startWorkspace(p.addr, stackOptions{})
	held := newClients(conn)
	account := s.newAccount("reserve-deadline")
	t.Cleanup(func() { p.hold(false) })
	// The connection to Metering is made lazily, and a held handshake would
	// keep the reservation from being sent at all.
	_, err := held.tasks.CreateTask(s.user(account), &workspacev1.CreateTaskRequest{AccountId: account, Title: "warm-up"})
	require.NoError(t, err)

	p.hold(true)
	ctx, cancel := context.WithTimeout(s.user(account), 500*time.Millisecond)
	defer cancel()
	_, err = held.tasks.CreateTask(ctx, &workspacev1.CreateTaskRequest{AccountId: account, Title: "gone"})
	requireCode(t, codes.DeadlineExceeded, err)
	assert.Equal(t, counter{used: 1, reserved: 1}, s.usage(t, account, meteringv1.Metric_METRIC_TASKS, ""), "Metering made the reservation")
	p.hold(false)

	// The server learns the reservation's id once the response arrives, and
	// releases it, since the client has gone.
	waitFor(settleTimeout, func() bool { return s.usage(t, account, meteringv1.Metric_METRIC_TASKS, "") == counter{used: 1} })
	assert.Equal(t, counter{used: 1}, s.usage(t, account, meteringv1.Metric_METRIC_TASKS, ""), "nothing stays reserved until the TTL")
	assert.Equal(t, 1, s.rows(t, "tasks", account))
}

func TestUnansweredCommitSettledInBackground(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	p := startProxy(t, s.meteringAddr)
	_, conn := s.startWorkspace(p.addr, stackOptions{meteringTimeout: time.Second})
	held := newClients(conn)
	account := s.newAccount("unanswered")
	user := s.user(account)
	holdOnFirstWrite(t, s, p, account)
	req := &workspacev1.CreateTaskRequest{AccountId: account, Title: "unanswered", RequestId: "task-1"}

	start := time.Now()
	_, err := held.tasks.CreateTask(user, req)
	elapsed := time.Since(start)

	st := requireCode(t, codes.Unavailable, err)
	assert.Contains(t, st.Message(), "completed or undone in the background")
	assert.Less(t, elapsed, 4*time.Second, "the commit and the release that settles it wait one Metering timeout each")

	// The commit reached Metering, which counted it; the background task
	// learns that once Metering responds, and writes the task again.
	p.hold(false)
	waitFor(settleTimeout, func() bool { return s.rows(t, "tasks", account) == 1 })
	assert.Equal(t, 1, s.rows(t, "tasks", account))
	assert.Equal(t, counter{used: 1}, s.usage(t, account, meteringv1.Metric_METRIC_TASKS, ""))
	assert.Contains(t, s.logs.String(), "create settled in the background: Metering counted it")

	again, err := held.tasks.CreateTask(user, req)
	require.NoError(t, err)
	assert.Equal(t, "unanswered", again.GetTask().GetTitle())
	assert.Equal(t, counter{used: 1}, s.usage(t, account, meteringv1.Metric_METRIC_TASKS, ""))
}

func TestClientDeadlineDuringDeleteKeepsCountersEqualRows(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	p := startProxy(t, s.meteringAddr)
	_, conn := s.startWorkspace(p.addr, stackOptions{})
	held := newClients(conn)
	account := s.newAccount("delete-deadline")
	user := s.user(account)
	created, err := held.agents.CreateAgent(user, &workspacev1.CreateAgentRequest{AccountId: account, Name: "doomed"})
	require.NoError(t, err)
	t.Cleanup(func() { p.hold(false) })

	p.hold(true)
	ctx, cancel := context.WithTimeout(user, 800*time.Millisecond)
	defer cancel()
	_, err = held.agents.DeleteAgent(ctx, &workspacev1.DeleteAgentRequest{AccountId: account, AgentId: created.GetAgent().GetId()})
	requireCode(t, codes.DeadlineExceeded, err)
	p.hold(false)

	// Metering recorded the deletion before its response was held, so the row
	// must go.
	waitFor(settleTimeout, func() bool { return s.rows(t, "agents", account) == 0 })
	assert.Equal(t, 0, s.rows(t, "agents", account))
	assert.Equal(t, counter{used: 0}, s.usage(t, account, meteringv1.Metric_METRIC_AGENTS, ""))
}

func TestStalledMeteringLeavesConnectionsFree(t *testing.T) {
	t.Parallel()
	const stalled = 4 // pgx's default pool size on up to 4 CPUs
	s := startStack(t, stackOptions{})
	p := startProxy(t, s.meteringAddr)
	_, conn := s.startWorkspace(p.addr, stackOptions{meteringTimeout: time.Second})
	held := newClients(conn)
	account := s.newAccount("stalled")
	user := s.user(account)
	agent, err := held.agents.CreateAgent(user, &workspacev1.CreateAgentRequest{AccountId: account, Name: "worker"})
	require.NoError(t, err)
	t.Cleanup(func() { p.hold(false) })

	// Each create holds its transaction open in the write hook until all
	// are in, and then Metering stops responding.
	var arrived atomic.Int64
	allIn := make(chan struct{})
	s.hooks.set(account, func(workspace.Write) error {
		if arrived.Add(1) == stalled {
			p.hold(true)
			close(allIn)
		}
		select {
		case <-allIn:
		case <-time.After(10 * time.Second):
		}
		return nil
	})

	durations := make([]time.Duration, stalled)
	errs := make([]error, stalled)
	var wg sync.WaitGroup
	for i := range stalled {
		wg.Go(func() {
			start := time.Now()
			_, errs[i] = held.tasks.CreateTask(user, &workspacev1.CreateTaskRequest{
				AccountId: account, Title: "stalled", RequestId: fmt.Sprintf("stalled-%d", i),
			})
			durations[i] = time.Since(start)
		})
	}
	select {
	case <-allIn:
	case <-time.After(10 * time.Second):
		t.Fatal("the creates did not reach their write")
	}

	// Neither a folder, which Metering does not count, nor a runtime token
	// check needs Metering, so both get a connection at once.
	start := time.Now()
	_, err = held.documents.CreateDocument(user, &workspacev1.CreateDocumentRequest{
		AccountId: account, Name: "folder", Kind: workspacev1.DocumentKind_DOCUMENT_KIND_FOLDER,
	})
	require.NoError(t, err)
	_, err = held.documents.CreateDocument(runtime(agent.GetRuntimeToken()), &workspacev1.CreateDocumentRequest{
		AccountId: account, Name: "folder by the worker", Kind: workspacev1.DocumentKind_DOCUMENT_KIND_FOLDER,
	})
	require.NoError(t, err)
	assert.Less(t, time.Since(start), time.Second, "the folders did not wait for a connection")

	wg.Wait()
	for i := range stalled {
		assert.Equal(t, codes.Unavailable.String(), status.Code(errs[i]).String(), "create %d: %v", i, errs[i])
		assert.Less(t, durations[i], 4*time.Second, "create %d ends after a commit and a release of one Metering timeout each", i)
	}

	// Once Metering responds, the background tasks write the counted tasks
	// and the retries return them.
	p.hold(false)
	waitFor(settleTimeout, func() bool { return s.rows(t, "tasks", account) == stalled })
	for i := range stalled {
		_, err := held.tasks.CreateTask(user, &workspacev1.CreateTaskRequest{
			AccountId: account, Title: "stalled", RequestId: fmt.Sprintf("stalled-%d", i),
		})
		assert.NoError(t, err, "retry %d", i)
	}
	assert.Equal(t, stalled, s.rows(t, "tasks", account))
	assert.Equal(t, counter{used: stalled}, s.usage(t, account, meteringv1.Metric_METRIC_TASKS, ""))
}

// failCommits installs a deferred constraint trigger that makes the COMMIT
// of a transaction that inserted into table fail for the accounts in
// ws_test_failing, and returns a function that arms it for the next n
// commits of the account.
func failCommits(t *testing.T, s *stack, table string) func(account string, n int) {
	t.Helper()
	ctx := context.Background()
	_, err := s.pool.Exec(ctx, `
		CREATE TABLE IF NOT EXISTS public.ws_test_failing (account_id text PRIMARY KEY, fail_through bigint NOT NULL);
		CREATE SEQUENCE IF NOT EXISTS public.ws_test_commits;
		CREATE OR REPLACE FUNCTION public.ws_test_fail_commit() RETURNS trigger LANGUAGE plpgsql AS $$
		DECLARE
			through bigint;
		BEGIN
			SELECT fail_through INTO through FROM public.ws_test_failing WHERE account_id = NEW.account_id;
			IF FOUND AND nextval('public.ws_test_commits') <= through THEN
				RAISE EXCEPTION 'injected commit failure';
			END IF;
			RETURN NULL;
		END $$;
		CREATE CONSTRAINT TRIGGER ws_test_fail_commit AFTER INSERT ON workspace.`+table+`
			DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.ws_test_fail_commit();`)
	require.NoError(t, err)

	return func(account string, n int) {
		_, err := s.pool.Exec(ctx, `
			INSERT INTO public.ws_test_failing VALUES ($1, nextval('public.ws_test_commits') + $2)
			ON CONFLICT (account_id) DO UPDATE SET fail_through = excluded.fail_through`, account, n)
		require.NoError(t, err)
	}
}

func TestRetryAfterCountedUploadWithoutRowConverges(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	failNext := failCommits(t, s, "attachments")

	for _, path := range paths {
		t.Run(path, func(t *testing.T) {
			account := s.newAccount(path)
			c := s.newCaller(t, path, account)
			header := &workspacev1.UploadHeader{MessageId: s.newMessage(t, c, account), FileName: "a.bin", Size: 100, IdempotencyKey: "upload-1"}
			data := bytes.Repeat([]byte{'x'}, 100)

			// The first attempt sends 60 bytes, which Metering counts, and
			// then neither its COMMIT nor the second write of its row
			// succeeds.
			failNext(account, 1000)
			_, err := upload(c.ctx, s.messages, account, header, data[:60], 60)
			requireCode(t, codes.Internal, err)
			assert.Equal(t, counter{used: 60}, s.usage(t, account, meteringv1.Metric_METRIC_STORAGE_BYTES, ""), "counted without a row")
			assert.Equal(t, 0, s.rows(t, "attachments", account))
			failNext(account, 0)

			resp, err := upload(c.ctx, s.messages, account, header, data, 50)
			require.NoError(t, err, "a retry with all the bytes completes the upload")
			assert.False(t, resp.GetReplayed())
			assert.Equal(t, int64(100), resp.GetAttachment().GetSize())
			assert.Equal(t, counter{used: 100}, s.usage(t, account, meteringv1.Metric_METRIC_STORAGE_BYTES, ""), "the retry's size replaces the count")
			assert.Equal(t, 1, s.rows(t, "attachments", account))
			stored, err := os.ReadFile(s.blobPath(t, resp.GetAttachment().GetId()))
			require.NoError(t, err)
			assert.Equal(t, data, stored)

			again, err := upload(c.ctx, s.messages, account, header, data, 50)
			require.NoError(t, err)
			assert.True(t, again.GetReplayed())
			assert.Equal(t, counter{used: 100}, s.usage(t, account, meteringv1.Metric_METRIC_STORAGE_BYTES, ""))
		})
	}

	assert.Contains(t, s.logs.String(), "create counted in Metering but its rows could not be written")
	assert.Len(t, s.blobFiles(t), 2, "one file per path: the failed attempts left none")
}

func TestFailedCommitWritesRowsAgain(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	failNext := failCommits(t, s, "agents")
	account := s.newAccount("commit")
	user := s.user(account)

	// No request id: only this request can write the agent it counted.
	failNext(account, 1)
	resp, err := s.agents.CreateAgent(user, &workspacev1.CreateAgentRequest{AccountId: account, Name: "second try"})

	require.NoError(t, err)
	assert.NotEmpty(t, resp.GetRuntimeToken())
	assert.Equal(t, 1, s.rows(t, "agents", account))
	assert.Equal(t, 1, s.rows(t, "agent_tokens", account))
	assert.Equal(t, counter{used: 1}, s.usage(t, account, meteringv1.Metric_METRIC_AGENTS, ""))
	assert.Contains(t, s.logs.String(), "transaction commit failed after Metering counted the create")

	_, err = s.tasks.CreateTask(runtime(resp.GetRuntimeToken()), &workspacev1.CreateTaskRequest{AccountId: account, Title: "t"})
	assert.NoError(t, err, "the runtime token of the written agent works")
}
