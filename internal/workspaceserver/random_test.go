package workspaceserver_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	workspacev1 "github.com/metering/metering/gen/workspace/v1"
	"github.com/metering/metering/internal/workspace"
)

const (
	// randomSteps is the length of the random sequence.
	randomSteps = 600
	// defaultRandomSeed makes the sequence the same in every run unless
	// WORKSPACE_TEST_SEED sets another seed.
	defaultRandomSeed = 20261204
	// randomPlan has limits that the sequence reaches now and then.
	randomPlan = "ws-random"
)

// model is what the random sequence created, as the responses report it.
type model struct {
	agents    map[string]string // live agent id → runtime token
	tasks     []string
	documents map[string]bool // live document id → is a file
	// keys are the live documents that UpsertDocument created: key →
	// document id and its task.
	keys        map[string]upserted
	messages    []string
	attachments map[string]bool // live attachment ids
	// files are the ids of every file created, deleted or not: the
	// account's documents counter counts them for the period.
	files map[string]bool
}

// upserted is a live document that UpsertDocument created.
type upserted struct {
	documentID string
	taskID     string
}

// randomRun is the state of one random sequence.
type randomRun struct {
	t       *testing.T
	s       *stack
	rng     *rand.Rand
	account string
	m       model
	// failNext makes the write of the next guarded create fail.
	failNext atomic.Bool
	// retries are earlier creates with a request id, to send again.
	retries []func() (string, error)
	next    int
}

func TestRandomSequenceKeepsCountersEqualToRows(t *testing.T) {
	t.Parallel()
	seed := uint64(defaultRandomSeed)
	if v := os.Getenv("WORKSPACE_TEST_SEED"); v != "" {
		parsed, err := strconv.ParseUint(v, 10, 64)
		require.NoError(t, err, "WORKSPACE_TEST_SEED")
		seed = parsed
	}
	t.Logf("seed %d (set WORKSPACE_TEST_SEED to repeat another)", seed)

	s := startStack(t, stackOptions{})
	r := &randomRun{
		t:   t,
		s:   s,
		rng: rand.New(rand.NewPCG(seed, seed)),
		m: model{
			agents:      map[string]string{},
			documents:   map[string]bool{},
			keys:        map[string]upserted{},
			attachments: map[string]bool{},
			files:       map[string]bool{},
		},
	}
	r.setUpAccount()
	s.hooks.set(r.account, func(workspace.Write) error {
		if r.failNext.Swap(false) {
			return errInjected
		}
		return nil
	})

	steps := []struct {
		weight int
		run    func(ctx context.Context) (retry bool, err error)
	}{
		{2, r.createAgent},
		{1, r.deleteAgent},
		{3, r.createTask},
		{6, r.createDocument},
		{2, r.duplicateDocument},
		{2, r.upsertDocument},
		{3, r.deleteDocument},
		{3, r.createMessage},
		{3, r.uploadAttachment},
		{2, r.deleteAttachment},
		{3, r.retry},
	}
	total := 0
	for _, step := range steps {
		total += step.weight
	}

	for i := range randomSteps {
		injected := r.rng.IntN(6) == 0
		r.failNext.Store(injected)

		pick := r.rng.IntN(total)
		for _, step := range steps {
			if pick >= step.weight {
				pick -= step.weight
				continue
			}
			retry, err := step.run(r.caller())
			r.checkOutcome(i, err, injected, retry)
			break
		}
	}
	r.failNext.Store(false)

	r.checkCountersEqualRows()
}

// setUpAccount creates randomPlan and an account on it.
func (r *randomRun) setUpAccount() {
	limit := func(metric meteringv1.Metric, scope meteringv1.LimitScope, max int64) *meteringv1.Limit {
		return &meteringv1.Limit{Metric: metric, Scope: scope, Bound: &meteringv1.Limit_Max{Max: max}}
	}
	_, err := r.s.admin.UpsertPlan(r.s.operator, &meteringv1.UpsertPlanRequest{Plan: &meteringv1.Plan{
		Id:          randomPlan,
		DisplayName: "Random sequence",
		Limits: []*meteringv1.Limit{
			limit(meteringv1.Metric_METRIC_AGENTS, meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT, 4),
			limit(meteringv1.Metric_METRIC_TASKS, meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT, 25),
			limit(meteringv1.Metric_METRIC_DOCUMENTS, meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT, 120),
			limit(meteringv1.Metric_METRIC_DOCUMENTS, meteringv1.LimitScope_LIMIT_SCOPE_PARENT, 4),
			limit(meteringv1.Metric_METRIC_MESSAGES, meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT, 1000),
			limit(meteringv1.Metric_METRIC_STORAGE_BYTES, meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT, 3000),
		},
	}})
	require.NoError(r.t, err)

	r.account = "random-" + workspaceTestSuffix()
	_, err = r.s.admin.SetAccountPlan(r.s.operator, &meteringv1.SetAccountPlanRequest{AccountId: r.account, PlanId: randomPlan})
	require.NoError(r.t, err)
}

// checkOutcome fails the test for a result that the step cannot get.
func (r *randomRun) checkOutcome(step int, err error, injected, retry bool) {
	code := status.Code(err)
	switch {
	case code == codes.OK, code == codes.ResourceExhausted:
	case code == codes.Internal && injected:
	// A retry may name a request whose resource, or whose source
	// document, has been deleted since, or come from the runtime worker of
	// an agent deleted since.
	case retry && (code == codes.FailedPrecondition || code == codes.NotFound || code == codes.Unauthenticated):
	default:
		r.t.Errorf("step %d: unexpected error (injected failure %t, retry %t): %v", step, injected, retry, err)
	}
}

// caller returns alice, or the runtime worker of a random live agent.
func (r *randomRun) caller() context.Context {
	if len(r.m.agents) == 0 || r.rng.IntN(2) == 0 {
		return r.s.user(r.account)
	}

	ids := slices.Sorted(mapsKeys(r.m.agents))

	return runtime(r.m.agents[ids[r.rng.IntN(len(ids))]])
}

// requestID returns a new request id half of the time, and "" otherwise.
func (r *randomRun) requestID() string {
	if r.rng.IntN(2) == 0 {
		return ""
	}
	r.next++

	return fmt.Sprintf("req-%d", r.next)
}

// remember keeps a create with a request id for a later retry.
func (r *randomRun) remember(requestID string, create func() (string, error)) {
	if requestID != "" {
		r.retries = append(r.retries, create)
	}
}

func (r *randomRun) createAgent(context.Context) (bool, error) {
	req := &workspacev1.CreateAgentRequest{AccountId: r.account, Name: "agent", RequestId: r.requestID()}
	create := func() (string, error) {
		resp, err := r.s.agents.CreateAgent(r.s.user(r.account), req)
		if err == nil && resp.GetRuntimeToken() != "" {
			r.m.agents[resp.GetAgent().GetId()] = resp.GetRuntimeToken()
		}
		return resp.GetAgent().GetId(), err
	}
	r.remember(req.GetRequestId(), create)
	_, err := create()

	return false, err
}

func (r *randomRun) deleteAgent(context.Context) (bool, error) {
	if len(r.m.agents) == 0 {
		return false, nil
	}
	ids := slices.Sorted(mapsKeys(r.m.agents))
	id := ids[r.rng.IntN(len(ids))]

	_, err := r.s.agents.DeleteAgent(r.s.user(r.account), &workspacev1.DeleteAgentRequest{AccountId: r.account, AgentId: id})
	if err == nil {
		delete(r.m.agents, id)
	}

	return false, err
}

func (r *randomRun) createTask(ctx context.Context) (bool, error) {
	req := &workspacev1.CreateTaskRequest{AccountId: r.account, Title: "task", RequestId: r.requestID()}
	create := func() (string, error) {
		resp, err := r.s.tasks.CreateTask(ctx, req)
		if err == nil && !slices.Contains(r.m.tasks, resp.GetTask().GetId()) {
			r.m.tasks = append(r.m.tasks, resp.GetTask().GetId())
		}
		return resp.GetTask().GetId(), err
	}
	r.remember(req.GetRequestId(), create)
	_, err := create()

	return false, err
}

// randomTask returns a random task id, or "" for no task.
func (r *randomRun) randomTask() string {
	if len(r.m.tasks) == 0 || r.rng.IntN(4) == 0 {
		return ""
	}

	return r.m.tasks[r.rng.IntN(len(r.m.tasks))]
}

// randomDocument returns a random live document id, or "".
func (r *randomRun) randomDocument() string {
	if len(r.m.documents) == 0 {
		return ""
	}
	ids := slices.Sorted(mapsKeys(r.m.documents))

	return ids[r.rng.IntN(len(ids))]
}

// addDocument records a created document.
func (r *randomRun) addDocument(d *workspacev1.Document) {
	file := d.GetKind() == workspacev1.DocumentKind_DOCUMENT_KIND_FILE
	r.m.documents[d.GetId()] = file
	if file {
		r.m.files[d.GetId()] = true
	}
}

func (r *randomRun) createDocument(ctx context.Context) (bool, error) {
	kind := workspacev1.DocumentKind_DOCUMENT_KIND_FILE
	if r.rng.IntN(4) == 0 {
		kind = workspacev1.DocumentKind_DOCUMENT_KIND_FOLDER
	}
	req := &workspacev1.CreateDocumentRequest{AccountId: r.account, TaskId: r.randomTask(), Name: "doc", Kind: kind, RequestId: r.requestID()}
	create := func() (string, error) {
		resp, err := r.s.documents.CreateDocument(ctx, req)
		if err == nil {
			r.addDocument(resp.GetDocument())
		}
		return resp.GetDocument().GetId(), err
	}
	r.remember(req.GetRequestId(), create)
	_, err := create()

	return false, err
}

func (r *randomRun) duplicateDocument(ctx context.Context) (bool, error) {
	source := r.randomDocument()
	if source == "" {
		return false, nil
	}
	req := &workspacev1.DuplicateDocumentRequest{AccountId: r.account, DocumentId: source, TargetTaskId: r.randomTask(), RequestId: r.requestID()}
	create := func() (string, error) {
		resp, err := r.s.documents.DuplicateDocument(ctx, req)
		if err == nil {
			r.addDocument(resp.GetDocument())
		}
		return resp.GetDocument().GetId(), err
	}
	r.remember(req.GetRequestId(), create)
	_, err := create()

	return false, err
}

// upsertDocument upserts one of five keys. For a live key it names the
// document's task or none, and now and then another task, which must be
// rejected with FAILED_PRECONDITION.
func (r *randomRun) upsertDocument(ctx context.Context) (bool, error) {
	key := fmt.Sprintf("key-%d", r.rng.IntN(5))
	taskID := r.randomTask()
	existing, live := r.m.keys[key]
	wrongTask := live && taskID != "" && taskID != existing.taskID
	if live && !wrongTask && r.rng.IntN(2) == 0 {
		taskID = existing.taskID
	}

	resp, err := r.s.documents.UpsertDocument(ctx, &workspacev1.UpsertDocumentRequest{
		AccountId: r.account, TaskId: taskID, Key: key, Name: key, Content: strconv.Itoa(r.rng.IntN(100)),
	})
	if wrongTask {
		if status.Code(err) != codes.FailedPrecondition {
			r.t.Errorf("upsert of key %s in task %s, not its task %s: got %v, want FailedPrecondition", key, taskID, existing.taskID, err)
		}
		return false, nil
	}
	if err == nil && resp.GetCreated() {
		r.addDocument(resp.GetDocument())
		r.m.keys[key] = upserted{documentID: resp.GetDocument().GetId(), taskID: resp.GetDocument().GetTaskId()}
	}

	return false, err
}

func (r *randomRun) deleteDocument(ctx context.Context) (bool, error) {
	id := r.randomDocument()
	if id == "" {
		return false, nil
	}

	_, err := r.s.documents.DeleteDocument(ctx, &workspacev1.DeleteDocumentRequest{AccountId: r.account, DocumentId: id})
	if err == nil {
		delete(r.m.documents, id)
		for key, u := range r.m.keys {
			if u.documentID == id {
				delete(r.m.keys, key)
			}
		}
	}

	return false, err
}

func (r *randomRun) createMessage(ctx context.Context) (bool, error) {
	req := &workspacev1.CreateMessageRequest{AccountId: r.account, TaskId: r.randomTask(), Body: "message", RequestId: r.requestID()}
	create := func() (string, error) {
		resp, err := r.s.messages.CreateMessage(ctx, req)
		if err == nil && !slices.Contains(r.m.messages, resp.GetMessage().GetId()) {
			r.m.messages = append(r.m.messages, resp.GetMessage().GetId())
		}
		return resp.GetMessage().GetId(), err
	}
	r.remember(req.GetRequestId(), create)
	_, err := create()

	return false, err
}

func (r *randomRun) uploadAttachment(ctx context.Context) (bool, error) {
	if len(r.m.messages) == 0 {
		return false, nil
	}
	size := 1 + r.rng.Int64N(400)
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(r.rng.IntN(256))
	}
	// Now and then fewer bytes arrive than declared.
	sent := data
	if r.rng.IntN(5) == 0 {
		sent = data[:r.rng.IntN(len(data))]
	}
	header := &workspacev1.UploadHeader{
		MessageId:      r.m.messages[r.rng.IntN(len(r.m.messages))],
		FileName:       "file.bin",
		Size:           size,
		IdempotencyKey: r.requestID(),
	}
	create := func() (string, error) {
		resp, err := upload(ctx, r.s.messages, r.account, header, sent, 64)
		if err == nil {
			r.m.attachments[resp.GetAttachment().GetId()] = true
		}
		return resp.GetAttachment().GetId(), err
	}
	r.remember(header.GetIdempotencyKey(), create)
	_, err := create()

	return false, err
}

func (r *randomRun) deleteAttachment(ctx context.Context) (bool, error) {
	if len(r.m.attachments) == 0 {
		return false, nil
	}
	ids := slices.Sorted(mapsKeys(r.m.attachments))
	id := ids[r.rng.IntN(len(ids))]

	_, err := r.s.messages.DeleteAttachment(ctx, &workspacev1.DeleteAttachmentRequest{AccountId: r.account, AttachmentId: id})
	if err == nil {
		delete(r.m.attachments, id)
	}

	return false, err
}

// retry sends an earlier create with a request id again, with the caller of
// its first attempt.
func (r *randomRun) retry(context.Context) (bool, error) {
	if len(r.retries) == 0 {
		return true, nil
	}
	_, err := r.retries[r.rng.IntN(len(r.retries))]()

	return true, err
}

// checkCountersEqualRows compares Metering's counters with the rows of the
// workspace and the files of the blob directory.
func (r *randomRun) checkCountersEqualRows() {
	t, s := r.t, r.s
	ctx := context.Background()
	count := func(query string, args ...any) int64 {
		var n int64
		require.NoError(t, s.pool.QueryRow(ctx, query, args...).Scan(&n))
		return n
	}

	agents := count(`SELECT count(*) FROM workspace.agents WHERE account_id = $1`, r.account)
	tasks := count(`SELECT count(*) FROM workspace.tasks WHERE account_id = $1`, r.account)
	messages := count(`SELECT count(*) FROM workspace.messages WHERE account_id = $1`, r.account)
	storage := count(`SELECT coalesce(sum(size), 0) FROM workspace.attachments WHERE account_id = $1`, r.account)
	liveFiles := count(`SELECT count(*) FROM workspace.documents WHERE account_id = $1 AND kind = 'file'`, r.account)

	t.Logf("rows: %d agents, %d tasks, %d live files (%d created), %d messages, %d attachments with %d bytes",
		agents, tasks, liveFiles, len(r.m.files), messages, len(r.m.attachments), storage)

	assert.Equal(t, counter{used: agents}, s.usage(t, r.account, meteringv1.Metric_METRIC_AGENTS, ""), "agents: running total = live rows")
	assert.Equal(t, counter{used: tasks}, s.usage(t, r.account, meteringv1.Metric_METRIC_TASKS, ""), "tasks: period counter = rows created")
	assert.Equal(t, counter{used: messages}, s.usage(t, r.account, meteringv1.Metric_METRIC_MESSAGES, ""), "messages: period counter = rows created")
	assert.Equal(t, counter{used: storage}, s.usage(t, r.account, meteringv1.Metric_METRIC_STORAGE_BYTES, ""), "storage: running total = bytes of live rows")
	assert.Equal(t, counter{used: int64(len(r.m.files))}, s.usage(t, r.account, meteringv1.Metric_METRIC_DOCUMENTS, ""),
		"documents: period counter = files created")

	for _, taskID := range r.m.tasks {
		files := count(`SELECT count(*) FROM workspace.documents WHERE account_id = $1 AND task_id = $2 AND kind = 'file'`, r.account, taskID)
		assert.Equal(t, counter{used: files}, s.usage(t, r.account, meteringv1.Metric_METRIC_DOCUMENTS, taskID), "documents of task %s", taskID)
	}

	// The responses agree with the rows.
	assert.Equal(t, int64(len(r.m.agents)), agents)
	assert.Equal(t, int64(len(r.m.tasks)), tasks)
	assert.Equal(t, int64(len(r.m.messages)), messages)
	assert.Equal(t, int64(len(r.m.documents)), count(`SELECT count(*) FROM workspace.documents WHERE account_id = $1`, r.account))

	var attachmentIDs, blobNames []string
	rows, err := s.pool.Query(ctx, `SELECT id, blob_name FROM workspace.attachments WHERE account_id = $1 ORDER BY blob_name`, r.account)
	require.NoError(t, err)
	for rows.Next() {
		var id, blobName string
		require.NoError(t, rows.Scan(&id, &blobName))
		attachmentIDs = append(attachmentIDs, id)
		blobNames = append(blobNames, blobName)
	}
	require.NoError(t, rows.Err())
	assert.Equal(t, slices.Sorted(mapsKeys(r.m.attachments)), slices.Sorted(slices.Values(attachmentIDs)))
	assert.Equal(t, blobNames, s.blobFiles(t), "one file per attachment, and no temporary file left")
}

func mapsKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}
