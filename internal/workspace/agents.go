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
	"github.com/metering/metering/internal/auth"
)

// agentServer serves AgentService.
type agentServer struct {
	workspacev1.UnimplementedAgentServiceServer
	svc *Service
}

// CreateAgent counts one agent and returns it with its first runtime token.
func (a *agentServer) CreateAgent(ctx context.Context, req *workspacev1.CreateAgentRequest) (*workspacev1.CreateAgentResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	v.name("name", req.GetName())
	v.optionalID("request_id", req.GetRequestId())
	if err := v.err(); err != nil {
		return nil, a.svc.toStatus(ctx, err)
	}

	agent, token, err := a.svc.createAgent(ctx, req)
	if err != nil {
		return nil, a.svc.toStatus(ctx, err)
	}

	return &workspacev1.CreateAgentResponse{Agent: agent.proto(), RuntimeToken: token}, nil
}

// DeleteAgent deletes an agent with its runtime tokens and frees its slot.
func (a *agentServer) DeleteAgent(ctx context.Context, req *workspacev1.DeleteAgentRequest) (*workspacev1.DeleteAgentResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	v.id("agent_id", req.GetAgentId())
	if err := v.err(); err != nil {
		return nil, a.svc.toStatus(ctx, err)
	}

	if err := a.svc.deleteAgent(ctx, req.GetAccountId(), req.GetAgentId()); err != nil {
		return nil, a.svc.toStatus(ctx, err)
	}

	return &workspacev1.DeleteAgentResponse{}, nil
}

// RotateAgentToken revokes the agent's runtime tokens and issues a new one.
func (a *agentServer) RotateAgentToken(ctx context.Context, req *workspacev1.RotateAgentTokenRequest) (*workspacev1.RotateAgentTokenResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	v.id("agent_id", req.GetAgentId())
	if err := v.err(); err != nil {
		return nil, a.svc.toStatus(ctx, err)
	}

	token, err := a.svc.rotateAgentToken(ctx, req.GetAccountId(), req.GetAgentId())
	if err != nil {
		return nil, a.svc.toStatus(ctx, err)
	}

	return &workspacev1.RotateAgentTokenResponse{RuntimeToken: token}, nil
}

// agent is a row of workspace.agents.
type agent struct {
	ID         string
	AccountID  string
	Name       string
	CreatedBy  string
	CreateTime time.Time
}

func (a agent) proto() *workspacev1.Agent {
	return &workspacev1.Agent{
		Id:         a.ID,
		AccountId:  a.AccountID,
		Name:       a.Name,
		CreatedBy:  a.CreatedBy,
		CreateTime: timestamppb.New(a.CreateTime),
	}
}

// createAgent counts and creates an agent and its first runtime token. It
// returns no token when the request id replays an earlier create, because
// only the token's hash is stored.
//
// NOTE: an agent whose rows a background task wrote after its request ended
// (see settleInBackground) has a runtime token that no caller received;
// RotateAgentToken issues one.
func (s *Service) createAgent(ctx context.Context, req *workspacev1.CreateAgentRequest) (agent, string, error) {
	const operation = "CreateAgent"

	hash, err := requestHash(operation, req)
	if err != nil {
		return agent{}, "", err
	}

	a := agent{
		ID:         resourceID(agentPrefix, req.GetAccountId(), req.GetRequestId()),
		AccountID:  req.GetAccountId(),
		Name:       req.GetName(),
		CreatedBy:  actor(ctx),
		CreateTime: s.now(),
	}
	var token string
	id, replayed, err := s.guard(ctx, create{
		accountID:    a.AccountID,
		operation:    operation,
		requestID:    req.GetRequestId(),
		requestHash:  hash,
		requestField: "request_id",
		resourceID:   a.ID,
		reserved:     []*meteringv1.UsageItem{{Metric: meteringv1.Metric_METRIC_AGENTS, Amount: 1}},
		ttl:          s.cfg.ReservationTTL,
		write: func(ctx context.Context, tx pgx.Tx) error {
			if err := insertAgent(ctx, tx, a); err != nil {
				return err
			}
			token, err = issueRuntimeToken(ctx, tx, a, a.CreateTime)
			return err
		},
	})
	if err != nil {
		return agent{}, "", err
	}
	if replayed {
		a, err := loadReplay(ctx, s, a.AccountID, "request_id", req.GetRequestId(), id, getAgent)
		return a, "", err
	}

	return a, token, nil
}

// deleteAgent deletes an agent and its runtime tokens and records the
// deletion in Metering (see deleteCounted).
func (s *Service) deleteAgent(ctx context.Context, accountID, agentID string) error {
	const query = `DELETE FROM workspace.agents WHERE account_id = $1 AND id = $2`

	return s.deleteCounted(ctx, deletion{
		accountID:  accountID,
		operation:  "DeleteAgent",
		resourceID: agentID,
		metric:     meteringv1.Metric_METRIC_AGENTS,
		delete: func(ctx context.Context, tx pgx.Tx) (bool, error) {
			tag, err := tx.Exec(ctx, query, accountID, agentID)
			if err != nil {
				return false, fmt.Errorf("delete agent %q: %w", agentID, translate(err))
			}
			if tag.RowsAffected() == 0 {
				return false, &notFoundError{kind: "agent", id: agentID}
			}
			return true, nil
		},
	})
}

// rotateAgentToken revokes the agent's runtime tokens and issues a new one.
// A revoked token keeps working for up to the token cache TTL of the
// server's authenticator.
func (s *Service) rotateAgentToken(ctx context.Context, accountID, agentID string) (string, error) {
	const revoke = `
		UPDATE workspace.agent_tokens SET revoke_time = $3
		WHERE account_id = $1 AND agent_id = $2 AND revoke_time IS NULL`

	var token string
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		a, err := getAgent(ctx, tx, accountID, agentID)
		if err != nil {
			return err
		}

		now := s.now()
		if _, err := tx.Exec(ctx, revoke, accountID, agentID, now); err != nil {
			return fmt.Errorf("revoke runtime tokens of agent %q: %w", agentID, translate(err))
		}
		token, err = issueRuntimeToken(ctx, tx, a, now)

		return err
	})
	if err != nil {
		return "", err
	}

	return token, nil
}

func insertAgent(ctx context.Context, tx pgx.Tx, a agent) error {
	const query = `
		INSERT INTO workspace.agents (id, account_id, name, created_by, create_time)
		VALUES ($1, $2, $3, $4, $5)`

	if _, err := tx.Exec(ctx, query, a.ID, a.AccountID, a.Name, a.CreatedBy, a.CreateTime); err != nil {
		return fmt.Errorf("insert agent %q: %w", a.ID, translate(err))
	}

	return nil
}

// getAgent returns the agent, or a notFoundError. In a transaction it
// locks the row against a concurrent delete.
func getAgent(ctx context.Context, q querier, accountID, id string) (agent, error) {
	const query = `
		SELECT id, account_id, name, created_by, create_time
		FROM workspace.agents
		WHERE account_id = $1 AND id = $2
		FOR KEY SHARE`

	var a agent
	err := q.QueryRow(ctx, query, accountID, id).Scan(&a.ID, &a.AccountID, &a.Name, &a.CreatedBy, &a.CreateTime)
	if errors.Is(err, pgx.ErrNoRows) {
		return agent{}, &notFoundError{kind: "agent", id: id}
	}
	if err != nil {
		return agent{}, fmt.Errorf("get agent %q: %w", id, translate(err))
	}
	a.CreateTime = a.CreateTime.UTC()

	return a, nil
}

// issueRuntimeToken stores the hash of a new runtime token of agent a and
// returns the token.
func issueRuntimeToken(ctx context.Context, tx pgx.Tx, a agent, now time.Time) (string, error) {
	const query = `
		INSERT INTO workspace.agent_tokens (id, agent_id, account_id, token_hash, create_time)
		VALUES ($1, $2, $3, $4, $5)`

	plaintext, hash, err := auth.GenerateServiceToken()
	if err != nil {
		return "", err
	}
	if _, err := tx.Exec(ctx, query, newID(agentTokenPrefix), a.ID, a.AccountID, hash[:], now); err != nil {
		return "", fmt.Errorf("insert runtime token of agent %q: %w", a.ID, translate(err))
	}

	return plaintext, nil
}

// loadReplay returns the resource that an earlier create with the request
// id made, or a resourceGoneError when it has been deleted since.
func loadReplay[T any](ctx context.Context, s *Service, accountID, field, requestID, id string,
	get func(ctx context.Context, q querier, accountID, id string) (T, error),
) (T, error) {
	v, err := get(ctx, s.pool, accountID, id)

	var notFound *notFoundError
	if errors.As(err, &notFound) {
		return v, &resourceGoneError{field: field, id: requestID, kind: notFound.kind, resID: id}
	}

	return v, err
}
