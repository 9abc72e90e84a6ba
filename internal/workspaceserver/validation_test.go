package workspaceserver_test

import (
	"context"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	workspacev1 "github.com/metering/metering/gen/workspace/v1"
	"github.com/metering/metering/internal/workspace"
)

func TestInvalidRequestsNameFieldAndWriteNothing(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	account := s.newAccount("invalid")
	user := s.user(account)
	c := caller{ctx: user}
	messageID := s.newMessage(t, c, account)
	before := s.state(t, account, "")

	long := strings.Repeat("x", workspace.MaxNameLength+1)
	file := workspacev1.DocumentKind_DOCUMENT_KIND_FILE
	tests := []struct {
		name  string
		call  func(ctx context.Context) error
		field string
	}{
		{"agent without name", func(ctx context.Context) error {
			_, err := s.agents.CreateAgent(ctx, &workspacev1.CreateAgentRequest{AccountId: account})
			return err
		}, "name"},
		{"agent name too long", func(ctx context.Context) error {
			_, err := s.agents.CreateAgent(ctx, &workspacev1.CreateAgentRequest{AccountId: account, Name: long})
			return err
		}, "name"},
		{"agent name not UTF-8", func(ctx context.Context) error {
			_, err := s.agents.CreateAgent(ctx, &workspacev1.CreateAgentRequest{AccountId: account, Name: "bad\xff"})
			return err
		}, "name"},
		{"agent name with NUL", func(ctx context.Context) error {
			_, err := s.agents.CreateAgent(ctx, &workspacev1.CreateAgentRequest{AccountId: account, Name: "a\x00b"})
			return err
		}, "name"},
		{"request id too long", func(ctx context.Context) error {
			_, err := s.tasks.CreateTask(ctx, &workspacev1.CreateTaskRequest{AccountId: account, Title: "t", RequestId: strings.Repeat("r", workspace.MaxIDLength+1)})
			return err
		}, "request_id"},
		{"task without title", func(ctx context.Context) error {
			_, err := s.tasks.CreateTask(ctx, &workspacev1.CreateTaskRequest{AccountId: account})
			return err
		}, "title"},
		{"document without kind", func(ctx context.Context) error {
			_, err := s.documents.CreateDocument(ctx, &workspacev1.CreateDocumentRequest{AccountId: account, Name: "d"})
			return err
		}, "kind"},
		{"document with unknown kind", func(ctx context.Context) error {
			_, err := s.documents.CreateDocument(ctx, &workspacev1.CreateDocumentRequest{AccountId: account, Name: "d", Kind: 7})
			return err
		}, "kind"},
		{"folder with content", func(ctx context.Context) error {
			_, err := s.documents.CreateDocument(ctx, &workspacev1.CreateDocumentRequest{
				AccountId: account, Name: "d", Kind: workspacev1.DocumentKind_DOCUMENT_KIND_FOLDER, Content: "text",
			})
			return err
		}, "content"},
		{"content too long", func(ctx context.Context) error {
			_, err := s.documents.CreateDocument(ctx, &workspacev1.CreateDocumentRequest{
				AccountId: account, Name: "d", Kind: file, Content: strings.Repeat("c", workspace.MaxContentLength+1),
			})
			return err
		}, "content"},
		{"upsert without key", func(ctx context.Context) error {
			_, err := s.documents.UpsertDocument(ctx, &workspacev1.UpsertDocumentRequest{AccountId: account, Name: "d"})
			return err
		}, "key"},
		{"duplicate without document", func(ctx context.Context) error {
			_, err := s.documents.DuplicateDocument(ctx, &workspacev1.DuplicateDocumentRequest{AccountId: account})
			return err
		}, "document_id"},
		{"delete without document", func(ctx context.Context) error {
			_, err := s.documents.DeleteDocument(ctx, &workspacev1.DeleteDocumentRequest{AccountId: account})
			return err
		}, "document_id"},
		{"message without body", func(ctx context.Context) error {
			_, err := s.messages.CreateMessage(ctx, &workspacev1.CreateMessageRequest{AccountId: account})
			return err
		}, "body"},
		{"body too long", func(ctx context.Context) error {
			_, err := s.messages.CreateMessage(ctx, &workspacev1.CreateMessageRequest{AccountId: account, Body: strings.Repeat("b", workspace.MaxBodyLength+1)})
			return err
		}, "body"},
		{"delete agent without id", func(ctx context.Context) error {
			_, err := s.agents.DeleteAgent(ctx, &workspacev1.DeleteAgentRequest{AccountId: account})
			return err
		}, "agent_id"},
		{"rotate without agent", func(ctx context.Context) error {
			_, err := s.agents.RotateAgentToken(ctx, &workspacev1.RotateAgentTokenRequest{AccountId: account})
			return err
		}, "agent_id"},
		{"delete attachment without id", func(ctx context.Context) error {
			_, err := s.messages.DeleteAttachment(ctx, &workspacev1.DeleteAttachmentRequest{AccountId: account})
			return err
		}, "attachment_id"},
		{"upload without header", func(ctx context.Context) error {
			stream, err := s.messages.UploadAttachment(ctx)
			require.NoError(t, err)
			require.NoError(t, stream.Send(&workspacev1.UploadAttachmentRequest{AccountId: account, Payload: &workspacev1.UploadAttachmentRequest_Chunk{Chunk: []byte("x")}}))
			_, err = stream.CloseAndRecv()
			return err
		}, "header"},
		{"upload of zero bytes", func(ctx context.Context) error {
			_, err := upload(ctx, s.messages, account, &workspacev1.UploadHeader{MessageId: messageID, FileName: "f"}, nil, 1)
			return err
		}, "header.size"},
		{"upload over the size limit", func(ctx context.Context) error {
			_, err := upload(ctx, s.messages, account, &workspacev1.UploadHeader{MessageId: messageID, FileName: "f", Size: workspace.DefaultMaxUploadBytes + 1}, nil, 1)
			return err
		}, "header.size"},
		{"upload without file name", func(ctx context.Context) error {
			_, err := upload(ctx, s.messages, account, &workspacev1.UploadHeader{MessageId: messageID, Size: 1}, []byte{1}, 1)
			return err
		}, "header.file_name"},
		{"upload with a second header", func(ctx context.Context) error {
			stream, err := s.messages.UploadAttachment(ctx)
			require.NoError(t, err)
			header := &workspacev1.UploadAttachmentRequest{
				AccountId: account,
				Payload:   &workspacev1.UploadAttachmentRequest_Header{Header: &workspacev1.UploadHeader{MessageId: messageID, FileName: "f", Size: 5}},
			}
			require.NoError(t, stream.Send(header))
			_ = stream.Send(header)
			_, err = stream.CloseAndRecv()
			return err
		}, "header"},
	}

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call(user)

			st := requireCode(t, codes.InvalidArgument, err)
			assert.Equal(t, []string{tt.field}, badFields(st))
			assert.Contains(t, st.Message(), tt.field)
		})
	}

	assert.Equal(t, before, s.state(t, account, ""), "no invalid request wrote, stored or counted anything")
}

func TestMissingParentsAreNotFoundAndCountNothing(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	account, other := s.newAccount("parents"), s.newAccount("elsewhere")
	user := s.user(account)

	otherTask, err := s.tasks.CreateTask(s.user(other), &workspacev1.CreateTaskRequest{AccountId: other, Title: "not yours"})
	require.NoError(t, err)
	before := s.state(t, account, "")

	_, err = s.documents.CreateDocument(user, &workspacev1.CreateDocumentRequest{
		AccountId: account, TaskId: "tsk_missing", Name: "d", Kind: workspacev1.DocumentKind_DOCUMENT_KIND_FILE,
	})
	requireCode(t, codes.NotFound, err)
	_, err = s.documents.CreateDocument(user, &workspacev1.CreateDocumentRequest{
		AccountId: account, TaskId: otherTask.GetTask().GetId(), Name: "d", Kind: workspacev1.DocumentKind_DOCUMENT_KIND_FILE,
	})
	requireCode(t, codes.NotFound, err)
	_, err = s.messages.CreateMessage(user, &workspacev1.CreateMessageRequest{AccountId: account, TaskId: "tsk_missing", Body: "b"})
	requireCode(t, codes.NotFound, err)
	_, err = upload(user, s.messages, account, &workspacev1.UploadHeader{MessageId: "msg_missing", FileName: "f", Size: 1}, []byte{1}, 1)
	requireCode(t, codes.NotFound, err)

	assert.Equal(t, before, s.state(t, account, ""))
}
