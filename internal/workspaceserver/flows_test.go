package workspaceserver_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"maps"
	"os"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	workspacev1 "github.com/metering/metering/gen/workspace/v1"
	"github.com/metering/metering/internal/workspace"
)

// paths are the two kinds of caller every flow is tested with: a user with a
// JWT, and the runtime worker of an agent with its runtime token.
var paths = []string{"user", "runtime"}

// caller is the context and created_by value of one path in one account.
type caller struct {
	ctx       context.Context
	createdBy string
	agentID   string
}

// newCaller creates an agent as alice, which counts one agent, and returns
// the caller of path: alice, or the agent's runtime worker.
func (s *stack) newCaller(t *testing.T, path, account string) caller {
	t.Helper()
	resp, err := s.agents.CreateAgent(s.user(account), &workspacev1.CreateAgentRequest{AccountId: account, Name: "helper"})
	require.NoError(t, err)
	require.NotEmpty(t, resp.GetRuntimeToken())

	if path == "runtime" {
		return caller{ctx: runtime(resp.GetRuntimeToken()), createdBy: "agent:" + resp.GetAgent().GetId(), agentID: resp.GetAgent().GetId()}
	}

	return caller{ctx: s.user(account), createdBy: "user:alice", agentID: resp.GetAgent().GetId()}
}

// snapshot returns every counter of the account, the documents counter of
// the task under "documents/task", and the sum of the reserved amounts under
// "reserved".
func (s *stack) snapshot(t *testing.T, account, taskID string) map[string]int64 {
	t.Helper()
	resp, err := s.metering.GetCurrentUsage(s.operator, &meteringv1.GetCurrentUsageRequest{AccountId: account, ParentId: taskID})
	require.NoError(t, err)

	names := map[meteringv1.Metric]string{
		meteringv1.Metric_METRIC_AGENTS:        "agents",
		meteringv1.Metric_METRIC_TASKS:         "tasks",
		meteringv1.Metric_METRIC_DOCUMENTS:     "documents",
		meteringv1.Metric_METRIC_MESSAGES:      "messages",
		meteringv1.Metric_METRIC_STORAGE_BYTES: "storage_bytes",
	}
	snap := map[string]int64{"reserved": 0, "documents/task": 0}
	for _, u := range resp.GetUsage() {
		snap["reserved"] += u.GetReserved()
		if u.GetScope() == meteringv1.LimitScope_LIMIT_SCOPE_PARENT {
			snap["documents/task"] = u.GetUsed()
			continue
		}
		snap[names[u.GetMetric()]] = u.GetUsed()
	}

	return snap
}

// assertMoved checks that after differs from before by exactly moved, and
// that every other counter is unchanged.
func assertMoved(t *testing.T, step string, before, after map[string]int64, moved map[string]int64) {
	t.Helper()
	for _, key := range slices.Sorted(maps.Keys(before)) {
		assert.Equal(t, before[key]+moved[key], after[key], "%s: counter %s", step, key)
	}
}

func TestFlowsMoveExactlyTheirCounters(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})

	for _, path := range paths {
		t.Run(path, func(t *testing.T) {
			account := s.newAccount(path)
			c := s.newCaller(t, path, account)
			assert.Equal(t, int64(1), s.used(t, account, meteringv1.Metric_METRIC_AGENTS), "CreateAgent counts one agent")

			taskResp, err := s.tasks.CreateTask(c.ctx, &workspacev1.CreateTaskRequest{AccountId: account, Title: "Write the report"})
			require.NoError(t, err)
			task := taskResp.GetTask()
			assert.Equal(t, c.createdBy, task.GetCreatedBy())
			assert.Equal(t, int64(1), s.used(t, account, meteringv1.Metric_METRIC_TASKS), "CreateTask counts one task")

			step := func(name string, moved map[string]int64, do func() error) {
				t.Helper()
				before := s.snapshot(t, account, task.GetId())
				require.NoError(t, do(), name)
				assertMoved(t, name, before, s.snapshot(t, account, task.GetId()), moved)
			}

			var file, folder *workspacev1.Document
			step("file in a task", map[string]int64{"documents": 1, "documents/task": 1}, func() error {
				resp, err := s.documents.CreateDocument(c.ctx, &workspacev1.CreateDocumentRequest{
					AccountId: account, TaskId: task.GetId(), Name: "notes.md", Kind: workspacev1.DocumentKind_DOCUMENT_KIND_FILE, Content: "# Notes",
				})
				file = resp.GetDocument()
				return err
			})
			assert.Equal(t, c.createdBy, file.GetCreatedBy())
			assert.Equal(t, task.GetId(), file.GetTaskId())

			step("folder in a task", nil, func() error {
				resp, err := s.documents.CreateDocument(c.ctx, &workspacev1.CreateDocumentRequest{
					AccountId: account, TaskId: task.GetId(), Name: "drafts", Kind: workspacev1.DocumentKind_DOCUMENT_KIND_FOLDER,
				})
				folder = resp.GetDocument()
				return err
			})
			assert.Equal(t, workspacev1.DocumentKind_DOCUMENT_KIND_FOLDER, folder.GetKind())

			var copied *workspacev1.Document
			step("duplicate of a file", map[string]int64{"documents": 1, "documents/task": 1}, func() error {
				resp, err := s.documents.DuplicateDocument(c.ctx, &workspacev1.DuplicateDocumentRequest{AccountId: account, DocumentId: file.GetId()})
				copied = resp.GetDocument()
				return err
			})
			assert.NotEqual(t, file.GetId(), copied.GetId())
			assert.Equal(t, "# Notes", copied.GetContent())
			assert.Equal(t, c.createdBy, copied.GetCreatedBy())

			step("duplicate of a folder", nil, func() error {
				_, err := s.documents.DuplicateDocument(c.ctx, &workspacev1.DuplicateDocumentRequest{AccountId: account, DocumentId: folder.GetId()})
				return err
			})

			var upserted *workspacev1.UpsertDocumentResponse
			step("upsert that creates", map[string]int64{"documents": 1}, func() error {
				upserted, err = s.documents.UpsertDocument(c.ctx, &workspacev1.UpsertDocumentRequest{
					AccountId: account, Key: "summary", Name: "summary.md", Content: "v1",
				})
				return err
			})
			assert.True(t, upserted.GetCreated())
			assert.Equal(t, "summary", upserted.GetDocument().GetKey())

			step("upsert that updates", nil, func() error {
				upserted, err = s.documents.UpsertDocument(c.ctx, &workspacev1.UpsertDocumentRequest{
					AccountId: account, Key: "summary", Name: "summary.md", Content: "v2",
				})
				return err
			})
			assert.False(t, upserted.GetCreated())
			assert.Equal(t, "v2", upserted.GetDocument().GetContent())
			assert.Equal(t, 5, s.rows(t, "documents", account), "the update adds no row")

			var msg *workspacev1.Message
			step("message", map[string]int64{"messages": 1}, func() error {
				resp, err := s.messages.CreateMessage(c.ctx, &workspacev1.CreateMessageRequest{AccountId: account, TaskId: task.GetId(), Body: "Done."})
				msg = resp.GetMessage()
				return err
			})
			assert.Equal(t, c.createdBy, msg.GetCreatedBy())

			data := bytes.Repeat([]byte("0123456789"), 10)
			var att *workspacev1.Attachment
			step("upload", map[string]int64{"storage_bytes": 100}, func() error {
				resp, err := upload(c.ctx, s.messages, account, &workspacev1.UploadHeader{MessageId: msg.GetId(), FileName: "digits.txt", Size: 100}, data, 30)
				att = resp.GetAttachment()
				return err
			})
			sum := sha256.Sum256(data)
			assert.Equal(t, hex.EncodeToString(sum[:]), att.GetSha256())
			assert.Equal(t, int64(100), att.GetSize())
			assert.Equal(t, c.createdBy, att.GetCreatedBy())
			blobPath := s.blobPath(t, att.GetId())
			stored, err := os.ReadFile(blobPath)
			require.NoError(t, err)
			assert.Equal(t, data, stored)

			step("delete of a file in a task", map[string]int64{"documents/task": -1}, func() error {
				_, err := s.documents.DeleteDocument(c.ctx, &workspacev1.DeleteDocumentRequest{AccountId: account, DocumentId: file.GetId()})
				return err
			})
			step("delete of a folder", nil, func() error {
				_, err := s.documents.DeleteDocument(c.ctx, &workspacev1.DeleteDocumentRequest{AccountId: account, DocumentId: folder.GetId()})
				return err
			})
			step("delete of an upserted file outside any task", nil, func() error {
				_, err := s.documents.DeleteDocument(c.ctx, &workspacev1.DeleteDocumentRequest{AccountId: account, DocumentId: upserted.GetDocument().GetId()})
				return err
			})
			step("delete of an attachment", map[string]int64{"storage_bytes": -100}, func() error {
				_, err := s.messages.DeleteAttachment(c.ctx, &workspacev1.DeleteAttachmentRequest{AccountId: account, AttachmentId: att.GetId()})
				return err
			})
			assert.NoFileExists(t, blobPath)

			// Agents are deleted by users on both paths.
			step("delete of an agent", map[string]int64{"agents": -1}, func() error {
				_, err := s.agents.DeleteAgent(s.user(account), &workspacev1.DeleteAgentRequest{AccountId: account, AgentId: c.agentID})
				return err
			})
			assert.Equal(t, 0, s.rows(t, "agents", account))
			assert.Equal(t, 0, s.rows(t, "agent_tokens", account), "deleting an agent deletes its runtime tokens")
		})
	}
}

func TestDeleteFreesCapacity(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})

	for _, path := range paths {
		t.Run(path, func(t *testing.T) {
			account := s.newAccount(path)
			c := s.newCaller(t, path, account)
			user := s.user(account)

			// One agent exists already; the limit allows two more.
			var agentIDs []string
			for range agentLimit - 1 {
				resp, err := s.agents.CreateAgent(user, &workspacev1.CreateAgentRequest{AccountId: account, Name: "extra"})
				require.NoError(t, err)
				agentIDs = append(agentIDs, resp.GetAgent().GetId())
			}
			_, err := s.agents.CreateAgent(user, &workspacev1.CreateAgentRequest{AccountId: account, Name: "one too many"})
			requireCode(t, codes.ResourceExhausted, err)

			_, err = s.agents.DeleteAgent(user, &workspacev1.DeleteAgentRequest{AccountId: account, AgentId: agentIDs[0]})
			require.NoError(t, err)
			_, err = s.agents.CreateAgent(user, &workspacev1.CreateAgentRequest{AccountId: account, Name: "in the freed slot"})
			require.NoError(t, err)
			assert.Equal(t, int64(agentLimit), s.used(t, account, meteringv1.Metric_METRIC_AGENTS))

			msg, err := s.messages.CreateMessage(c.ctx, &workspacev1.CreateMessageRequest{AccountId: account, Body: "files"})
			require.NoError(t, err)
			header := func() *workspacev1.UploadHeader {
				return &workspacev1.UploadHeader{MessageId: msg.GetMessage().GetId(), FileName: "big.bin", Size: 600}
			}
			first, err := upload(c.ctx, s.messages, account, header(), make([]byte, 600), 256)
			require.NoError(t, err)
			_, err = upload(c.ctx, s.messages, account, header(), make([]byte, 600), 256)
			requireCode(t, codes.ResourceExhausted, err)

			_, err = s.messages.DeleteAttachment(c.ctx, &workspacev1.DeleteAttachmentRequest{AccountId: account, AttachmentId: first.GetAttachment().GetId()})
			require.NoError(t, err)
			_, err = upload(c.ctx, s.messages, account, header(), make([]byte, 600), 256)
			require.NoError(t, err)
			assert.Equal(t, int64(600), s.used(t, account, meteringv1.Metric_METRIC_STORAGE_BYTES))
		})
	}
}

func TestPerTaskDocumentLimit(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})

	for _, path := range paths {
		t.Run(path, func(t *testing.T) {
			account := s.newAccount(path)
			c := s.newCaller(t, path, account)
			newTask := func() string {
				resp, err := s.tasks.CreateTask(c.ctx, &workspacev1.CreateTaskRequest{AccountId: account, Title: "task"})
				require.NoError(t, err)
				return resp.GetTask().GetId()
			}
			newDocument := func(taskID string, kind workspacev1.DocumentKind) (*workspacev1.CreateDocumentResponse, error) {
				return s.documents.CreateDocument(c.ctx, &workspacev1.CreateDocumentRequest{AccountId: account, TaskId: taskID, Name: "doc", Kind: kind})
			}
			full, other := newTask(), newTask()

			var files []string
			for range documentsPerTask {
				resp, err := newDocument(full, workspacev1.DocumentKind_DOCUMENT_KIND_FILE)
				require.NoError(t, err)
				files = append(files, resp.GetDocument().GetId())
			}

			_, err := newDocument(full, workspacev1.DocumentKind_DOCUMENT_KIND_FILE)
			st := requireCode(t, codes.ResourceExhausted, err)
			assert.Equal(t, "PARENT_LIMIT_EXCEEDED", errorInfoReason(st))
			assert.Contains(t, st.Message(), full)

			_, err = s.documents.DuplicateDocument(c.ctx, &workspacev1.DuplicateDocumentRequest{AccountId: account, DocumentId: files[0]})
			requireCode(t, codes.ResourceExhausted, err)

			_, err = newDocument(full, workspacev1.DocumentKind_DOCUMENT_KIND_FOLDER)
			assert.NoError(t, err, "folders never count, so a full task takes one")
			_, err = newDocument(other, workspacev1.DocumentKind_DOCUMENT_KIND_FILE)
			assert.NoError(t, err, "the limit is per task")
			_, err = s.documents.DuplicateDocument(c.ctx, &workspacev1.DuplicateDocumentRequest{AccountId: account, DocumentId: files[0], TargetTaskId: other})
			assert.NoError(t, err, "a copy into another task counts there")

			_, err = s.documents.DeleteDocument(c.ctx, &workspacev1.DeleteDocumentRequest{AccountId: account, DocumentId: files[0]})
			require.NoError(t, err)
			_, err = newDocument(full, workspacev1.DocumentKind_DOCUMENT_KIND_FILE)
			assert.NoError(t, err, "a deleted file frees its slot in the task")

			assert.Equal(t, counter{used: documentsPerTask}, s.usage(t, account, meteringv1.Metric_METRIC_DOCUMENTS, full))
			assert.Equal(t, counter{used: 2}, s.usage(t, account, meteringv1.Metric_METRIC_DOCUMENTS, other))
			assert.Equal(t, int64(documentsPerTask+3), s.used(t, account, meteringv1.Metric_METRIC_DOCUMENTS),
				"the account counts every file created this period, deleted or not")
		})
	}
}

func TestUpsertDocumentKeepsItsTask(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})

	for _, path := range paths {
		t.Run(path, func(t *testing.T) {
			account := s.newAccount(path)
			c := s.newCaller(t, path, account)
			var taskIDs []string
			for range 2 {
				resp, err := s.tasks.CreateTask(c.ctx, &workspacev1.CreateTaskRequest{AccountId: account, Title: "task"})
				require.NoError(t, err)
				taskIDs = append(taskIDs, resp.GetTask().GetId())
			}
			upsert := func(taskID, content string) (*workspacev1.UpsertDocumentResponse, error) {
				return s.documents.UpsertDocument(c.ctx, &workspacev1.UpsertDocumentRequest{
					AccountId: account, TaskId: taskID, Key: "summary", Name: "summary.md", Content: content,
				})
			}
			created, err := upsert(taskIDs[0], "v1")
			require.NoError(t, err)
			require.True(t, created.GetCreated())

			_, err = upsert(taskIDs[1], "v2")
			st := requireCode(t, codes.FailedPrecondition, err)
			assert.Equal(t, workspace.ReasonDocumentInOtherTask, errorInfoReason(st))
			assert.Contains(t, st.Message(), taskIDs[0])
			assert.Contains(t, st.Message(), taskIDs[1])

			_, err = upsert("tsk_missing", "v3")
			requireCode(t, codes.NotFound, err)

			for _, taskID := range []string{"", taskIDs[0]} {
				updated, err := upsert(taskID, "v4 "+taskID)
				require.NoError(t, err, "task_id %q", taskID)
				assert.False(t, updated.GetCreated())
				assert.Equal(t, taskIDs[0], updated.GetDocument().GetTaskId(), "the document keeps its task")
				assert.Equal(t, "v4 "+taskID, updated.GetDocument().GetContent())
			}

			assert.Equal(t, 1, s.rows(t, "documents", account))
			snap := s.snapshot(t, account, taskIDs[1])
			assert.Equal(t, int64(1), snap["documents"])
			assert.Equal(t, int64(0), snap["documents/task"], "nothing moved to the other task")
		})
	}
}
