package graph

import "context"

type scenarioKey struct{}

// WithScenarioID returns a context carrying the Scenario-Id Graph sent with a notification, so
// outbound requests made for that call carry it too (Graph correlates a call's requests by it).
func WithScenarioID(ctx context.Context, id string) context.Context {
	if id == "" {
		return ctx
	}
	return context.WithValue(ctx, scenarioKey{}, id)
}

// ScenarioID returns the Scenario-Id stored by WithScenarioID, or "".
func ScenarioID(ctx context.Context) string {
	s, _ := ctx.Value(scenarioKey{}).(string)
	return s
}
