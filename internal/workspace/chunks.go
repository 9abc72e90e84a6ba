package workspace

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc"

	workspacev1 "github.com/metering/metering/gen/workspace/v1"
)

// uploadStream is the server side of an UploadAttachment stream.
type uploadStream = grpc.ClientStreamingServer[workspacev1.UploadAttachmentRequest, workspacev1.UploadAttachmentResponse]

// chunkReader returns the chunks that follow the header of an upload.
//
// A goroutine receives the messages, so that the wait for the next one can
// end after the idle timeout: Recv has no timeout of its own, and a server
// ends a stream only by returning from its handler. The goroutine starts at
// the first call of next, and ends when the stream ends or stop is called.
// Only that goroutine calls Recv, as gRPC requires.
type chunkReader struct {
	stream    uploadStream
	accountID string
	idle      time.Duration

	start    sync.Once
	received chan receivedMessage
	stopped  chan struct{}
}

type receivedMessage struct {
	msg *workspacev1.UploadAttachmentRequest
	err error
}

// newChunkReader returns a reader of the chunks of stream, whose first
// message named accountID. The handler must call stop before it returns.
func newChunkReader(stream uploadStream, accountID string, idle time.Duration) *chunkReader {
	return &chunkReader{
		stream:    stream,
		accountID: accountID,
		idle:      idle,
		received:  make(chan receivedMessage),
		stopped:   make(chan struct{}),
	}
}

// next returns the next chunk, and io.EOF after the last. It returns an
// uploadTimeoutError when no message arrives within the idle timeout, an
// invalidError for a message that is not a chunk of this upload or is
// larger than MaxChunkBytes, and the cause of ctx's end when ctx ends
// first.
func (r *chunkReader) next(ctx context.Context) ([]byte, error) {
	r.start.Do(func() { go r.receive() })

	timer := time.NewTimer(r.idle)
	defer timer.Stop()

	select {
	case m := <-r.received:
		if m.err != nil {
			return nil, m.err
		}
		return r.chunk(m.msg)
	case <-timer.C:
		return nil, &uploadTimeoutError{idle: true, limit: r.idle}
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

// stop ends the receiving goroutine. When it waits in Recv, it ends once the
// handler returns, which ends the stream.
func (r *chunkReader) stop() {
	close(r.stopped)
}

func (r *chunkReader) receive() {
	for {
		msg, err := r.stream.Recv()
		select {
		case r.received <- receivedMessage{msg: msg, err: err}:
		case <-r.stopped:
			return
		}
		if err != nil {
			return
		}
	}
}

func (r *chunkReader) chunk(msg *workspacev1.UploadAttachmentRequest) ([]byte, error) {
	if msg.GetAccountId() != "" && msg.GetAccountId() != r.accountID {
		return nil, invalidField("account_id", "must be empty or the account_id of the first message")
	}
	if msg.GetHeader() != nil {
		return nil, invalidField("header", "must be sent only in the first message")
	}
	if n := len(msg.GetChunk()); n > MaxChunkBytes {
		return nil, invalidField("chunk", "must be at most %d bytes, got %d; send the bytes in smaller chunks", MaxChunkBytes, n)
	}

	return msg.GetChunk(), nil
}
