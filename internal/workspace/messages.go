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

// messageServer serves MessageService.
type messageServer struct {
	workspacev1.UnimplementedMessageServiceServer
	svc *Service
}

// CreateMessage stores a message and counts it.
func (m *messageServer) CreateMessage(ctx context.Context, req *workspacev1.CreateMessageRequest) (*workspacev1.CreateMessageResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	v.optionalID("task_id", req.GetTaskId())
	v.text("body", req.GetBody(), true, MaxBodyLength)
	v.optionalID("request_id", req.GetRequestId())
	if err := v.err(); err != nil {
		return nil, m.svc.toStatus(ctx, err)
	}

	msg, err := m.svc.createMessage(ctx, req)
	if err != nil {
		return nil, m.svc.toStatus(ctx, err)
	}

	return &workspacev1.CreateMessageResponse{Message: msg.proto()}, nil
}

// message is a row of workspace.messages. TaskID is empty when unset.
type message struct {
	ID         string
	AccountID  string
	TaskID     string
	Body       string
	CreatedBy  string
	CreateTime time.Time
}

func (m message) proto() *workspacev1.Message {
	return &workspacev1.Message{
		Id:         m.ID,
		AccountId:  m.AccountID,
		TaskId:     m.TaskID,
		Body:       m.Body,
		CreatedBy:  m.CreatedBy,
		CreateTime: timestamppb.New(m.CreateTime),
	}
}

// createMessage inserts the message and then counts it with RecordUsage in
// the same transaction: a message is never refused for quota, but when
// Metering cannot be reached it is not stored either.
func (s *Service) createMessage(ctx context.Context, req *workspacev1.CreateMessageRequest) (message, error) {
	const operation = "CreateMessage"
	const query = `
		INSERT INTO workspace.messages (id, account_id, task_id, body, created_by, create_time)
		VALUES ($1, $2, nullif($3, ''), $4, $5, $6)`

	hash, err := requestHash(operation, req)
	if err != nil {
		return message{}, err
	}
	if err := checkTask(ctx, s.pool, req.GetAccountId(), req.GetTaskId()); err != nil {
		return message{}, err
	}

	m := message{
		ID:         resourceID(messagePrefix, req.GetAccountId(), req.GetRequestId()),
		AccountID:  req.GetAccountId(),
		TaskID:     req.GetTaskId(),
		Body:       req.GetBody(),
		CreatedBy:  actor(ctx),
		CreateTime: s.now(),
	}
	id, replayed, err := s.guard(ctx, create{
		accountID:    m.AccountID,
		operation:    operation,
		requestID:    req.GetRequestId(),
		requestHash:  hash,
		requestField: "request_id",
		resourceID:   m.ID,
		recorded:     []*meteringv1.UsageItem{{Metric: meteringv1.Metric_METRIC_MESSAGES, Amount: 1}},
		write: func(ctx context.Context, tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, query, m.ID, m.AccountID, m.TaskID, m.Body, m.CreatedBy, m.CreateTime); err != nil {
				return fmt.Errorf("insert message %q: %w", m.ID, translate(err))
			}
			return nil
		},
	})
	if err != nil {
		return message{}, err
	}
	if replayed {
		return loadReplay(ctx, s, m.AccountID, "request_id", req.GetRequestId(), id, getMessage)
	}

	return m, nil
}

// getMessage returns the message, or a notFoundError.
func getMessage(ctx context.Context, q querier, accountID, id string) (message, error) {
	const query = `
		SELECT id, account_id, coalesce(task_id, ''), body, created_by, create_time
		FROM workspace.messages
		WHERE account_id = $1 AND id = $2`

	var m message
	err := q.QueryRow(ctx, query, accountID, id).Scan(&m.ID, &m.AccountID, &m.TaskID, &m.Body, &m.CreatedBy, &m.CreateTime)
	if errors.Is(err, pgx.ErrNoRows) {
		return message{}, &notFoundError{kind: "message", id: id}
	}
	if err != nil {
		return message{}, fmt.Errorf("get message %q: %w", id, translate(err))
	}
	m.CreateTime = m.CreateTime.UTC()

	return m, nil
}
