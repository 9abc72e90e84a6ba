package workspaceserver_test

import (
	"context"
	"io"
	"net"
	"sync"
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

// closedAddr returns a 127.0.0.1 address on which nothing listens, made by
// binding a free port and releasing it.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())

	return addr
}

// state is what the Metering-down tests compare before and after: the
// counters, the rows of every table and the files of the blob directory.
type state struct {
	counters map[string]int64
	rows     map[string]int
	files    []string
}

func (s *stack) state(t *testing.T, account, taskID string) state {
	t.Helper()
	rows := map[string]int{}
	for _, table := range []string{"agents", "agent_tokens", "tasks", "documents", "messages", "attachments", "requests"} {
		rows[table] = s.rows(t, table, account)
	}

	return state{counters: s.snapshot(t, account, taskID), rows: rows, files: s.blobFiles(t)}
}

func TestMeteringUnreachableFailsClosed(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	_, conn := s.startWorkspace(closedAddr(t), stackOptions{})
	down := newClients(conn)

	for _, path := range paths {
		t.Run(path, func(t *testing.T) {
			account := s.newAccount(path)
			c := s.newCaller(t, path, account)
			user := s.user(account)

			// Set-up through the workspace that reaches Metering.
			task, err := s.tasks.CreateTask(c.ctx, &workspacev1.CreateTaskRequest{AccountId: account, Title: "task"})
			require.NoError(t, err)
			taskID := task.GetTask().GetId()
			file, err := s.documents.CreateDocument(c.ctx, &workspacev1.CreateDocumentRequest{
				AccountId: account, TaskId: taskID, Name: "a.md", Kind: workspacev1.DocumentKind_DOCUMENT_KIND_FILE,
			})
			require.NoError(t, err)
			messageID := s.newMessage(t, c, account)
			att, err := upload(c.ctx, s.messages, account, &workspacev1.UploadHeader{MessageId: messageID, FileName: "a", Size: 10}, make([]byte, 10), 10)
			require.NoError(t, err)
			before := s.state(t, account, taskID)

			calls := map[string]func() error{
				"CreateAgent": func() error {
					_, err := down.agents.CreateAgent(user, &workspacev1.CreateAgentRequest{AccountId: account, Name: "x", RequestId: "agent-1"})
					return err
				},
				"DeleteAgent": func() error {
					_, err := down.agents.DeleteAgent(user, &workspacev1.DeleteAgentRequest{AccountId: account, AgentId: c.agentID})
					return err
				},
				"CreateTask": func() error {
					_, err := down.tasks.CreateTask(c.ctx, &workspacev1.CreateTaskRequest{AccountId: account, Title: "x", RequestId: "task-1"})
					return err
				},
				"CreateDocument": func() error {
					_, err := down.documents.CreateDocument(c.ctx, &workspacev1.CreateDocumentRequest{
						AccountId: account, TaskId: taskID, Name: "x", Kind: workspacev1.DocumentKind_DOCUMENT_KIND_FILE,
					})
					return err
				},
				"DuplicateDocument": func() error {
					_, err := down.documents.DuplicateDocument(c.ctx, &workspacev1.DuplicateDocumentRequest{AccountId: account, DocumentId: file.GetDocument().GetId()})
					return err
				},
				"UpsertDocument": func() error {
					_, err := down.documents.UpsertDocument(c.ctx, &workspacev1.UpsertDocumentRequest{AccountId: account, Key: "k", Name: "x"})
					return err
				},
				"DeleteDocument": func() error {
					_, err := down.documents.DeleteDocument(c.ctx, &workspacev1.DeleteDocumentRequest{AccountId: account, DocumentId: file.GetDocument().GetId()})
					return err
				},
				"CreateMessage": func() error {
					_, err := down.messages.CreateMessage(c.ctx, &workspacev1.CreateMessageRequest{AccountId: account, Body: "x", RequestId: "message-1"})
					return err
				},
				"UploadAttachment": func() error {
					_, err := upload(c.ctx, down.messages, account, &workspacev1.UploadHeader{MessageId: messageID, FileName: "b", Size: 10}, make([]byte, 10), 10)
					return err
				},
				"DeleteAttachment": func() error {
					_, err := down.messages.DeleteAttachment(c.ctx, &workspacev1.DeleteAttachmentRequest{AccountId: account, AttachmentId: att.GetAttachment().GetId()})
					return err
				},
			}
			// The calls run at once, because each spends its retries.
			var wg sync.WaitGroup
			for name, call := range calls {
				wg.Go(func() {
					err := call()
					assert.Equal(t, codes.Unavailable.String(), status.Code(err).String(), "%s: %v", name, err)
					assert.Contains(t, status.Convert(err).Message(), "Metering is unavailable", name)
				})
			}
			wg.Wait()

			assert.Equal(t, before, s.state(t, account, taskID), "nothing was written, stored or counted")

			// A folder counts nothing, so it needs no Metering.
			_, err = down.documents.CreateDocument(c.ctx, &workspacev1.CreateDocumentRequest{
				AccountId: account, Name: "folder", Kind: workspacev1.DocumentKind_DOCUMENT_KIND_FOLDER,
			})
			assert.NoError(t, err)
		})
	}
}

func TestMeteringLostBeforeCommitWritesNothing(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	proxy := startProxy(t, s.meteringAddr)
	_, conn := s.startWorkspace(proxy.addr, stackOptions{})
	cut := newClients(conn)

	for _, path := range paths {
		t.Run(path, func(t *testing.T) {
			account := s.newAccount(path)
			c := s.newCaller(t, path, account)
			before := s.state(t, account, "")

			// Metering goes away after the reservation, while the row is
			// being written.
			s.hooks.set(account, func(workspace.Write) error {
				proxy.setUp(false)
				return nil
			})
			t.Cleanup(func() { proxy.setUp(true) })

			_, err := cut.tasks.CreateTask(c.ctx, &workspacev1.CreateTaskRequest{AccountId: account, Title: "lost"})

			requireCode(t, codes.Unavailable, err)
			after := s.state(t, account, "")
			assert.Equal(t, before.rows, after.rows, "the row was rolled back")
			assert.Equal(t, before.counters["tasks"], after.counters["tasks"], "nothing was committed")
			assert.Equal(t, before.counters["reserved"]+1, after.counters["reserved"],
				"the reservation could not be released yet: a background task releases it once Metering is back")

			proxy.setUp(true)
			s.hooks.set(account, nil)
			assert.EventuallyWithT(t, func(c2 *assert.CollectT) {
				_, err := cut.tasks.CreateTask(c.ctx, &workspacev1.CreateTaskRequest{AccountId: account, Title: "back", RequestId: "back"})
				assert.NoError(c2, err)
			}, 10*time.Second, 50*time.Millisecond, "creates work again once Metering is back")
		})
	}
}

// proxy forwards TCP connections to a target until it is set down, which
// closes every open connection and every new one. While it holds, the
// requests still reach the target, which applies them, but the responses
// wait in the proxy: to the client the target hangs.
type proxy struct {
	addr     string
	target   string
	listener net.Listener

	mu       sync.Mutex
	released *sync.Cond
	up       bool
	held     bool
	conns    map[net.Conn]struct{}
	wg       sync.WaitGroup
}

func startProxy(t *testing.T, target string) *proxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)

	p := &proxy{addr: l.Addr().String(), target: target, listener: l, up: true, conns: map[net.Conn]struct{}{}}
	p.released = sync.NewCond(&p.mu)
	p.wg.Go(p.accept)
	t.Cleanup(func() {
		_ = l.Close()
		p.setUp(false)
		p.wg.Wait()
	})

	return p
}

func (p *proxy) accept() {
	for {
		client, err := p.listener.Accept()
		if err != nil {
			return
		}
		if !p.track(client) {
			continue
		}
		p.wg.Go(func() { p.forward(client) })
	}
}

func (p *proxy) forward(client net.Conn) {
	defer p.drop(client)

	var d net.Dialer
	upstream, err := d.DialContext(context.Background(), "tcp", p.target)
	if err != nil || !p.track(upstream) {
		return
	}
	defer p.drop(upstream)

	p.wg.Go(func() {
		_, _ = io.Copy(upstream, client)
		_ = upstream.Close()
	})
	p.copyResponses(client, upstream)
}

// copyResponses copies from upstream to client, waiting while the proxy
// holds.
func (p *proxy) copyResponses(client, upstream net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := upstream.Read(buf)
		if n > 0 {
			if !p.waitWhileHeld() {
				return
			}
			if _, err := client.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// waitWhileHeld waits until the proxy stops holding, and reports false when
// it was set down meanwhile.
func (p *proxy) waitWhileHeld() bool {
	p.mu.Lock()
	defer p.mu.Unlock()

	for p.held && p.up {
		p.released.Wait()
	}

	return p.up
}

// hold makes the proxy hold the responses, or pass them on again.
func (p *proxy) hold(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()

	p.held = on
	p.released.Broadcast()
}

// track adds conn to the open connections, or closes it and returns false
// when the proxy is down.
func (p *proxy) track(conn net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()

	if !p.up {
		_ = conn.Close()
		return false
	}
	p.conns[conn] = struct{}{}

	return true
}

func (p *proxy) drop(conn net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()

	delete(p.conns, conn)
	_ = conn.Close()
}

func (p *proxy) setUp(up bool) {
	p.mu.Lock()
	defer p.mu.Unlock()

	p.up = up
	p.released.Broadcast()
	if up {
		return
	}
	for conn := range p.conns {
		_ = conn.Close()
		delete(p.conns, conn)
	}
}

// meteringReserved returns the reserved amount of metric, for checks that
// a failed create leaves no reservation behind.
func (s *stack) meteringReserved(t *testing.T, account string, metric meteringv1.Metric) int64 {
	t.Helper()

	return s.usage(t, account, metric, "").reserved
}
