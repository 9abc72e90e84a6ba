package workspaceserver_test

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	workspacev1 "github.com/metering/metering/gen/workspace/v1"
	"github.com/metering/metering/internal/workspace"
)

// errInjected is the write failure the tests inject through the write hook.
var errInjected = errors.New("injected write failure")

func TestRequestIDRetryCreatesAndCountsOnce(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})

	for _, path := range paths {
		t.Run(path, func(t *testing.T) {
			account := s.newAccount(path)
			c := s.newCaller(t, path, account)
			user := s.user(account)

			agentReq := &workspacev1.CreateAgentRequest{AccountId: account, Name: "twin", RequestId: "agent-1"}
			firstAgent, err := s.agents.CreateAgent(user, agentReq)
			require.NoError(t, err)
			againAgent, err := s.agents.CreateAgent(user, agentReq)
			require.NoError(t, err)
			assert.Equal(t, firstAgent.GetAgent().GetId(), againAgent.GetAgent().GetId())
			assert.Empty(t, againAgent.GetRuntimeToken(), "a replay carries no token: only its hash is stored")

			taskReq := &workspacev1.CreateTaskRequest{AccountId: account, Title: "once", RequestId: "task-1"}
			firstTask, err := s.tasks.CreateTask(c.ctx, taskReq)
			require.NoError(t, err)
			againTask, err := s.tasks.CreateTask(c.ctx, taskReq)
			require.NoError(t, err)
			assert.Equal(t, firstTask.GetTask().GetId(), againTask.GetTask().GetId())

			docReq := &workspacev1.CreateDocumentRequest{
				AccountId: account, TaskId: firstTask.GetTask().GetId(), Name: "once.md", Kind: workspacev1.DocumentKind_DOCUMENT_KIND_FILE, RequestId: "doc-1",
			}
			firstDoc, err := s.documents.CreateDocument(c.ctx, docReq)
			require.NoError(t, err)
			againDoc, err := s.documents.CreateDocument(c.ctx, docReq)
			require.NoError(t, err)
			assert.Equal(t, firstDoc.GetDocument().GetId(), againDoc.GetDocument().GetId())

			dupReq := &workspacev1.DuplicateDocumentRequest{AccountId: account, DocumentId: firstDoc.GetDocument().GetId(), RequestId: "dup-1"}
			firstDup, err := s.documents.DuplicateDocument(c.ctx, dupReq)
			require.NoError(t, err)
			againDup, err := s.documents.DuplicateDocument(c.ctx, dupReq)
			require.NoError(t, err)
			assert.Equal(t, firstDup.GetDocument().GetId(), againDup.GetDocument().GetId())

			msgReq := &workspacev1.CreateMessageRequest{AccountId: account, Body: "once", RequestId: "msg-1"}
			firstMsg, err := s.messages.CreateMessage(c.ctx, msgReq)
			require.NoError(t, err)
			againMsg, err := s.messages.CreateMessage(c.ctx, msgReq)
			require.NoError(t, err)
			assert.Equal(t, firstMsg.GetMessage().GetId(), againMsg.GetMessage().GetId())

			snap := s.snapshot(t, account, firstTask.GetTask().GetId())
			assert.Equal(t, int64(2), snap["agents"], "the caller's agent and the twin")
			assert.Equal(t, int64(1), snap["tasks"])
			assert.Equal(t, int64(2), snap["documents"], "the document and its copy")
			assert.Equal(t, int64(2), snap["documents/task"])
			assert.Equal(t, int64(1), snap["messages"])
			assert.Equal(t, 1, s.rows(t, "tasks", account))
			assert.Equal(t, 2, s.rows(t, "documents", account))

			taskReq.Title = "another title"
			_, err = s.tasks.CreateTask(c.ctx, taskReq)
			st := requireCode(t, codes.InvalidArgument, err)
			assert.Equal(t, []string{"request_id"}, badFields(st), "a request id reused for another request")

			_, err = s.agents.DeleteAgent(user, &workspacev1.DeleteAgentRequest{AccountId: account, AgentId: firstAgent.GetAgent().GetId()})
			require.NoError(t, err)
			_, err = s.agents.CreateAgent(user, agentReq)
			st = requireCode(t, codes.FailedPrecondition, err)
			assert.Equal(t, workspace.ReasonRequestResourceDeleted, errorInfoReason(st))
			assert.Equal(t, int64(1), s.used(t, account, meteringv1.Metric_METRIC_AGENTS), "the retry after the delete creates nothing")
		})
	}
}

func TestFailedWriteReleasesAndRetrySucceeds(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})

	for _, path := range paths {
		t.Run(path, func(t *testing.T) {
			account := s.newAccount(path)
			c := s.newCaller(t, path, account)
			var failures atomic.Int64
			failures.Store(3)
			s.hooks.set(account, func(workspace.Write) error {
				if failures.Add(-1) >= 0 {
					return errInjected
				}
				return nil
			})

			req := &workspacev1.CreateTaskRequest{AccountId: account, Title: "flaky", RequestId: "flaky-1"}
			for range 3 {
				_, err := s.tasks.CreateTask(c.ctx, req)
				st := requireCode(t, codes.Internal, err)
				assert.Equal(t, "internal error", st.Message(), "the cause is logged, not sent")
				assert.Equal(t, counter{}, s.usage(t, account, meteringv1.Metric_METRIC_TASKS, ""), "the reservation is released")
				assert.Equal(t, 0, s.rows(t, "tasks", account))
			}

			resp, err := s.tasks.CreateTask(c.ctx, req)
			require.NoError(t, err, "the fourth attempt of the same request id succeeds")
			again, err := s.tasks.CreateTask(c.ctx, req)
			require.NoError(t, err)
			assert.Equal(t, resp.GetTask().GetId(), again.GetTask().GetId())
			assert.Equal(t, counter{used: 1}, s.usage(t, account, meteringv1.Metric_METRIC_TASKS, ""))
			assert.Equal(t, 1, s.rows(t, "tasks", account))

			// An upload whose write fails after its file was placed leaves no
			// file behind.
			messageID := s.newMessage(t, c, account)
			failures.Store(1)
			_, err = upload(c.ctx, s.messages, account, &workspacev1.UploadHeader{MessageId: messageID, FileName: "f", Size: 50}, make([]byte, 50), 50)
			requireCode(t, codes.Internal, err)
			assert.Equal(t, counter{}, s.usage(t, account, meteringv1.Metric_METRIC_STORAGE_BYTES, ""))
			assert.Equal(t, 0, s.rows(t, "attachments", account))

			// A message is counted after its insert; a failed insert counts
			// nothing.
			failures.Store(1)
			_, err = s.messages.CreateMessage(c.ctx, &workspacev1.CreateMessageRequest{AccountId: account, Body: "lost"})
			requireCode(t, codes.Internal, err)
			assert.Equal(t, int64(1), s.used(t, account, meteringv1.Metric_METRIC_MESSAGES), "only the message of the upload")
		})
	}

	assert.Empty(t, s.blobFiles(t))
}

func TestExpiredReservationUndoesCreate(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{reservationTTL: time.Second})
	account := s.newAccount("expiry")
	c := s.newCaller(t, "user", account)
	for range taskLimit - 1 {
		_, err := s.tasks.CreateTask(c.ctx, &workspacev1.CreateTaskRequest{AccountId: account, Title: "filler"})
		require.NoError(t, err)
	}

	// The first write outlives its reservation, and meanwhile another
	// create takes the last free task.
	var calls atomic.Int64
	var otherErr error
	s.hooks.set(account, func(workspace.Write) error {
		if calls.Add(1) > 1 {
			return nil
		}
		time.Sleep(1200 * time.Millisecond)
		_, otherErr = s.tasks.CreateTask(c.ctx, &workspacev1.CreateTaskRequest{AccountId: account, Title: "quick"})
		return nil
	})

	_, err := s.tasks.CreateTask(c.ctx, &workspacev1.CreateTaskRequest{AccountId: account, Title: "slow"})

	require.NoError(t, otherErr)
	st := requireCode(t, codes.ResourceExhausted, err)
	assert.Contains(t, st.Message(), "reservation expired")
	assert.Equal(t, "RESERVATION_EXPIRED", errorInfoReason(st), "Metering's details are passed on")
	assert.Equal(t, taskLimit, s.rows(t, "tasks", account), "the slow task was rolled back")
	assert.Equal(t, counter{used: taskLimit}, s.usage(t, account, meteringv1.Metric_METRIC_TASKS, ""))
}
