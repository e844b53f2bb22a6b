package graphsim

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/callbot/callbot/internal/graph"
)

// call is the simulator's record of one incoming call. Every field is guarded by Sim.mu,
// except the immutable identifiers and the channels.
type call struct {
	id, key         string
	scenarioID      string
	chainID         string
	myParticipantID string
	callerPartID    string // the caller's participant id in roster updates
	from            graph.Party
	to              string
	spec            CallerSpec

	state       graph.CallState
	callbackURI string
	appMedia    bool // answered with appHostedMediaConfig: the service-hosted media actions are refused
	subscribed  bool
	toneSeq     int64
	etag        int
	media       []*mediaOp // media[0] is playing when playing is true
	playing     bool
	mediaGen    int // bumped on cancel, so timers of cancelled operations do nothing
	heardPrompt bool
	offers      []*offer // agents ringing for a transfer, redirect or invite
	invite      *invite  // the invite ringing or joined; nil when none
	rosterSeq   int64    // number of the last roster update
	memberSeq   int64    // rosterSequenceNumber of the caller and the bot: the first update's
	grouped     bool     // an invited agent joined: a group call from then on (its roster can be listed)
	keepAlive   *time.Timer
	ended       bool
	res         CallResult

	outbox   []outNote
	wake     chan struct{}
	done     chan struct{}
	doneOnce sync.Once
}

type mediaOp struct {
	id, clientContext string
	prompts           []string
	fails             bool // PromptFailNotified: fails when its turn to play comes
}

func (c *call) path() string { return "/communications/calls/" + c.id }

// compactPath is path with the call id in its other form (compactID).
func (c *call) compactPath() string { return "/communications/calls/" + compactID(c.id) }

// resource is the full call resource, as GET returns it.
func (c *call) resource(s *Sim) callData {
	d := callData{
		ODataType: graph.TypeCall, ID: c.id, State: c.state, Direction: "incoming",
		CallbackURI: c.callbackURI, Source: c.source(), Targets: c.targets(s),
		RequestedModalities: []string{"audio"}, TenantID: s.opts.TenantID,
		MyParticipantID: c.myParticipantID, CallChainID: c.chainID,
	}
	if c.state == graph.CallEstablished || c.state == graph.CallTransferring {
		d.MediaState = &graph.MediaState{Audio: "active"}
	}
	return d
}

func (c *call) source() *graph.ParticipantInfo {
	return &graph.ParticipantInfo{
		ODataType: "#microsoft.graph.participantInfo",
		Identity:  graph.IdentitySetFor(c.from),
		Region:    "emea",
	}
}

func (c *call) targets(s *Sim) []graph.ParticipantInfo {
	return []graph.ParticipantInfo{{
		ODataType:    "#microsoft.graph.invitationParticipantInfo",
		Identity:     graph.IdentitySet{ApplicationInstance: &graph.Identity{ID: c.to, TenantID: s.opts.TenantID}},
		EndpointType: "default",
		ID:           c.myParticipantID,
	}}
}

// lookup finds a live call by id in any of its written forms. Called with s.mu held.
func (s *Sim) lookup(id string) *call {
	c := s.calls[graph.CallKey(id)]
	if c == nil || c.ended {
		return nil
	}
	return c
}

// reply is what a call action answers when it succeeds.
type reply struct {
	status   int
	body     any
	location string
}

// apiError is a Graph error answer.
type apiError struct {
	status    int
	code, msg string
}

func badRequest(format string, args ...any) *apiError {
	return &apiError{http.StatusBadRequest, "BadRequest", fmt.Sprintf(format, args...)}
}

func wrongState(c *call, action string) *apiError {
	return &apiError{http.StatusBadRequest, "BadRequest",
		fmt.Sprintf("Action %s is not allowed: call %s is in state %s.", action, c.id, c.state)}
}

type callAction func(s *Sim, c *call, body []byte) (reply, *apiError)

// callActions are the POST /communications/calls/{id}/{action} the simulator implements, by
// lower-case name.
var callActions = map[string]struct {
	name string
	fn   callAction
}{
	"answer":                {"answer", (*Sim).answer},
	"reject":                {"reject", (*Sim).reject},
	"redirect":              {"redirect", (*Sim).redirect},
	"transfer":              {"transfer", (*Sim).transfer},
	"playprompt":            {"playPrompt", (*Sim).playPrompt},
	"subscribetotone":       {"subscribeToTone", (*Sim).subscribeToTone},
	"cancelmediaprocessing": {"cancelMediaProcessing", (*Sim).cancelMediaProcessing},
	"keepalive":             {"keepAlive", (*Sim).keepAlive},
}

func (s *Sim) handleCallAction(w http.ResponseWriter, r *http.Request, info *reqInfo) {
	a, ok := callActions[strings.ToLower(r.PathValue("action"))]
	if !ok {
		info.action = r.PathValue("action")
		s.graphError(w, r, http.StatusBadRequest, "BadRequest",
			fmt.Sprintf("graphsim does not simulate the action %q.", r.PathValue("action")))
		return
	}
	info.action = a.name
	s.runCallAction(w, r, info, a.fn)
}

func (s *Sim) handleGetCall(w http.ResponseWriter, r *http.Request, info *reqInfo) {
	info.action = "get"
	s.runCallAction(w, r, info, func(s *Sim, c *call, _ []byte) (reply, *apiError) {
		return reply{status: http.StatusOK, body: c.resource(s)}, nil
	})
}

func (s *Sim) handleDeleteCall(w http.ResponseWriter, r *http.Request, info *reqInfo) {
	info.action = "delete"
	s.runCallAction(w, r, info, (*Sim).hangUpByBot)
}

func (s *Sim) handleCreateCall(w http.ResponseWriter, r *http.Request, info *reqInfo) {
	info.action = "create"
	s.graphError(w, r, http.StatusNotImplemented, "NotImplemented", "graphsim does not simulate outbound calls.")
}

// runCallAction applies fault injection, finds the call and runs the action with s.mu held;
// the response is written after the lock is released.
func (s *Sim) runCallAction(w http.ResponseWriter, r *http.Request, info *reqInfo, fn callAction) {
	if s.requestFault(w, r, info.action, false) {
		return
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		s.graphError(w, r, http.StatusBadRequest, "BadRequest", err.Error())
		return
	}
	s.mu.Lock()
	var (
		rep  reply
		aerr *apiError
	)
	if c := s.lookup(info.callID); c == nil {
		aerr = &apiError{http.StatusNotFound, "NotFound", fmt.Sprintf("Call %s was not found.", info.callID)}
	} else {
		rep, aerr = fn(s, c, body)
	}
	s.mu.Unlock()
	if aerr != nil {
		s.graphError(w, r, aerr.status, aerr.code, aerr.msg)
		return
	}
	if rep.location != "" {
		w.Header().Set("Location", rep.location)
	}
	if rep.body == nil {
		w.WriteHeader(rep.status)
		return
	}
	writeJSON(w, rep.status, rep.body)
}

func decode(body []byte, v any) *apiError {
	if len(strings.TrimSpace(string(body))) == 0 {
		body = []byte("{}")
	}
	if err := json.Unmarshal(body, v); err != nil {
		return badRequest("Invalid request body: %v", err)
	}
	return nil
}

// checkCallback: a callbackUri must be https ("This must be https", the answer and redirect
// pages: https://learn.microsoft.com/en-us/graph/api/call-answer); graphsim also takes http to
// a loopback host, where a bot under test listens.
func checkCallback(u string) *apiError {
	if u == "" {
		return nil
	}
	if err := checkURL(u); err != nil {
		return badRequest("Invalid callbackUri: %v", err)
	}
	if p, _ := url.Parse(u); p.Scheme == "http" {
		if ip := net.ParseIP(p.Hostname()); !(ip != nil && ip.IsLoopback()) && p.Hostname() != "localhost" {
			return badRequest("Invalid callbackUri: %q must be https.", u)
		}
	}
	return nil
}

// serviceMediaOnly refuses a media action on a call answered with app-hosted media: playPrompt
// and subscribeToTone are supported only for calls with serviceHostedMediaConfig
// (https://learn.microsoft.com/en-us/graph/api/call-playprompt,
// https://learn.microsoft.com/graph/api/call-subscribetotone?view=graph-rest-1.0), and
// cancelMediaProcessing only cancels such prompts (and recordResponse, service-hosted too).
func serviceMediaOnly(c *call, action string) *apiError {
	if c.appMedia {
		return badRequest("Action %s is not supported for calls with app hosted media.", action)
	}
	return nil
}

func checkClientContext(cc string) *apiError {
	if utf8.RuneCountInString(cc) > 256 { // characters, not bytes ("Max limit is 256 chars", commsOperation)
		return badRequest("clientContext is longer than 256 characters.")
	}
	return nil
}

// answerModalities are the acceptedModalities an answer may name
// (https://learn.microsoft.com/en-us/graph/api/call-answer).
var answerModalities = []string{"audio", "video", "videoBasedScreenSharing"}

// answer: POST /answer (https://learn.microsoft.com/en-us/graph/api/call-answer). 202, then
// establishing, then established.
func (s *Sim) answer(c *call, body []byte) (reply, *apiError) {
	var req struct {
		CallbackURI        string          `json:"callbackUri"`
		AcceptedModalities []string        `json:"acceptedModalities"`
		MediaConfig        json.RawMessage `json:"mediaConfig"`
	}
	if e := decode(body, &req); e != nil {
		return reply{}, e
	}
	if c.state != graph.CallIncoming {
		return reply{}, wrongState(c, "answer")
	}
	if len(req.AcceptedModalities) == 0 {
		return reply{}, badRequest("acceptedModalities is required.")
	}
	for _, m := range req.AcceptedModalities {
		if !slices.ContainsFunc(answerModalities, func(v string) bool { return strings.EqualFold(v, m) }) {
			return reply{}, badRequest("acceptedModalities: %q is not a modality (audio, video, videoBasedScreenSharing).", m)
		}
	}
	if len(req.MediaConfig) == 0 || string(req.MediaConfig) == "null" {
		return reply{}, badRequest("mediaConfig is required.")
	}
	if e := checkCallback(req.CallbackURI); e != nil {
		return reply{}, e
	}
	if req.CallbackURI != "" {
		c.callbackURI = req.CallbackURI
	}
	var media struct {
		ODataType string `json:"@odata.type"`
	}
	json.Unmarshal(req.MediaConfig, &media)
	c.appMedia = strings.EqualFold(media.ODataType, "#microsoft.graph.appHostedMediaConfig")
	c.state = graph.CallEstablishing
	c.res.Answered = true
	c.res.AnsweredAt = time.Now()
	s.sendCallCompact(c, graph.Updated, callData{State: graph.CallEstablishing}, nil)
	s.afterCall(c, s.opts.StepDelay, func() {
		if c.state != graph.CallEstablishing {
			return
		}
		c.state = graph.CallEstablished
		s.sendCallCompact(c, graph.Updated, callData{
			ID: c.id, State: graph.CallEstablished, Direction: "incoming",
			MediaState: &graph.MediaState{Audio: "active"},
		}, nil)
	})
	if d := c.spec.HangUpAfter; d > 0 {
		s.afterCall(c, d, func() { s.callerHangUp(c) })
	}
	s.watchKeepAlive(c)
	return reply{status: http.StatusAccepted}, nil
}

// watchKeepAlive (re)starts the keep-alive deadline of an answered call: when it passes, the
// call is dropped with 408/8537, "Keep Alive timeout" (a call without a keepAlive for 45 minutes
// ends: https://learn.microsoft.com/en-us/graph/api/call-keepalive; the code is in the call-end
// table of https://learn.microsoft.com/en-us/graph/api/call-delete). Called with s.mu held.
func (s *Sim) watchKeepAlive(c *call) {
	s.stopTimer(c.keepAlive)
	c.keepAlive = s.afterCall(c, s.opts.KeepAliveTimeout, func() {
		c.keepAlive = nil
		s.finish(c, OutcomeDropped, 408, 8537, nil)
	})
}

// reject: POST /reject. 202, then a bare deleted notification.
func (s *Sim) reject(c *call, body []byte) (reply, *apiError) {
	var req struct {
		Reason      string `json:"reason"`
		CallbackURI string `json:"callbackUri"`
	}
	if e := decode(body, &req); e != nil {
		return reply{}, e
	}
	if c.state != graph.CallIncoming {
		return reply{}, wrongState(c, "reject")
	}
	switch graph.RejectReason(req.Reason) {
	case "", graph.RejectNone, graph.RejectBusy, graph.RejectForbidden:
	default:
		return reply{}, badRequest("Invalid reason %q.", req.Reason)
	}
	if e := checkCallback(req.CallbackURI); e != nil {
		return reply{}, e
	}
	if req.CallbackURI != "" {
		c.callbackURI = req.CallbackURI
	}
	s.finish(c, OutcomeRejected, 0, 0, &callData{})
	return reply{status: http.StatusAccepted}, nil
}

// redirect: POST /redirect. The targets ring at once; the first agent who accepts takes the
// call (deleted, terminated, answeredBy); if none does, the call ends with 480/10076.
func (s *Sim) redirect(c *call, body []byte) (reply, *apiError) {
	var req struct {
		Targets     []graph.ParticipantInfo `json:"targets"`
		Timeout     *int                    `json:"timeout"`
		CallbackURI string                  `json:"callbackUri"`
	}
	if e := decode(body, &req); e != nil {
		return reply{}, e
	}
	if c.state != graph.CallIncoming {
		return reply{}, wrongState(c, "redirect")
	}
	if n := len(req.Targets); n == 0 || n > 25 {
		return reply{}, badRequest("targets must name 1 to 25 participants, not %d.", n)
	}
	if req.Timeout != nil && (*req.Timeout < 15 || *req.Timeout > 90) {
		return reply{}, badRequest("timeout must be between 15 and 90 seconds.")
	}
	ids := make([]string, len(req.Targets))
	for i, t := range req.Targets {
		p, ok := t.Identity.Primary()
		if !ok || p.ID == "" {
			return reply{}, badRequest("targets[%d] has no identity.", i)
		}
		ids[i] = p.ID
	}
	if e := checkCallback(req.CallbackURI); e != nil {
		return reply{}, e
	}
	if req.CallbackURI != "" {
		c.callbackURI = req.CallbackURI
	}
	c.state = graph.CallRedirecting
	offers := make([]*offer, len(ids))
	var winner *offer
	wait := s.opts.StepDelay
	for i, id := range ids {
		o := s.ring(c, id)
		offers[i] = o
		switch {
		case o.a == nil:
		case o.answer == AgentAccept && winner == nil:
			winner = o
		case o.answer == AgentNoAnswer:
			wait = max(wait, s.opts.RingTimeout)
		}
	}
	if winner != nil {
		wait = s.opts.StepDelay
	}
	s.afterCall(c, wait, func() {
		for _, o := range offers {
			if o == winner || o.a == nil {
				continue
			}
			switch {
			case o.answer == AgentDecline:
				o.a.stats.Declined++
			case o.answer == AgentNoAnswer && winner == nil:
				o.a.stats.Missed++
			}
			s.release(c, o)
		}
		if winner == nil {
			s.finish(c, OutcomeRedirected, 480, 10076, nil)
			return
		}
		s.connect(c, winner, nil)
		c.res.Agent = winner.id
		d := c.resource(s)
		d.State, d.MediaState = graph.CallTerminated, nil
		d.AnsweredBy = &graph.ParticipantInfo{
			ODataType:    "#microsoft.graph.participantInfo",
			Identity:     graph.IdentitySet{User: &graph.Identity{ID: winner.id, DisplayName: winner.a.spec.DisplayName, TenantID: s.opts.TenantID}},
			EndpointType: "default",
		}
		s.finish(c, OutcomeRedirected, 0, 0, &d)
	})
	return reply{status: http.StatusAccepted}, nil
}

// transfer: POST /transfer (blind). transferring, then transferAccepted and terminated 0/7015,
// or back to established with 500/7000.
func (s *Sim) transfer(c *call, body []byte) (reply, *apiError) {
	var req struct {
		TransferTarget *graph.ParticipantInfo `json:"transferTarget"`
	}
	if e := decode(body, &req); e != nil {
		return reply{}, e
	}
	if c.state != graph.CallEstablished {
		return reply{}, wrongState(c, "transfer")
	}
	if req.TransferTarget == nil {
		return reply{}, badRequest("transferTarget is required.")
	}
	if c.invite != nil {
		return reply{}, badRequest("graphsim does not simulate a transfer while an invited participant is ringing or in the call.")
	}
	p, ok := req.TransferTarget.Identity.Primary()
	if !ok || p.ID == "" {
		return reply{}, badRequest("transferTarget has no identity.")
	}
	c.state = graph.CallTransferring
	c.res.TransferAttempts = append(c.res.TransferAttempts, p.ID)
	s.sendCall(c, graph.Updated, callData{ID: c.id, State: graph.CallTransferring}, nil)
	o := s.ring(c, p.ID)
	switch {
	case o.a == nil:
		s.afterCall(c, s.opts.StepDelay, func() { s.transferFailed(c, o, "the transfer target was not found") })
	case o.answer == AgentAccept:
		s.afterCall(c, s.opts.StepDelay, func() {
			if !c.rings(o) {
				return
			}
			s.connect(c, o, nil)
			c.state = graph.CallTransferAccepted
			s.sendCall(c, graph.Updated, callData{ID: c.id, State: graph.CallTransferAccepted}, nil)
			s.afterCall(c, s.opts.StepDelay, func() {
				c.res.Agent = o.id
				s.finish(c, OutcomeTransferred, 0, 7015, nil)
			})
		})
	case o.answer == AgentDecline:
		s.afterCall(c, s.opts.StepDelay, func() {
			if c.rings(o) {
				o.a.stats.Declined++
				s.transferFailed(c, o, "the transfer target declined the call")
			}
		})
	default:
		s.afterCall(c, s.opts.RingTimeout, func() {
			if c.rings(o) {
				o.a.stats.Missed++
				s.transferFailed(c, o, "the transfer target did not answer")
			}
		})
	}
	return reply{status: http.StatusAccepted}, nil
}

// transferFailed puts the call back to established with 500/7000. Called with s.mu held.
func (s *Sim) transferFailed(c *call, o *offer, why string) {
	if !c.rings(o) {
		return
	}
	s.release(c, o)
	c.state = graph.CallEstablished
	s.sendCall(c, graph.Updated, callData{
		ID: c.id, State: graph.CallEstablished,
		ResultInfo: &resultInfo{code: 500, subcode: 7000, message: "Call transfer failed: " + why + ".", camel: true},
	}, nil)
}

type promptBody struct {
	ClientContext string `json:"clientContext"`
	Prompts       []struct {
		MediaInfo *graph.MediaPrompt `json:"mediaInfo"`
	} `json:"prompts"`
}

// playPrompt: POST /playPrompt. 200 running + Location; operations play one after another;
// each completes with a deleted operation notification, 200/0.
func (s *Sim) playPrompt(c *call, body []byte) (reply, *apiError) {
	var req promptBody
	if e := decode(body, &req); e != nil {
		return reply{}, e
	}
	if c.state != graph.CallEstablished && c.state != graph.CallEstablishing {
		return reply{}, wrongState(c, "playPrompt")
	}
	if e := serviceMediaOnly(c, "playPrompt"); e != nil {
		return reply{}, e
	}
	if n := len(req.Prompts); n == 0 || n > 20 {
		return reply{}, badRequest("prompts must hold 1 to 20 media prompts, not %d.", n)
	}
	if e := checkClientContext(req.ClientContext); e != nil {
		return reply{}, e
	}
	op := &mediaOp{id: newID(), clientContext: req.ClientContext}
	failure := PromptFailure(0)
	for i, p := range req.Prompts {
		if p.MediaInfo == nil || p.MediaInfo.URI == "" {
			return reply{}, badRequest("prompts[%d].mediaInfo.uri is required.", i)
		}
		op.prompts = append(op.prompts, p.MediaInfo.URI)
		if f := s.opts.PromptFailures[p.MediaInfo.URI]; failure == 0 {
			failure = f
		}
	}
	loc := s.GraphURL() + c.path() + "/operations/" + op.id
	if failure == PromptFailInResponse {
		// The final status is in the response: nothing is queued, and no notification follows.
		r := promptFailed
		return reply{status: http.StatusOK, location: loc, body: opData{
			ODataType: graph.TypePlayPromptOperation, ID: op.id, Status: graph.OpFailed, ClientContext: op.clientContext,
			ResultInfo: &r,
		}}, nil
	}
	op.fails = failure == PromptFailNotified
	c.media = append(c.media, op)
	s.startMedia(c)
	return reply{status: http.StatusOK, location: loc, body: opData{
		ODataType: graph.TypePlayPromptOperation, ID: op.id, Status: graph.OpRunning, ClientContext: op.clientContext,
	}}, nil
}

// promptFailed is the resultInfo of a prompt of Options.PromptFailures. Graph documents no
// example of a prompt that could not play: the code is graphsim's choice.
var promptFailed = resultInfo{code: 400, message: "Action failed, the media could not be played."}

// startMedia plays the head of the media queue unless something plays already. Called with
// s.mu held.
func (s *Sim) startMedia(c *call) {
	if c.playing || len(c.media) == 0 || c.ended {
		return
	}
	if op := c.media[0]; op.fails {
		// its turn to play: it fails, and the caller heard nothing
		c.media = c.media[1:]
		s.sendOp(c, op, graph.OpFailed, promptFailed)
		s.startMedia(c)
		return
	}
	c.playing = true
	if !c.heardPrompt {
		c.heardPrompt = true
		if c.spec.Digits != "" {
			s.afterCall(c, c.spec.DigitDelay, func() { s.autoPress(c, 0) })
		}
	}
	s.playOne(c, c.media[0], 0, c.mediaGen)
}

func (s *Sim) playOne(c *call, op *mediaOp, i, gen int) {
	c.res.Prompts = append(c.res.Prompts, op.prompts[i])
	d, ok := s.opts.PromptDurations[op.prompts[i]]
	if !ok {
		d = s.opts.PromptDuration
	}
	s.afterCall(c, d, func() {
		if c.mediaGen != gen {
			return
		}
		if i+1 < len(op.prompts) {
			s.playOne(c, op, i+1, gen)
			return
		}
		c.media = c.media[1:]
		c.playing = false
		s.sendOp(c, op, graph.OpCompleted, resultInfo{code: 200, message: "Action completed successfully."})
		s.startMedia(c)
	})
}

// stopMedia drops the running and queued operations; with notify, each completes as failed,
// 400/8508, as cancelMediaProcessing documents. Called with s.mu held.
func (s *Sim) stopMedia(c *call, notify bool) {
	c.mediaGen++
	if notify {
		for _, op := range c.media {
			s.sendOp(c, op, graph.OpFailed, resultInfo{code: 400, subcode: 8508, message: "Action failed, the operation was cancelled."})
		}
	}
	c.media = nil
	c.playing = false
}

// autoPress presses the caller's i-th scripted digit and schedules the next one.
func (s *Sim) autoPress(c *call, i int) {
	digits := c.spec.Digits
	if i >= len(digits) {
		return
	}
	_ = s.press(c, digits[i:i+1])
	if i+1 < len(digits) {
		s.afterCall(c, c.spec.DigitDelay, func() { s.autoPress(c, i+1) })
	}
}

// press sends one key press to the bot if it subscribed to tones. Called with s.mu held.
func (s *Sim) press(c *call, digit string) error {
	switch {
	case c.ended:
		return ErrCallEnded
	case c.state != graph.CallEstablished:
		return fmt.Errorf("%w: call %s is %s", ErrNotInCall, c.id, c.state)
	case !c.subscribed:
		return nil // Graph only reports tones to bots that subscribed
	}
	c.toneSeq++
	c.res.Tones = append(c.res.Tones, digit)
	s.sendCall(c, graph.Updated, callData{
		ID: c.id, State: graph.CallEstablished,
		ToneInfo: &toneInfo{ODataType: "#microsoft.graph.toneInfo", SequenceID: c.toneSeq, Tone: graph.ToneName(digit)},
	}, nil)
	return nil
}

func (s *Sim) subscribeToTone(c *call, body []byte) (reply, *apiError) {
	var req struct {
		ClientContext string `json:"clientContext"`
	}
	if e := decode(body, &req); e != nil {
		return reply{}, e
	}
	if c.state != graph.CallEstablished && c.state != graph.CallEstablishing {
		return reply{}, wrongState(c, "subscribeToTone")
	}
	if e := serviceMediaOnly(c, "subscribeToTone"); e != nil {
		return reply{}, e
	}
	if e := checkClientContext(req.ClientContext); e != nil {
		return reply{}, e
	}
	c.subscribed = true
	return reply{status: http.StatusOK, body: opData{
		ODataType: "#microsoft.graph.subscribeToToneOperation", ID: newID(),
		Status: graph.OpCompleted, ClientContext: req.ClientContext,
	}}, nil
}

func (s *Sim) cancelMediaProcessing(c *call, body []byte) (reply, *apiError) {
	var req struct {
		ClientContext string `json:"clientContext"`
	}
	if e := decode(body, &req); e != nil {
		return reply{}, e
	}
	switch c.state {
	case graph.CallEstablishing, graph.CallEstablished, graph.CallTransferring:
	default:
		return reply{}, wrongState(c, "cancelMediaProcessing")
	}
	if e := serviceMediaOnly(c, "cancelMediaProcessing"); e != nil {
		return reply{}, e
	}
	if e := checkClientContext(req.ClientContext); e != nil {
		return reply{}, e
	}
	s.stopMedia(c, true)
	id := newID()
	return reply{status: http.StatusOK, location: s.GraphURL() + c.path() + "/operations/" + id, body: opData{
		ODataType: "#microsoft.graph.cancelMediaProcessingOperation", ID: id,
		Status: graph.OpCompleted, ClientContext: req.ClientContext,
	}}, nil
}

func (s *Sim) keepAlive(c *call, _ []byte) (reply, *apiError) {
	if c.keepAlive != nil {
		s.watchKeepAlive(c)
	}
	return reply{status: http.StatusOK}, nil
}

// hangUpByBot: DELETE. 204, terminating, then terminated 200/7000.
func (s *Sim) hangUpByBot(c *call, _ []byte) (reply, *apiError) {
	if c.state == graph.CallTerminating {
		return reply{status: http.StatusNoContent}, nil
	}
	c.state = graph.CallTerminating
	s.stopMedia(c, false)
	s.releaseAll(c)
	s.sendCall(c, graph.Updated, callData{ID: c.id, State: graph.CallTerminating}, nil)
	s.afterCall(c, s.opts.StepDelay, func() { s.finish(c, OutcomeBotHangUp, 200, 7000, nil) })
	return reply{status: http.StatusNoContent}, nil
}

// callerHangUp ends the call from the caller's side: 200/540000 for a PSTN caller, 200/4097
// for a Teams user. Called with s.mu held.
func (s *Sim) callerHangUp(c *call) {
	if c.from.Kind == graph.KindPhone {
		s.finish(c, OutcomeCallerHangUp, 200, 540000, nil)
		return
	}
	s.finish(c, OutcomeCallerHangUp, 200, 4097, nil)
}

var endMessages = map[int]string{
	0:      "",
	7015:   "GracefulTransferCompleted",
	7000:   "The call was ended by the application.",
	540000: "The call was ended by the PSTN user.",
	4097:   "The call was ended by the other participant.",
	1106:   "Call acceptance was not acknowledged in time.",
	10076:  "The redirect targets could not be reached.",
	8537:   "The call was dropped: no keep-alive was received in time.",
}

// finish ends a call: outcome and end codes recorded, media stopped, ringing agents released
// and the last notification queued: last, or a deleted terminated call with resultInfo
// code/subcode when last is nil. Called with s.mu held.
func (s *Sim) finish(c *call, outcome string, code, subcode int, last *callData) {
	if c.ended {
		return
	}
	c.ended = true
	c.state = graph.CallTerminated
	s.stopTimer(c.keepAlive)
	c.keepAlive = nil
	s.stopMedia(c, false)
	s.releaseAll(c)
	if inv := c.invite; inv != nil {
		// The caller leaving (or the call dropping) ends the conversation with an invited
		// agent. When the bot hangs up, only its leg leaves: the caller and the agent talk on
		// until the agent's TalkTime has passed.
		if outcome != OutcomeBotHangUp {
			s.endTalk(inv.offer)
		}
		c.invite = nil
	}
	c.res.Outcome = outcome
	c.res.EndCode, c.res.EndSubcode = code, subcode
	c.res.EndedAt = time.Now()
	if last == nil {
		// After a DELETE, Graph writes code and subcode as strings (the terminated notification
		// of https://learn.microsoft.com/en-us/graph/api/call-delete).
		last = &callData{ID: c.id, State: graph.CallTerminated, ResultInfo: &resultInfo{code: code, subcode: subcode,
			message: endMessages[subcode], quoted: outcome == OutcomeBotHangUp}}
	}
	s.sendCall(c, graph.Deleted, *last, nil)
}
