package workspace

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/protobuf/types/known/timestamppb"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	workspacev1 "github.com/metering/metering/gen/workspace/v1"
)

// UploadAttachment receives a header and then the bytes, counts them and
// stores them. See uploadAttachment.
func (m *messageServer) UploadAttachment(stream uploadStream) error {
	ctx := stream.Context()

	first, err := stream.Recv()
	if errors.Is(err, io.EOF) {
		return m.svc.toStatus(ctx, invalidField("header", "is required in the first message; the stream was empty"))
	}
	if err != nil {
		return m.svc.toStatus(ctx, err)
	}

	header := first.GetHeader()
	if err := m.svc.validateUploadHeader(first.GetAccountId(), header); err != nil {
		return m.svc.toStatus(ctx, err)
	}

	chunks := newChunkReader(stream, first.GetAccountId(), m.svc.cfg.UploadIdleTimeout)
	defer chunks.stop()

	a, replayed, err := m.svc.uploadAttachment(ctx, first.GetAccountId(), header, chunks.next)
	if err != nil {
		return m.svc.toStatus(ctx, err)
	}

	return stream.SendAndClose(&workspacev1.UploadAttachmentResponse{Attachment: a.proto(), Replayed: replayed})
}

// DeleteAttachment deletes an attachment and frees its bytes.
func (m *messageServer) DeleteAttachment(ctx context.Context, req *workspacev1.DeleteAttachmentRequest) (*workspacev1.DeleteAttachmentResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	v.id("attachment_id", req.GetAttachmentId())
	if err := v.err(); err != nil {
		return nil, m.svc.toStatus(ctx, err)
	}

	if err := m.svc.deleteAttachment(ctx, req.GetAccountId(), req.GetAttachmentId()); err != nil {
		return nil, m.svc.toStatus(ctx, err)
	}

	return &workspacev1.DeleteAttachmentResponse{}, nil
}

func (s *Service) validateUploadHeader(accountID string, h *workspacev1.UploadHeader) error {
	var v violations
	v.id("account_id", accountID)
	if h == nil {
		v.add("header", "is required in the first message")
		return v.err()
	}

	v.id("header.message_id", h.GetMessageId())
	v.name("header.file_name", h.GetFileName())
	if h.GetSize() < 1 || h.GetSize() > s.cfg.MaxUploadBytes {
		v.add("header.size", "must be from 1 to %d bytes, got %d", s.cfg.MaxUploadBytes, h.GetSize())
	}
	v.optionalID("header.idempotency_key", h.GetIdempotencyKey())

	return v.err()
}

// attachment is a row of workspace.attachments.
type attachment struct {
	ID         string
	AccountID  string
	MessageID  string
	FileName   string
	Size       int64
	SHA256     string
	CreatedBy  string
	CreateTime time.Time
	// BlobName is the name of the file with the bytes in the blob
	// directory. Each attempt of an upload writes a file of its own.
	BlobName string
}

func (a attachment) proto() *workspacev1.Attachment {
	return &workspacev1.Attachment{
		Id:         a.ID,
		AccountId:  a.AccountID,
		MessageId:  a.MessageID,
		FileName:   a.FileName,
		Size:       a.Size,
		Sha256:     a.SHA256,
		CreatedBy:  a.CreatedBy,
		CreateTime: timestamppb.New(a.CreateTime),
	}
}

// uploadAttachment stores an upload through the guard. Storage for the
// declared size is reserved before the first byte is read. The bytes go to
// a temporary file in the blob directory. The write renames it to the
// attempt's own blob file in the transaction that inserts the row, and the
// commit counts the bytes received, which may be fewer than declared. More
// bytes than declared, no bytes at all, a pause between chunks over
// UploadIdleTimeout, or an upload that outlasts UploadReservationTTL abort
// it: the files are removed and the reservation released. next returns the
// next chunk, and io.EOF after the last.
//
// With an idempotency key, a retried upload returns the first attachment
// with true, without reading its bytes.
func (s *Service) uploadAttachment(ctx context.Context, accountID string, h *workspacev1.UploadHeader, next func(context.Context) ([]byte, error)) (attachment, bool, error) {
	const operation = "UploadAttachment"

	hash, err := requestHash(operation, &workspacev1.UploadAttachmentRequest{
		AccountId: accountID,
		Payload:   &workspacev1.UploadAttachmentRequest_Header{Header: h},
	})
	if err != nil {
		return attachment{}, false, err
	}
	if _, err := getMessage(ctx, s.pool, accountID, h.GetMessageId()); err != nil {
		return attachment{}, false, err
	}

	id := resourceID(attachmentPrefix, accountID, h.GetIdempotencyKey())
	a := attachment{
		ID:         id,
		AccountID:  accountID,
		MessageID:  h.GetMessageId(),
		FileName:   h.GetFileName(),
		CreatedBy:  actor(ctx),
		CreateTime: s.now(),
		BlobName:   newBlobName(id),
	}
	var tempPath string
	placed := false
	id, replayed, err := s.guard(ctx, create{
		accountID:    accountID,
		operation:    operation,
		requestID:    h.GetIdempotencyKey(),
		requestHash:  hash,
		requestField: "header.idempotency_key",
		resourceID:   a.ID,
		reserved:     []*meteringv1.UsageItem{{Metric: meteringv1.Metric_METRIC_STORAGE_BYTES, Amount: h.GetSize()}},
		ttl:          s.cfg.UploadReservationTTL,
		receive: func(ctx context.Context) ([]*meteringv1.UsageItem, error) {
			// The upload must end before its reservation expires.
			ttl := s.cfg.UploadReservationTTL
			ctx, cancel := context.WithTimeoutCause(ctx, ttl, &uploadTimeoutError{limit: ttl})
			defer cancel()

			var err error
			tempPath, a.Size, a.SHA256, err = s.receiveBlob(ctx, h.GetSize(), next)
			if err != nil || a.Size == h.GetSize() {
				return nil, err
			}
			return []*meteringv1.UsageItem{{Metric: meteringv1.Metric_METRIC_STORAGE_BYTES, Amount: a.Size}}, nil
		},
		write: func(ctx context.Context, tx pgx.Tx) error {
			if err := insertAttachment(ctx, tx, a); err != nil {
				return err
			}
			// A second write, after a failed transaction, finds the file in
			// place already.
			if placed {
				return nil
			}
			if err := s.blobs.place(tempPath, a.BlobName); err != nil {
				return err
			}
			placed = true
			return nil
		},
		discard: func() {
			s.discardUpload(ctx, tempPath, a, placed)
		},
	})
	if err != nil {
		return attachment{}, false, err
	}
	if replayed {
		a, err := loadReplay(ctx, s, accountID, "header.idempotency_key", h.GetIdempotencyKey(), id, getAttachment)
		return a, true, err
	}

	return a, false, nil
}

// receiveBlob writes the chunks that next returns to a temporary file until
// next returns io.EOF, and returns the file's path, its size and the
// lowercase hex SHA-256 of its bytes. It stops with an uploadTooLargeError
// before writing a chunk that would take the size over declared, and with
// an invalidError when no byte arrived. The path is returned with any
// error, so the caller can remove the file.
func (s *Service) receiveBlob(ctx context.Context, declared int64, next func(context.Context) ([]byte, error)) (path string, size int64, sum string, err error) {
	f, err := s.blobs.createTemp()
	if err != nil {
		return "", 0, "", err
	}
	path = f.Name()
	defer func() {
		if closeErr := f.Close(); closeErr != nil && err == nil {
			err = fmt.Errorf("close temporary upload file: %w", closeErr)
		}
	}()

	h := sha256.New()
	for {
		chunk, err := next(ctx)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return path, size, "", err
		}
		if int64(len(chunk)) > declared-size {
			return path, size, "", &uploadTooLargeError{declared: declared}
		}

		if _, err := f.Write(chunk); err != nil {
			return path, size, "", fmt.Errorf("write temporary upload file: %w", err)
		}
		h.Write(chunk)
		size += int64(len(chunk))
	}

	if size == 0 {
		return path, 0, "", invalidField("chunk",
			"no bytes arrived, but header.size declared %d; send at least 1 byte, nothing was stored", declared)
	}
	if err := f.Sync(); err != nil {
		return path, size, "", fmt.Errorf("sync temporary upload file: %w", err)
	}

	return path, size, hex.EncodeToString(h.Sum(nil)), nil
}

// discardUpload removes the files of an upload attempt whose row was not
// committed: the temporary file, and the attempt's blob file once placed.
// No other attempt uses them.
func (s *Service) discardUpload(ctx context.Context, tempPath string, a attachment, placed bool) {
	var paths []string
	if tempPath != "" {
		paths = append(paths, tempPath)
	}
	if placed {
		paths = append(paths, s.blobs.path(a.BlobName))
	}

	for _, path := range paths {
		if err := remove(path); err != nil {
			s.logger.ErrorContext(ctx, "remove file of a failed upload failed", "attachment_id", a.ID, "error", err)
		}
	}
}

// deleteAttachment deletes an attachment's row and records the deletion in
// Metering (see deleteCounted), then removes its file.
func (s *Service) deleteAttachment(ctx context.Context, accountID, attachmentID string) error {
	const query = `
		DELETE FROM workspace.attachments
		WHERE account_id = $1 AND id = $2
		RETURNING coalesce(blob_name, id)`

	var blobName string
	return s.deleteCounted(ctx, deletion{
		accountID:  accountID,
		operation:  "DeleteAttachment",
		resourceID: attachmentID,
		metric:     meteringv1.Metric_METRIC_STORAGE_BYTES,
		delete: func(ctx context.Context, tx pgx.Tx) (bool, error) {
			var name string
			err := tx.QueryRow(ctx, query, accountID, attachmentID).Scan(&name)
			if errors.Is(err, pgx.ErrNoRows) {
				return false, &notFoundError{kind: "attachment", id: attachmentID}
			}
			if err != nil {
				return false, fmt.Errorf("delete attachment %q: %w", attachmentID, translate(err))
			}
			blobName = name
			return true, nil
		},
		deleted: func() {
			// NOTE: a file that cannot be removed stays in the blob
			// directory without a row until the start-up sweep; its bytes
			// are no longer counted.
			if err := remove(s.blobs.path(blobName)); err != nil {
				s.logger.ErrorContext(ctx, "remove file of a deleted attachment failed", "attachment_id", attachmentID, "error", err)
			}
		},
	})
}

func insertAttachment(ctx context.Context, tx pgx.Tx, a attachment) error {
	const query = `
		INSERT INTO workspace.attachments (id, account_id, message_id, file_name, size, sha256, created_by, create_time, blob_name)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`

	if _, err := tx.Exec(ctx, query, a.ID, a.AccountID, a.MessageID, a.FileName, a.Size, a.SHA256, a.CreatedBy, a.CreateTime, a.BlobName); err != nil {
		return fmt.Errorf("insert attachment %q: %w", a.ID, translate(err))
	}

	return nil
}

// getAttachment returns the attachment, or a notFoundError.
func getAttachment(ctx context.Context, q querier, accountID, id string) (attachment, error) {
	const query = `
		SELECT id, account_id, message_id, file_name, size, sha256, created_by, create_time
		FROM workspace.attachments
		WHERE account_id = $1 AND id = $2`

	var a attachment
	err := q.QueryRow(ctx, query, accountID, id).Scan(&a.ID, &a.AccountID, &a.MessageID, &a.FileName, &a.Size, &a.SHA256, &a.CreatedBy, &a.CreateTime)
	if errors.Is(err, pgx.ErrNoRows) {
		return attachment{}, &notFoundError{kind: "attachment", id: id}
	}
	if err != nil {
		return attachment{}, fmt.Errorf("get attachment %q: %w", id, translate(err))
	}
	a.CreateTime = a.CreateTime.UTC()

	return a, nil
}
