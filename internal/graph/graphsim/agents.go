package graphsim

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/callbot/callbot/internal/graph"
)

// AgentAnswer is what a simulated agent does when a call is transferred or redirected to them,
// or when a bot invites them into a call.
type AgentAnswer int

// Agent behaviours.
const (
	AgentAccept   AgentAnswer = iota // accept after Options.StepDelay
	AgentDecline                     // decline after Options.StepDelay
	AgentNoAnswer                    // let it ring for Options.RingTimeout
)

func (a AgentAnswer) String() string {
	switch a {
	case AgentAccept:
		return "accept"
	case AgentDecline:
		return "decline"
	case AgentNoAnswer:
		return "no-answer"
	}
	return "unknown"
}

// ParseAgentAnswer reads "accept", "decline" or "no-answer" (any case; "" is accept).
func ParseAgentAnswer(s string) (AgentAnswer, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "accept":
		return AgentAccept, nil
	case "decline":
		return AgentDecline, nil
	case "no-answer", "noanswer":
		return AgentNoAnswer, nil
	}
	return 0, fmt.Errorf("%q is not accept, decline or no-answer", s)
}

// AgentSpec describes a Teams user who can take calls.
type AgentSpec struct {
	ID, DisplayName string
	// Availability and Activity are the initial presence; default Available/Available.
	Availability, Activity string
	Answer                 AgentAnswer
	// TalkTime is how long the agent is Busy/InACall after accepting a call, before presence
	// returns to what it was; default 2s. An agent invited into a call leaves it after TalkTime
	// (or when the caller hangs up first).
	TalkTime time.Duration
}

// AgentStats counts what happened to an agent.
type AgentStats struct {
	Offered  int `json:"offered"` // transfers, redirects and invites that rang this agent
	Accepted int `json:"accepted"`
	Declined int `json:"declined"`
	Missed   int `json:"missed"` // offers that rang out (AgentNoAnswer)
	// MaxConcurrentOffers is the most offers ringing or connected to this agent at the same
	// time. A contact center that never offers a busy agent a second call keeps it at 1.
	MaxConcurrentOffers int `json:"maxConcurrentOffers"`
}

type agent struct {
	spec    AgentSpec
	answer  AgentAnswer
	stats   AgentStats
	active  int // offers ringing or connected
	talking int
	before  graph.Presence // presence to restore when the last talk ends
}

// offer is one agent ringing for one call (a transfer, a redirect target or an invite).
type offer struct {
	id        string
	a         *agent // nil: not an agent the simulator knows
	answer    AgentAnswer
	connected bool
	talk      *time.Timer // ends the talk after TalkTime; nil once it ended
	ended     bool        // the talk is over: the agent is free of this offer
}

// AddAgent adds (or replaces the spec of) an agent and sets their presence.
func (s *Sim) AddAgent(a AgentSpec) {
	if a.Availability == "" {
		a.Availability = "Available"
	}
	if a.Activity == "" {
		a.Activity = a.Availability
	}
	if a.TalkTime <= 0 {
		a.TalkTime = DefaultTalkTime
	}
	k := strings.ToLower(a.ID)
	s.mu.Lock()
	defer s.mu.Unlock()
	ag := s.agents[k]
	if ag == nil {
		ag = &agent{}
		s.agents[k] = ag
	}
	ag.spec, ag.answer = a, a.Answer
	s.presence[k] = graph.Presence{UserID: a.ID, Availability: a.Availability, Activity: a.Activity}
}

// SetPresence sets the presence getPresencesByUserId reports for a user (agent or not).
func (s *Sim) SetPresence(id, availability, activity string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.presence[strings.ToLower(id)] = graph.Presence{UserID: id, Availability: availability, Activity: activity}
}

// Presence returns a user's current presence (PresenceUnknown for unknown users).
func (s *Sim) Presence(id string) graph.Presence {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.presenceOf(id)
}

func (s *Sim) presenceOf(id string) graph.Presence {
	p, ok := s.presence[strings.ToLower(id)]
	if !ok {
		return graph.Presence{UserID: id, Availability: "PresenceUnknown", Activity: "PresenceUnknown"}
	}
	p.UserID = id
	return p
}

// SetAgentAnswer changes what an agent does with the next offers.
func (s *Sim) SetAgentAnswer(id string, a AgentAnswer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ag := s.agents[strings.ToLower(id)]; ag != nil {
		ag.answer = a
	}
}

// AgentStats returns what happened to an agent so far (zero for an unknown id).
func (s *Sim) AgentStats(id string) AgentStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ag := s.agents[strings.ToLower(id)]; ag != nil {
		return ag.stats
	}
	return AgentStats{}
}

// ring offers the call to a user. Called with s.mu held.
func (s *Sim) ring(c *call, id string) *offer {
	o := &offer{id: id, a: s.agents[strings.ToLower(id)]}
	if o.a != nil {
		o.answer = o.a.answer
		o.a.stats.Offered++
		o.a.active++
		o.a.stats.MaxConcurrentOffers = max(o.a.stats.MaxConcurrentOffers, o.a.active)
	}
	c.offers = append(c.offers, o)
	return o
}

func (c *call) rings(o *offer) bool { return slices.Contains(c.offers, o) }

// release ends an offer that was not accepted. Called with s.mu held.
func (s *Sim) release(c *call, o *offer) {
	c.offers = slices.DeleteFunc(c.offers, func(x *offer) bool { return x == o })
	if o.a != nil && !o.connected {
		o.a.active--
	}
}

func (s *Sim) releaseAll(c *call) {
	for _, o := range slices.Clone(c.offers) {
		s.release(c, o)
	}
}

// connect makes the agent take the call: Busy/InACall until the talk ends, then the presence
// they had before. The talk ends after the agent's TalkTime (then left, when not nil, runs) or
// earlier by endTalk. The offer stays counted in active until the talk ends. Called with s.mu
// held.
func (s *Sim) connect(c *call, o *offer, left func()) {
	c.offers = slices.DeleteFunc(c.offers, func(x *offer) bool { return x == o })
	a := o.a
	o.connected = true
	a.stats.Accepted++
	c.res.ConnectedAt = time.Now()
	if a.talking == 0 {
		a.before = s.presenceOf(a.spec.ID)
		s.presence[strings.ToLower(a.spec.ID)] = graph.Presence{UserID: a.spec.ID, Availability: "Busy", Activity: "InACall"}
	}
	a.talking++
	o.talk = s.after(a.spec.TalkTime, func() {
		o.talk = nil
		s.endTalk(o)
		if left != nil {
			left()
		}
	})
}

// endTalk ends a connected agent's talk at once: the agent no longer counts the offer as
// active and gets their presence back when no other talk goes on. Doing it twice does nothing.
// Called with s.mu held.
func (s *Sim) endTalk(o *offer) {
	if !o.connected || o.ended {
		return
	}
	o.ended = true
	s.stopTimer(o.talk)
	o.talk = nil
	a := o.a
	a.talking--
	a.active--
	if a.talking > 0 {
		return
	}
	// Restore unless someone set another presence during the call.
	k := strings.ToLower(a.spec.ID)
	if p := s.presence[k]; p.Availability == "Busy" && p.Activity == "InACall" {
		s.presence[k] = a.before
	}
}

// handlePresences: POST /communications/getPresencesByUserId, at most 650 ids a request
// (https://learn.microsoft.com/en-us/graph/api/cloudcommunications-getpresencesbyuserid).
func (s *Sim) handlePresences(w http.ResponseWriter, r *http.Request, info *reqInfo) {
	info.action = "getPresencesByUserId"
	if s.requestFault(w, r, info.action, false) {
		return
	}
	var req struct {
		IDs []string `json:"ids"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		s.graphError(w, r, http.StatusBadRequest, "BadRequest", "Invalid request body: "+err.Error())
		return
	}
	switch n := len(req.IDs); {
	case n == 0:
		s.graphError(w, r, http.StatusBadRequest, "BadRequest", "ids must not be empty.")
		return
	case n > graph.MaxPresenceIDs:
		s.graphError(w, r, http.StatusBadRequest, "BadRequest", "The number of ids exceeds the maximum of 650.")
		return
	}
	out := make([]graph.Presence, len(req.IDs))
	s.mu.Lock()
	for i, id := range req.IDs {
		out[i] = s.presenceOf(id)
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{
		"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Collection(microsoft.graph.presence)",
		"value":          out,
	})
}
