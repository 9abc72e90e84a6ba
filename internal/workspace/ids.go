package workspace

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"

	"google.golang.org/protobuf/proto"

	"github.com/metering/metering/internal/principal"
)

// ID prefixes of the kinds of rows.
const (
	agentPrefix      = "agt_"
	agentTokenPrefix = "atk_"
	taskPrefix       = "tsk_"
	documentPrefix   = "doc_"
	messagePrefix    = "msg_"
	attachmentPrefix = "att_"
)

// meteringKeyPrefix starts the Metering idempotency keys of the workspace,
// so they never collide with the keys of other callers of the same account.
const meteringKeyPrefix = "workspace/"

// newID returns prefix followed by 128 random bits in hex.
func newID(prefix string) string {
	var b [16]byte
	// Since Go 1.24, crypto/rand.Read never returns an error: it crashes
	// the program when the system has no randomness.
	_, _ = rand.Read(b[:])

	return prefix + hex.EncodeToString(b[:])
}

// resourceID returns the id of the row that a create makes. Without a
// request id the id is random. With one, it is derived from the account and
// the request id, so every attempt of the request writes the row under the
// same id and Metering counts the same resource.
func resourceID(prefix, accountID, requestID string) string {
	if requestID == "" {
		return newID(prefix)
	}

	sum := sha256.Sum256([]byte(accountID + "\x00" + requestID))

	return prefix + hex.EncodeToString(sum[:16])
}

// meteringKeyBase returns the start of the Metering idempotency keys of a
// request id, or "" without one. The request id is hashed, so the key stays
// within Metering's 128 bytes whatever the request id contains.
func meteringKeyBase(requestID string) string {
	if requestID == "" {
		return ""
	}

	sum := sha256.Sum256([]byte(requestID))

	return meteringKeyPrefix + hex.EncodeToString(sum[:16])
}

// requestHash returns a SHA-256 hash over the operation and the request
// message, to tell a retry from another request with the same request id.
func requestHash(operation string, msg proto.Message) ([]byte, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(msg)
	if err != nil {
		return nil, err
	}

	h := sha256.New()
	h.Write([]byte(operation))
	h.Write([]byte{0})
	h.Write(b)

	return h.Sum(nil), nil
}

// actor returns how a created row records its creator: "user:<id>" for a
// user and "agent:<id>" for the runtime worker of an agent.
func actor(ctx context.Context) string {
	p, _ := principal.FromContext(ctx)

	switch {
	case p.Kind == principal.User:
		return "user:" + p.UserID
	case p.Kind == principal.Service && p.AgentID != "":
		return "agent:" + p.AgentID
	default:
		// The policy admits no other caller. Should it change, the row
		// still names the principal.
		return p.Actor()
	}
}
