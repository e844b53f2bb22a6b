package queue

import (
	"context"

	"github.com/callbot/callbot/internal/graph"
)

// PresenceSource reads the Teams presence of up to graph.MaxPresenceIDs users in one request.
type PresenceSource interface {
	Presences(ctx context.Context, userIDs []string) ([]graph.Presence, error)
}
