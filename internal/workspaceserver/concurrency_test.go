package workspaceserver_test

import (
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	workspacev1 "github.com/metering/metering/gen/workspace/v1"
)

// concurrentCreates is the number of creates sent at once.
const concurrentCreates = 64

// runConcurrently calls create concurrentCreates times at once and returns
// the number of successes and of RESOURCE_EXHAUSTED errors. Any other error
// fails the test.
func runConcurrently(t *testing.T, create func(i int) error) (ok, exhausted int) {
	t.Helper()
	start := make(chan struct{})
	codesSeen := make(chan codes.Code, concurrentCreates)
	var wg sync.WaitGroup
	for i := range concurrentCreates {
		wg.Go(func() {
			<-start
			codesSeen <- status.Code(create(i))
		})
	}
	close(start)
	wg.Wait()
	close(codesSeen)

	for code := range codesSeen {
		switch code {
		case codes.OK:
			ok++
		case codes.ResourceExhausted:
			exhausted++
		default:
			t.Errorf("unexpected code %s", code)
		}
	}

	return ok, exhausted
}

func TestConcurrentCreatesAtLimitGiveExactlyLimit(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})

	t.Run("agents", func(t *testing.T) {
		account := s.newAccount("agents")
		user := s.user(account)

		ok, exhausted := runConcurrently(t, func(int) error {
			_, err := s.agents.CreateAgent(user, &workspacev1.CreateAgentRequest{AccountId: account, Name: "racer"})
			return err
		})

		assert.Equal(t, agentLimit, ok)
		assert.Equal(t, concurrentCreates-agentLimit, exhausted)
		assert.Equal(t, agentLimit, s.rows(t, "agents", account))
		assert.Equal(t, counter{used: agentLimit}, s.usage(t, account, meteringv1.Metric_METRIC_AGENTS, ""))
	})

	for _, path := range paths {
		t.Run("tasks by "+path, func(t *testing.T) {
			account := s.newAccount(path)
			c := s.newCaller(t, path, account)

			ok, exhausted := runConcurrently(t, func(int) error {
				_, err := s.tasks.CreateTask(c.ctx, &workspacev1.CreateTaskRequest{AccountId: account, Title: "racer"})
				return err
			})

			assert.Equal(t, taskLimit, ok)
			assert.Equal(t, concurrentCreates-taskLimit, exhausted)
			assert.Equal(t, taskLimit, s.rows(t, "tasks", account))
			assert.Equal(t, counter{used: taskLimit}, s.usage(t, account, meteringv1.Metric_METRIC_TASKS, ""))
		})

		t.Run("documents in one task by "+path, func(t *testing.T) {
			account := s.newAccount(path)
			c := s.newCaller(t, path, account)
			task, err := s.tasks.CreateTask(c.ctx, &workspacev1.CreateTaskRequest{AccountId: account, Title: "crowded"})
			require.NoError(t, err)
			taskID := task.GetTask().GetId()

			ok, exhausted := runConcurrently(t, func(int) error {
				_, err := s.documents.CreateDocument(c.ctx, &workspacev1.CreateDocumentRequest{
					AccountId: account, TaskId: taskID, Name: "racer", Kind: workspacev1.DocumentKind_DOCUMENT_KIND_FILE,
				})
				return err
			})

			assert.Equal(t, documentsPerTask, ok)
			assert.Equal(t, concurrentCreates-documentsPerTask, exhausted)
			assert.Equal(t, documentsPerTask, s.rows(t, "documents", account))
			assert.Equal(t, counter{used: documentsPerTask}, s.usage(t, account, meteringv1.Metric_METRIC_DOCUMENTS, taskID))
		})
	}

	t.Run("upserts of one key", func(t *testing.T) {
		account := s.newAccount("upsert")
		user := s.user(account)

		var created sync.Map
		ok, exhausted := runConcurrently(t, func(i int) error {
			resp, err := s.documents.UpsertDocument(user, &workspacev1.UpsertDocumentRequest{AccountId: account, Key: "shared", Name: "shared.md"})
			if err == nil && resp.GetCreated() {
				created.Store(i, true)
			}
			return err
		})

		assert.Equal(t, concurrentCreates, ok)
		assert.Zero(t, exhausted)
		n := 0
		created.Range(func(any, any) bool { n++; return true })
		assert.Equal(t, 1, n, "exactly one upsert creates")
		assert.Equal(t, 1, s.rows(t, "documents", account))
		assert.Equal(t, counter{used: 1}, s.usage(t, account, meteringv1.Metric_METRIC_DOCUMENTS, ""))
	})
}
