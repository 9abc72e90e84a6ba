package workspace

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/protobuf/types/known/timestamppb"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	workspacev1 "github.com/metering/metering/gen/workspace/v1"
)

// Kinds of documents, as stored in workspace.documents.kind.
const (
	kindFile   = "file"
	kindFolder = "folder"
)

// documentKeyConstraint is the unique constraint on the UpsertDocument key
// within an account.
const documentKeyConstraint = "documents_account_id_doc_key_key"

// upsertAttempts bounds how often UpsertDocument retries after a concurrent
// upsert created the document with the same key first.
const upsertAttempts = 3

// errDocumentKeyTaken is an insert whose key a concurrent upsert took first.
var errDocumentKeyTaken = errors.New("another document has the key")

// documentServer serves DocumentService.
type documentServer struct {
	workspacev1.UnimplementedDocumentServiceServer
	svc *Service
}

// CreateDocument creates a file, which counts, or a folder, which does not.
func (d *documentServer) CreateDocument(ctx context.Context, req *workspacev1.CreateDocumentRequest) (*workspacev1.CreateDocumentResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	v.optionalID("task_id", req.GetTaskId())
	v.name("name", req.GetName())
	v.text("content", req.GetContent(), false, MaxContentLength)
	v.optionalID("request_id", req.GetRequestId())
	switch req.GetKind() {
	case workspacev1.DocumentKind_DOCUMENT_KIND_FILE:
	case workspacev1.DocumentKind_DOCUMENT_KIND_FOLDER:
		if req.GetContent() != "" {
			v.add("content", "must be empty for a folder")
		}
	default:
		v.add("kind", "must be DOCUMENT_KIND_FILE or DOCUMENT_KIND_FOLDER, got %s", req.GetKind())
	}
	if err := v.err(); err != nil {
		return nil, d.svc.toStatus(ctx, err)
	}

	doc, err := d.svc.createDocument(ctx, req)
	if err != nil {
		return nil, d.svc.toStatus(ctx, err)
	}

	return &workspacev1.CreateDocumentResponse{Document: doc.proto()}, nil
}

// DuplicateDocument copies a document; a copied file counts as a new file.
func (d *documentServer) DuplicateDocument(ctx context.Context, req *workspacev1.DuplicateDocumentRequest) (*workspacev1.DuplicateDocumentResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	v.id("document_id", req.GetDocumentId())
	v.optionalID("target_task_id", req.GetTargetTaskId())
	v.optionalID("request_id", req.GetRequestId())
	if err := v.err(); err != nil {
		return nil, d.svc.toStatus(ctx, err)
	}

	doc, err := d.svc.duplicateDocument(ctx, req)
	if err != nil {
		return nil, d.svc.toStatus(ctx, err)
	}

	return &workspacev1.DuplicateDocumentResponse{Document: doc.proto()}, nil
}

// UpsertDocument updates the file with the key, or creates and counts it.
func (d *documentServer) UpsertDocument(ctx context.Context, req *workspacev1.UpsertDocumentRequest) (*workspacev1.UpsertDocumentResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	v.optionalID("task_id", req.GetTaskId())
	v.name("key", req.GetKey())
	v.name("name", req.GetName())
	v.text("content", req.GetContent(), false, MaxContentLength)
	if err := v.err(); err != nil {
		return nil, d.svc.toStatus(ctx, err)
	}

	doc, created, err := d.svc.upsertDocument(ctx, req)
	if err != nil {
		return nil, d.svc.toStatus(ctx, err)
	}

	return &workspacev1.UpsertDocumentResponse{Document: doc.proto(), Created: created}, nil
}

// DeleteDocument deletes a document; a file in a task frees its slot there.
func (d *documentServer) DeleteDocument(ctx context.Context, req *workspacev1.DeleteDocumentRequest) (*workspacev1.DeleteDocumentResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	v.id("document_id", req.GetDocumentId())
	if err := v.err(); err != nil {
		return nil, d.svc.toStatus(ctx, err)
	}

	if err := d.svc.deleteDocument(ctx, req.GetAccountId(), req.GetDocumentId()); err != nil {
		return nil, d.svc.toStatus(ctx, err)
	}

	return &workspacev1.DeleteDocumentResponse{}, nil
}

// document is a row of workspace.documents. TaskID and Key are empty when
// unset.
type document struct {
	ID         string
	AccountID  string
	TaskID     string
	Name       string
	Kind       string
	Key        string
	Content    string
	CreatedBy  string
	CreateTime time.Time
	UpdateTime time.Time
}

func (d document) proto() *workspacev1.Document {
	kind := workspacev1.DocumentKind_DOCUMENT_KIND_FILE
	if d.Kind == kindFolder {
		kind = workspacev1.DocumentKind_DOCUMENT_KIND_FOLDER
	}

	return &workspacev1.Document{
		Id:         d.ID,
		AccountId:  d.AccountID,
		TaskId:     d.TaskID,
		Name:       d.Name,
		Kind:       kind,
		Key:        d.Key,
		Content:    d.Content,
		CreatedBy:  d.CreatedBy,
		CreateTime: timestamppb.New(d.CreateTime),
		UpdateTime: timestamppb.New(d.UpdateTime),
	}
}

func (s *Service) createDocument(ctx context.Context, req *workspacev1.CreateDocumentRequest) (document, error) {
	const operation = "CreateDocument"

	hash, err := requestHash(operation, req)
	if err != nil {
		return document{}, err
	}
	if err := checkTask(ctx, s.pool, req.GetAccountId(), req.GetTaskId()); err != nil {
		return document{}, err
	}

	kind := kindFile
	if req.GetKind() == workspacev1.DocumentKind_DOCUMENT_KIND_FOLDER {
		kind = kindFolder
	}
	now := s.now()
	d := document{
		ID:         resourceID(documentPrefix, req.GetAccountId(), req.GetRequestId()),
		AccountID:  req.GetAccountId(),
		TaskID:     req.GetTaskId(),
		Name:       req.GetName(),
		Kind:       kind,
		Content:    req.GetContent(),
		CreatedBy:  actor(ctx),
		CreateTime: now,
		UpdateTime: now,
	}

	return s.insertDocumentGuarded(ctx, d, operation, req.GetRequestId(), hash)
}

func (s *Service) duplicateDocument(ctx context.Context, req *workspacev1.DuplicateDocumentRequest) (document, error) {
	const operation = "DuplicateDocument"

	hash, err := requestHash(operation, req)
	if err != nil {
		return document{}, err
	}
	source, err := getDocument(ctx, s.pool, req.GetAccountId(), req.GetDocumentId())
	if err != nil {
		return document{}, err
	}

	taskID := source.TaskID
	if req.GetTargetTaskId() != "" {
		taskID = req.GetTargetTaskId()
		if err := checkTask(ctx, s.pool, req.GetAccountId(), taskID); err != nil {
			return document{}, err
		}
	}

	// The copy has no key: keys are unique, and the copy is a document of
	// its own that UpsertDocument does not update.
	now := s.now()
	d := document{
		ID:         resourceID(documentPrefix, req.GetAccountId(), req.GetRequestId()),
		AccountID:  req.GetAccountId(),
		TaskID:     taskID,
		Name:       source.Name,
		Kind:       source.Kind,
		Content:    source.Content,
		CreatedBy:  actor(ctx),
		CreateTime: now,
		UpdateTime: now,
	}

	return s.insertDocumentGuarded(ctx, d, operation, req.GetRequestId(), hash)
}

// upsertDocument updates the document with the key, or creates it. It
// returns true when it created the document. Keys are unique per account,
// not per task, so a task_id that differs from the existing document's task
// is rejected (see updateDocumentByKey). When a concurrent upsert of the
// same key creates it first, the insert fails on the key's unique
// constraint, its reservation is released, and the next attempt updates.
func (s *Service) upsertDocument(ctx context.Context, req *workspacev1.UpsertDocumentRequest) (document, bool, error) {
	for range upsertAttempts {
		d, found, err := s.updateDocumentByKey(ctx, req)
		if err != nil || found {
			return d, false, err
		}

		if err := checkTask(ctx, s.pool, req.GetAccountId(), req.GetTaskId()); err != nil {
			return document{}, false, err
		}

		now := s.now()
		d = document{
			ID:         newID(documentPrefix),
			AccountID:  req.GetAccountId(),
			TaskID:     req.GetTaskId(),
			Name:       req.GetName(),
			Kind:       kindFile,
			Key:        req.GetKey(),
			Content:    req.GetContent(),
			CreatedBy:  actor(ctx),
			CreateTime: now,
			UpdateTime: now,
		}
		d, err = s.insertDocumentGuarded(ctx, d, "UpsertDocument", "", nil)
		if errors.Is(err, errDocumentKeyTaken) {
			continue
		}

		return d, err == nil, err
	}

	return document{}, false, fmt.Errorf("upsert document key %q: %w", req.GetKey(), errConcurrentAttempt)
}

// insertDocumentGuarded creates d through the guard. A file counts one
// document for the account and, in a task, one against the task's limit. A
// folder counts nothing.
func (s *Service) insertDocumentGuarded(ctx context.Context, d document, operation, requestID string, hash []byte) (document, error) {
	var reserved []*meteringv1.UsageItem
	if d.Kind == kindFile {
		reserved = []*meteringv1.UsageItem{{Metric: meteringv1.Metric_METRIC_DOCUMENTS, Amount: 1, ParentId: d.TaskID}}
	}

	id, replayed, err := s.guard(ctx, create{
		accountID:    d.AccountID,
		operation:    operation,
		requestID:    requestID,
		requestHash:  hash,
		requestField: "request_id",
		resourceID:   d.ID,
		reserved:     reserved,
		ttl:          s.cfg.ReservationTTL,
		write: func(ctx context.Context, tx pgx.Tx) error {
			return insertDocument(ctx, tx, d)
		},
	})
	if err != nil {
		return document{}, err
	}
	if replayed {
		return loadReplay(ctx, s, d.AccountID, "request_id", requestID, id, getDocument)
	}

	return d, nil
}

// updateDocumentByKey sets the name and content of the document with the
// key, and reports false when no document has it. A task_id in req must
// name the document's own task: another existing task is a
// documentTaskError, and a task that does not exist a notFoundError.
func (s *Service) updateDocumentByKey(ctx context.Context, req *workspacev1.UpsertDocumentRequest) (document, bool, error) {
	const selectQuery = `SELECT ` + documentColumns + `
		FROM workspace.documents
		WHERE account_id = $1 AND doc_key = $2
		FOR NO KEY UPDATE`
	const updateQuery = `
		UPDATE workspace.documents SET name = $3, content = $4, update_time = $5
		WHERE account_id = $1 AND id = $2
		RETURNING ` + documentColumns

	var d document
	found := false
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		existing, err := scanDocument(tx.QueryRow(ctx, selectQuery, req.GetAccountId(), req.GetKey()))
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("get document with key %q: %w", req.GetKey(), translate(err))
		}

		if taskID := req.GetTaskId(); taskID != "" && taskID != existing.TaskID {
			if err := checkTask(ctx, tx, req.GetAccountId(), taskID); err != nil {
				return err
			}
			return &documentTaskError{key: req.GetKey(), taskID: taskID, documentTaskID: existing.TaskID}
		}

		d, err = scanDocument(tx.QueryRow(ctx, updateQuery, req.GetAccountId(), existing.ID, req.GetName(), req.GetContent(), s.now()))
		if err != nil {
			return fmt.Errorf("update document with key %q: %w", req.GetKey(), translate(err))
		}
		found = true

		return nil
	})
	if err != nil {
		return document{}, false, err
	}

	return d, found, nil
}

// deleteDocument deletes a document. For a file in a task it records the
// deletion in Metering in the same transaction (see deleteCounted), so the
// task's slot is freed exactly when the row goes. A file outside any task
// adds to no running total, and a folder counts nothing, so their deletions
// do not call Metering and work while Metering is unavailable.
func (s *Service) deleteDocument(ctx context.Context, accountID, documentID string) error {
	const query = `
		DELETE FROM workspace.documents
		WHERE account_id = $1 AND id = $2
		RETURNING kind, coalesce(task_id, '')`

	return s.deleteCounted(ctx, deletion{
		accountID:  accountID,
		operation:  "DeleteDocument",
		resourceID: documentID,
		metric:     meteringv1.Metric_METRIC_DOCUMENTS,
		delete: func(ctx context.Context, tx pgx.Tx) (bool, error) {
			var kind, taskID string
			err := tx.QueryRow(ctx, query, accountID, documentID).Scan(&kind, &taskID)
			if errors.Is(err, pgx.ErrNoRows) {
				return false, &notFoundError{kind: "document", id: documentID}
			}
			if err != nil {
				return false, fmt.Errorf("delete document %q: %w", documentID, translate(err))
			}
			return kind == kindFile && taskID != "", nil
		},
	})
}

const documentColumns = `id, account_id, coalesce(task_id, ''), name, kind, coalesce(doc_key, ''), content,
	created_by, create_time, update_time`

func scanDocument(row pgx.Row) (document, error) {
	var d document
	err := row.Scan(&d.ID, &d.AccountID, &d.TaskID, &d.Name, &d.Kind, &d.Key, &d.Content, &d.CreatedBy, &d.CreateTime, &d.UpdateTime)
	d.CreateTime = d.CreateTime.UTC()
	d.UpdateTime = d.UpdateTime.UTC()

	return d, err
}

func insertDocument(ctx context.Context, tx pgx.Tx, d document) error {
	const query = `
		INSERT INTO workspace.documents (id, account_id, task_id, name, kind, doc_key, content, created_by, create_time, update_time)
		VALUES ($1, $2, nullif($3, ''), $4, $5, nullif($6, ''), $7, $8, $9, $10)`

	_, err := tx.Exec(ctx, query, d.ID, d.AccountID, d.TaskID, d.Name, d.Kind, d.Key, d.Content, d.CreatedBy, d.CreateTime, d.UpdateTime)
	switch {
	case isConstraintViolation(err, uniqueViolation, documentKeyConstraint):
		return fmt.Errorf("insert document with key %q: %w", d.Key, errDocumentKeyTaken)
	case err != nil:
		return fmt.Errorf("insert document %q: %w", d.ID, translate(err))
	}

	return nil
}

// getDocument returns the document, or a notFoundError.
func getDocument(ctx context.Context, q querier, accountID, id string) (document, error) {
	query := `SELECT ` + documentColumns + ` FROM workspace.documents WHERE account_id = $1 AND id = $2`

	d, err := scanDocument(q.QueryRow(ctx, query, accountID, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return document{}, &notFoundError{kind: "document", id: id}
	}
	if err != nil {
		return document{}, fmt.Errorf("get document %q: %w", id, translate(err))
	}

	return d, nil
}
