package workspaceserver_test

import (
	"bytes"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	workspacev1 "github.com/metering/metering/gen/workspace/v1"
)

// newMessage creates a message for uploads.
func (s *stack) newMessage(t *testing.T, c caller, account string) string {
	t.Helper()
	resp, err := s.messages.CreateMessage(c.ctx, &workspacev1.CreateMessageRequest{AccountId: account, Body: "see attached"})
	require.NoError(t, err)

	return resp.GetMessage().GetId()
}

func TestUploadRetryStoredAndCountedOnce(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})

	for _, path := range paths {
		t.Run(path, func(t *testing.T) {
			account := s.newAccount(path)
			c := s.newCaller(t, path, account)
			header := &workspacev1.UploadHeader{MessageId: s.newMessage(t, c, account), FileName: "a.txt", Size: 300, IdempotencyKey: "upload-1"}
			data := bytes.Repeat([]byte{'a'}, 300)

			first, err := upload(c.ctx, s.messages, account, header, data, 100)
			require.NoError(t, err)
			assert.False(t, first.GetReplayed())

			again, err := upload(c.ctx, s.messages, account, header, data, 100)
			require.NoError(t, err)
			assert.True(t, again.GetReplayed())
			assert.Equal(t, first.GetAttachment().GetId(), again.GetAttachment().GetId())

			// Concurrent retries run their writes one at a time, and each
			// finds the first attachment.
			var wg sync.WaitGroup
			for range 4 {
				wg.Go(func() {
					resp, err := upload(c.ctx, s.messages, account, header, data, 100)
					if assert.NoError(t, err) {
						assert.Equal(t, first.GetAttachment().GetId(), resp.GetAttachment().GetId())
					}
				})
			}
			wg.Wait()

			assert.Equal(t, counter{used: 300}, s.usage(t, account, meteringv1.Metric_METRIC_STORAGE_BYTES, ""))
			assert.Equal(t, 1, s.rows(t, "attachments", account))
			assert.FileExists(t, filepath.Join(s.blobDir, first.GetAttachment().GetId()))

			other := proto.CloneOf(header)
			other.Size = 299
			_, err = upload(c.ctx, s.messages, account, other, data[:299], 100)
			st := requireCode(t, codes.InvalidArgument, err)
			assert.Equal(t, []string{"header.idempotency_key"}, badFields(st), "the key of another upload")
		})
	}

	assert.Len(t, s.blobFiles(t), 2, "one file per path, and no temporary file left")
}

func TestUploadOverLimitRejectedBeforeBytesAreStored(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})

	for _, path := range paths {
		t.Run(path, func(t *testing.T) {
			account := s.newAccount(path)
			c := s.newCaller(t, path, account)
			messageID := s.newMessage(t, c, account)

			// Only the header is sent, and the send side stays open, so the
			// response must come before the server reads a single byte.
			stream, err := s.messages.UploadAttachment(c.ctx)
			require.NoError(t, err)
			require.NoError(t, stream.Send(&workspacev1.UploadAttachmentRequest{
				AccountId: account,
				Payload: &workspacev1.UploadAttachmentRequest_Header{Header: &workspacev1.UploadHeader{
					MessageId: messageID, FileName: "huge.bin", Size: storageLimit + 1,
				}},
			}))
			var resp workspacev1.UploadAttachmentResponse
			err = stream.RecvMsg(&resp)

			st := requireCode(t, codes.ResourceExhausted, err)
			assert.Equal(t, "PLAN_LIMIT_EXCEEDED", errorInfoReason(st))
			var quota *errdetails.QuotaFailure
			for _, d := range st.Details() {
				if q, ok := d.(*errdetails.QuotaFailure); ok {
					quota = q
				}
			}
			require.NotNil(t, quota, "Metering's QuotaFailure is passed through")
			assert.Equal(t, "accounts/"+account+"/metrics/storage_bytes", quota.GetViolations()[0].GetSubject())

			assert.Empty(t, s.blobFiles(t), "no file, not even a temporary one")
			assert.Equal(t, counter{}, s.usage(t, account, meteringv1.Metric_METRIC_STORAGE_BYTES, ""))
			assert.Equal(t, 0, s.rows(t, "attachments", account))
		})
	}
}

func TestUploadWithMoreBytesThanDeclaredStoresNothing(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})

	for _, path := range paths {
		t.Run(path, func(t *testing.T) {
			account := s.newAccount(path)
			c := s.newCaller(t, path, account)
			header := &workspacev1.UploadHeader{MessageId: s.newMessage(t, c, account), FileName: "liar.bin", Size: 100}

			_, err := upload(c.ctx, s.messages, account, header, make([]byte, 101), 40)

			st := requireCode(t, codes.InvalidArgument, err)
			assert.Equal(t, []string{"chunk"}, badFields(st))
			assert.Empty(t, s.blobFiles(t))
			assert.Equal(t, counter{}, s.usage(t, account, meteringv1.Metric_METRIC_STORAGE_BYTES, ""), "the reservation is released")
			assert.Equal(t, 0, s.rows(t, "attachments", account))
		})
	}
}

func TestUploadWithFewerBytesCommitsActualSize(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	account := s.newAccount("short")
	c := s.newCaller(t, "user", account)
	header := &workspacev1.UploadHeader{MessageId: s.newMessage(t, c, account), FileName: "short.bin", Size: 500}

	resp, err := upload(c.ctx, s.messages, account, header, make([]byte, 123), 50)
	require.NoError(t, err)

	assert.Equal(t, int64(123), resp.GetAttachment().GetSize())
	assert.Equal(t, counter{used: 123}, s.usage(t, account, meteringv1.Metric_METRIC_STORAGE_BYTES, ""))
	stored, err := os.ReadFile(filepath.Join(s.blobDir, resp.GetAttachment().GetId()))
	require.NoError(t, err)
	assert.Len(t, stored, 123)
}
