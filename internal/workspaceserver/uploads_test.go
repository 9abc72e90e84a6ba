package workspaceserver_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	workspacev1 "github.com/metering/metering/gen/workspace/v1"
	"github.com/metering/metering/internal/workspace"
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
			assert.FileExists(t, s.blobPath(t, first.GetAttachment().GetId()))

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
	stored, err := os.ReadFile(s.blobPath(t, resp.GetAttachment().GetId()))
	require.NoError(t, err)
	assert.Len(t, stored, 123)
}

// sendHeader opens an upload and sends its header.
func sendHeader(t *testing.T, ctx context.Context, client workspacev1.MessageServiceClient, account string, header *workspacev1.UploadHeader) workspacev1.MessageService_UploadAttachmentClient {
	t.Helper()
	stream, err := client.UploadAttachment(ctx)
	require.NoError(t, err)
	require.NoError(t, stream.Send(&workspacev1.UploadAttachmentRequest{
		AccountId: account,
		Payload:   &workspacev1.UploadAttachmentRequest_Header{Header: header},
	}))

	return stream
}

func TestStalledUploadAbortedAndReleased(t *testing.T) {
	t.Parallel()
	const idle = 300 * time.Millisecond
	s := startStack(t, stackOptions{uploadIdleTimeout: idle, uploadReservationTTL: 2 * time.Second})
	account := s.newAccount("stalled")
	c := s.newCaller(t, "user", account)
	messageID := s.newMessage(t, c, account)

	t.Run("no chunk within the idle timeout", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(c.ctx, 5*time.Second)
		defer cancel()
		stream := sendHeader(t, ctx, s.messages, account, &workspacev1.UploadHeader{MessageId: messageID, FileName: "idle.bin", Size: storageLimit})

		var resp workspacev1.UploadAttachmentResponse
		st := requireCode(t, codes.DeadlineExceeded, stream.RecvMsg(&resp))

		assert.Contains(t, st.Message(), "no chunk arrived for 300ms", "the server ended the upload, not the client's deadline")
		assert.Equal(t, counter{}, s.usage(t, account, meteringv1.Metric_METRIC_STORAGE_BYTES, ""), "the storage is released")
		assert.Empty(t, s.blobFiles(t), "the temporary file is removed")
	})

	t.Run("longer than the reservation", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(c.ctx, 10*time.Second)
		defer cancel()
		stream := sendHeader(t, ctx, s.messages, account, &workspacev1.UploadHeader{MessageId: messageID, FileName: "slow.bin", Size: storageLimit})

		// One byte every 100 ms never pauses for the idle timeout.
		start := time.Now()
		var err error
		for err == nil && time.Since(start) < 5*time.Second {
			err = stream.Send(&workspacev1.UploadAttachmentRequest{Payload: &workspacev1.UploadAttachmentRequest_Chunk{Chunk: []byte{'s'}}})
			time.Sleep(100 * time.Millisecond)
		}
		_, err = stream.CloseAndRecv()

		st := requireCode(t, codes.DeadlineExceeded, err)
		assert.Contains(t, st.Message(), "longer than its reservation of 2s")
		assert.Equal(t, counter{}, s.usage(t, account, meteringv1.Metric_METRIC_STORAGE_BYTES, ""))
		assert.Empty(t, s.blobFiles(t))
	})

	resp, err := upload(c.ctx, s.messages, account, &workspacev1.UploadHeader{MessageId: messageID, FileName: "full.bin", Size: storageLimit},
		make([]byte, storageLimit), 500)
	require.NoError(t, err, "the whole storage is free again")
	assert.Equal(t, storageLimit, resp.GetAttachment().GetSize())
}

func TestUploadChunkSizeIsLimited(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	s.upsertPlan("ws-big-storage", 64<<20)
	account := "big-" + workspaceTestSuffix()
	_, err := s.admin.SetAccountPlan(s.operator, &meteringv1.SetAccountPlanRequest{AccountId: account, PlanId: "ws-big-storage"})
	require.NoError(t, err)
	c := caller{ctx: s.user(account)}
	messageID := s.newMessage(t, c, account)

	tests := []struct {
		name  string
		chunk int
		code  codes.Code
	}{
		{"over MaxChunkBytes", workspace.MaxChunkBytes + 1, codes.InvalidArgument},
		// gRPC rejects a message over its 4 MiB receive limit itself.
		{"over the gRPC message limit", 5 << 20, codes.ResourceExhausted},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			header := &workspacev1.UploadHeader{MessageId: messageID, FileName: "big.bin", Size: int64(tt.chunk)}

			_, err := upload(c.ctx, s.messages, account, header, make([]byte, tt.chunk), tt.chunk)

			st := requireCode(t, tt.code, err)
			if tt.code == codes.InvalidArgument {
				assert.Equal(t, []string{"chunk"}, badFields(st))
				assert.Contains(t, st.Message(), fmt.Sprintf("at most %d bytes", workspace.MaxChunkBytes))
			}
			// gRPC sends its own status before the handler returns, so the
			// release and the removal of the file may come after the
			// client's error.
			waitFor(5*time.Second, func() bool {
				return s.usage(t, account, meteringv1.Metric_METRIC_STORAGE_BYTES, "") == counter{} && len(s.blobFiles(t)) == 0
			})
			assert.Equal(t, counter{}, s.usage(t, account, meteringv1.Metric_METRIC_STORAGE_BYTES, ""))
			assert.Empty(t, s.blobFiles(t))
		})
	}

	resp, err := upload(c.ctx, s.messages, account, &workspacev1.UploadHeader{MessageId: messageID, FileName: "ok.bin", Size: 3 << 20},
		make([]byte, 3<<20), workspace.MaxChunkBytes)
	require.NoError(t, err, "chunks of MaxChunkBytes pass")
	assert.Equal(t, int64(3<<20), resp.GetAttachment().GetSize())
}

func TestUploadWithoutBytesIsInvalid(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})

	for _, path := range paths {
		t.Run(path, func(t *testing.T) {
			account := s.newAccount(path)
			c := s.newCaller(t, path, account)
			header := &workspacev1.UploadHeader{MessageId: s.newMessage(t, c, account), FileName: "empty.bin", Size: 10}

			_, err := upload(c.ctx, s.messages, account, header, nil, 10)

			st := requireCode(t, codes.InvalidArgument, err)
			assert.Equal(t, []string{"chunk"}, badFields(st))
			assert.Equal(t, counter{}, s.usage(t, account, meteringv1.Metric_METRIC_STORAGE_BYTES, ""), "the reservation is released")
			assert.Equal(t, 0, s.rows(t, "attachments", account))
		})
	}

	assert.Empty(t, s.blobFiles(t))
}

func TestCanceledAttemptLeavesConcurrentRetryItsReservation(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	account := s.newAccount("shared")
	c := s.newCaller(t, "user", account)
	header := &workspacev1.UploadHeader{MessageId: s.newMessage(t, c, account), FileName: "twice.bin", Size: 100, IdempotencyKey: "shared-1"}
	data := bytes.Repeat([]byte{'d'}, 100)
	chunk := func(b []byte) *workspacev1.UploadAttachmentRequest {
		return &workspacev1.UploadAttachmentRequest{Payload: &workspacev1.UploadAttachmentRequest_Chunk{Chunk: b}}
	}

	// Both attempts reserve under the same key, so they share one
	// reservation.
	firstCtx, cancelFirst := context.WithCancel(c.ctx)
	first := sendHeader(t, firstCtx, s.messages, account, header)
	require.NoError(t, first.Send(chunk(data[:10])))
	second := sendHeader(t, c.ctx, s.messages, account, header)
	require.NoError(t, second.Send(chunk(data[:10])))
	// The server reserves before it reads a chunk; give both time to.
	time.Sleep(500 * time.Millisecond)

	cancelFirst()
	_, err := first.CloseAndRecv()
	requireCode(t, codes.Canceled, err)
	require.NoError(t, second.Send(chunk(data[10:])))
	resp, err := second.CloseAndRecv()

	require.NoError(t, err, "the failed attempt did not release the reservation the retry still uses")
	assert.Equal(t, int64(100), resp.GetAttachment().GetSize())
	assert.Equal(t, counter{used: 100}, s.usage(t, account, meteringv1.Metric_METRIC_STORAGE_BYTES, ""))
	assert.Equal(t, 1, s.rows(t, "attachments", account))
}
