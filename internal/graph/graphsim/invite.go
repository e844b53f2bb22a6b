package graphsim

import (
	"net/http"
	"strconv"

	"github.com/callbot/callbot/internal/graph"
)

// Conference-style hand-off: the bot invites one agent into its established call and stays in
// it (https://learn.microsoft.com/en-us/graph/api/participant-invite).
//
//	POST /communications/calls/{id}/participants/invite
//	  200 inviteParticipantsOperation (status "Running", PascalCase) + Location .../operations/{opId}
//	agent accepts (after StepDelay):
//	  deleted  /communications/calls/{id}/operations/{opId}  status completed, 200/0
//	  updated  /communications/calls/{id}/participants       caller, bot, agent
//	  ... the agent's TalkTime passes:
//	  updated  /communications/calls/{id}/participants       caller, bot
//	agent declines (after StepDelay), does not answer (after RingTimeout) or is unknown:
//	  deleted  /communications/calls/{id}/operations/{opId}  status failed, 486/0, 408/10057 or 480/10037
//
//	GET /communications/calls/{id}/participants
//	  200 {"value": [the roster as the last update listed it]} once an agent has joined (a group
//	  call); 400 before (Graph does not list the participants of a peer-to-peer call)
//
// Graph documents no failed invite; the failure codes are graphsim's choice (docs/graphsim.md).

// Result codes of a failed invite.
const (
	inviteDeclinedCode, inviteDeclinedSubcode = 486, 0     // SIP 486 Busy Here: the agent declined
	inviteNoAnswerCode, inviteNoAnswerSubcode = 408, 10057 // Delete call page: no signaling from callee endpoints
	inviteUnknownCode, inviteUnknownSubcode   = 480, 10037 // Delete call page: no callee endpoints were found
)

// inviteRunning is the status of the invite response, as Graph's documented response spells it
// (payloads/response-participants-invite-operation.json).
const inviteRunning graph.OperationStatus = "Running"

// invite is one invitation of an agent into a call.
type invite struct {
	id, clientContext string
	target            invitationParticipant // as the completion notification lists it
	offer             *offer
	participantID     string // the agent's participant id once joined
	joined            bool
	seq               int64 // rosterSequenceNumber of the update that listed the agent joined
}

// inviteOpData is an inviteParticipantsOperation, in the invite response and its completion
// notification.
type inviteOpData struct {
	ODataType     string                  `json:"@odata.type"`
	ODataID       string                  `json:"@odata.id,omitempty"`
	ID            string                  `json:"id"`
	Status        graph.OperationStatus   `json:"status"`
	ClientContext string                  `json:"clientContext,omitempty"`
	ResultInfo    *resultInfo             `json:"resultInfo,omitempty"`
	Participants  []invitationParticipant `json:"participants"`
}

// invitationParticipant is an invitationParticipantInfo as the documented invite examples
// spell it, with @odata.type on the identity set and the identity.
type invitationParticipant struct {
	ODataType      string      `json:"@odata.type"`
	Identity       identitySet `json:"identity"`
	ReplacesCallID string      `json:"replacesCallId,omitempty"`
}

type identitySet struct {
	ODataType string        `json:"@odata.type"`
	User      *identityData `json:"user,omitempty"`
}

type identityData struct {
	ODataType        string `json:"@odata.type"`
	ID               string `json:"id"`
	DisplayName      string `json:"displayName,omitempty"`
	IdentityProvider string `json:"identityProvider,omitempty"`
	TenantID         string `json:"tenantId,omitempty"`
}

// participantData is a #microsoft.graph.participant of a roster update
// (https://learn.microsoft.com/en-us/graph/api/resources/participant).
type participantData struct {
	ODataType            string                `json:"@odata.type"`
	ID                   string                `json:"id"`
	Info                 graph.ParticipantInfo `json:"info"`
	MediaStreams         []mediaStream         `json:"mediaStreams"`
	IsMuted              bool                  `json:"isMuted"`
	IsInLobby            bool                  `json:"isInLobby"`
	RosterSequenceNumber int64                 `json:"rosterSequenceNumber"`
}

type mediaStream struct {
	ODataType   string `json:"@odata.type"`
	MediaType   string `json:"mediaType"`
	SourceID    string `json:"sourceId"`
	Direction   string `json:"direction"`
	ServerMuted bool   `json:"serverMuted"`
}

func (s *Sim) handleInvite(w http.ResponseWriter, r *http.Request, info *reqInfo) {
	info.action = "invite"
	s.runCallAction(w, r, info, (*Sim).invite)
}

// invite: POST /participants/invite. Only on an established call, one participant at a time.
// The agent rings as for a transfer; the operation completes (joined, roster updated) or fails.
func (s *Sim) invite(c *call, body []byte) (reply, *apiError) {
	var req struct {
		Participants []struct {
			Identity       graph.IdentitySet `json:"identity"`
			ReplacesCallID string            `json:"replacesCallId"`
		} `json:"participants"`
		ClientContext string `json:"clientContext"`
	}
	if e := decode(body, &req); e != nil {
		return reply{}, e
	}
	if c.state != graph.CallEstablished {
		return reply{}, wrongState(c, "invite")
	}
	switch n := len(req.Participants); {
	case n == 0:
		return reply{}, badRequest("participants is required.")
	case n > 1:
		return reply{}, badRequest("graphsim simulates inviting one participant at a time, not %d.", n)
	}
	p, ok := req.Participants[0].Identity.Primary()
	if !ok || p.ID == "" {
		return reply{}, badRequest("participants[0] has no identity.")
	}
	if c.invite != nil {
		what := "ringing"
		if c.invite.joined {
			what = "in the call"
		}
		return reply{}, badRequest("An invited participant (%s) is %s already.", c.invite.offer.id, what)
	}
	if e := checkClientContext(req.ClientContext); e != nil {
		return reply{}, e
	}
	inv := &invite{
		id: newID(), clientContext: req.ClientContext, participantID: newID(),
		target: invitationParticipant{
			ODataType: "#microsoft.graph.invitationParticipantInfo",
			Identity: identitySet{ODataType: "#microsoft.graph.identitySet", User: &identityData{
				ODataType: "#microsoft.graph.identity", ID: p.ID, IdentityProvider: "AAD", TenantID: s.opts.TenantID,
			}},
			ReplacesCallID: req.Participants[0].ReplacesCallID,
		},
	}
	c.invite = inv
	c.res.Invites = append(c.res.Invites, p.ID)
	o := s.ring(c, p.ID)
	inv.offer = o
	live := func() bool { return c.invite == inv && c.rings(o) }
	switch {
	case o.a == nil:
		s.afterCall(c, s.opts.StepDelay, func() {
			if live() {
				s.inviteFailed(c, inv, inviteUnknownCode, inviteUnknownSubcode, "The invited participant could not be found.")
			}
		})
	case o.answer == AgentAccept:
		s.afterCall(c, s.opts.StepDelay, func() {
			if live() {
				s.inviteJoined(c, inv)
			}
		})
	case o.answer == AgentDecline:
		s.afterCall(c, s.opts.StepDelay, func() {
			if live() {
				o.a.stats.Declined++
				s.inviteFailed(c, inv, inviteDeclinedCode, inviteDeclinedSubcode, "The invited participant declined the call.")
			}
		})
	default:
		s.afterCall(c, s.opts.RingTimeout, func() {
			if live() {
				o.a.stats.Missed++
				s.inviteFailed(c, inv, inviteNoAnswerCode, inviteNoAnswerSubcode, "The invited participant did not answer.")
			}
		})
	}
	// Graph's invite response spells the status "Running" (PascalCase), unlike the lower-case
	// statuses of playPrompt's response and of every operation notification (the examples of the
	// participant-invite and call-playprompt pages).
	return reply{status: http.StatusOK, location: s.GraphURL() + c.path() + "/operations/" + inv.id,
		body: s.inviteOp(inv, inviteRunning, nil)}, nil
}

func (s *Sim) inviteOp(inv *invite, status graph.OperationStatus, r *resultInfo) inviteOpData {
	return inviteOpData{
		ODataType: graph.TypeInviteParticipantsOp, ID: inv.id, Status: status,
		ClientContext: inv.clientContext, ResultInfo: r, Participants: []invitationParticipant{inv.target},
	}
}

// sendInviteOp queues the final notification of an invite. Called with s.mu held.
func (s *Sim) sendInviteOp(c *call, inv *invite, status graph.OperationStatus, r resultInfo) {
	p := c.path() + "/operations/" + inv.id
	d := s.inviteOp(inv, status, &r)
	d.ODataID = p
	s.enqueue(c, graph.Deleted, p, string(status), d, nil)
}

// inviteJoined connects the agent: the operation completes, then the roster lists the agent
// until their TalkTime has passed. Called with s.mu held.
func (s *Sim) inviteJoined(c *call, inv *invite) {
	o := inv.offer
	s.connect(c, o, func() { s.inviteLeft(c, inv) })
	inv.joined = true
	c.grouped = true
	c.res.Agent = o.id
	s.sendInviteOp(c, inv, graph.OpCompleted, resultInfo{code: 200, message: "Action completed successfully."})
	s.sendRoster(c)
}

// inviteFailed completes the operation as failed and frees the agent. Called with s.mu held.
func (s *Sim) inviteFailed(c *call, inv *invite, code, subcode int, msg string) {
	s.release(c, inv.offer)
	c.invite = nil
	s.sendInviteOp(c, inv, graph.OpFailed, resultInfo{code: code, subcode: subcode, message: msg})
}

// inviteLeft: the agent's TalkTime has passed and they hang up; the caller and the bot stay.
// Nothing else happens: the bot is expected to hang up. Called with s.mu held.
func (s *Sim) inviteLeft(c *call, inv *invite) {
	if c.ended || c.invite != inv {
		return
	}
	c.invite = nil
	if c.state == graph.CallEstablished {
		s.sendRoster(c)
	}
}

// sendRoster queues a roster update: the caller, the bot and, while one is joined, the invited
// agent. Every update is the whole roster. The updates are numbered one by one, and each entry
// carries the number of the update in which that participant was last updated, as Graph's
// rosterSequenceNumber is documented ("the roster sequence number in which the participant was
// last updated", https://learn.microsoft.com/en-us/graph/api/resources/participant): the
// caller and the bot keep the number of the first update (the call became a group call), the
// agent has the number of the update that listed them joined, and the update that shows them
// gone lists only older numbers. Called with s.mu held.
func (s *Sim) sendRoster(c *call) {
	c.rosterSeq++
	if c.memberSeq == 0 {
		c.memberSeq = c.rosterSeq
	}
	if inv := c.invite; inv != nil && inv.joined && inv.seq == 0 {
		inv.seq = c.rosterSeq
	}
	s.enqueue(c, graph.Updated, c.path()+"/participants", "", s.roster(c), nil)
}

// handleParticipants: GET /participants lists the call's roster, for a group call.
func (s *Sim) handleParticipants(w http.ResponseWriter, r *http.Request, info *reqInfo) {
	info.action = "participants"
	s.runCallAction(w, r, info, func(s *Sim, c *call, _ []byte) (reply, *apiError) {
		if !c.grouped {
			return reply{}, badRequest("Listing participants is not supported for peer-to-peer calls.")
		}
		return reply{status: http.StatusOK, body: map[string]any{
			"@odata.context": s.GraphURL() + "/$metadata#communications/calls('" + c.id + "')/participants",
			"value":          s.roster(c),
		}}, nil
	})
}

// roster is the call's participants: the caller, the bot and, while one is joined, the invited
// agent, each with the rosterSequenceNumber of the update that last changed it (sendRoster).
// Called with s.mu held.
func (s *Sim) roster(c *call) []participantData {
	stream := func(n int) []mediaStream {
		return []mediaStream{{ODataType: "#microsoft.graph.mediaStream", MediaType: "audio",
			SourceID: strconv.Itoa(n), Direction: "sendReceive"}}
	}
	part := func(id string, info graph.ParticipantInfo, n int, seq int64) participantData {
		info.ODataType, info.EndpointType = "#microsoft.graph.participantInfo", "default"
		return participantData{ODataType: graph.TypeParticipant, ID: id, Info: info,
			MediaStreams: stream(n), RosterSequenceNumber: seq}
	}
	roster := []participantData{
		part(c.callerPartID, graph.ParticipantInfo{Identity: graph.IdentitySetFor(c.from)}, 1, c.memberSeq),
		part(c.myParticipantID, graph.ParticipantInfo{Identity: graph.IdentitySet{
			Application: &graph.Identity{ID: s.opts.ClientID, TenantID: s.opts.TenantID}}}, 2, c.memberSeq),
	}
	if inv := c.invite; inv != nil && inv.joined {
		u := &graph.Identity{ID: inv.offer.id, TenantID: s.opts.TenantID}
		if inv.offer.a != nil {
			u.DisplayName = inv.offer.a.spec.DisplayName
		}
		roster = append(roster, part(inv.participantID, graph.ParticipantInfo{Identity: graph.IdentitySet{User: u}}, 3, inv.seq))
	}
	return roster
}
