package callstate

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
)

// Queues is what the machine needs from the queue package.
type Queues interface {
	Enqueue(ctx context.Context, tenant, queue, callKey string, score int64) error
	Remove(ctx context.Context, tenant, queue, callKey string) error
	Release(ctx context.Context, tenant, agent, callKey string, outcome AgentOutcome) error
}

// Config wires a Machine.
type Config struct {
	Store           *Store
	Timers          *Timers
	Control         CallControl
	Queues          Queues
	Flow            *ivr.Flow
	CallbackURI     string
	Log             *zap.Logger
	Now             func() time.Time
	TransferTimeout time.Duration // default 90s
	HangupGrace     time.Duration // default 30s
	CommandTimeout  time.Duration // deadline of one Graph command; default 10s
	// OnEnd, when set, is called once for every call that ends through this instance.
	OnEnd func(Call)
}

// Machine applies events to calls: it loads the call, decides, saves the change with a version
// check (retrying on conflict, so any instance may handle any notification), then carries out
// the commands. Graph commands of one call run in order, off the request path.
type Machine struct {
	cfg  Config
	flow atomic.Pointer[ivr.Flow]
	exec serial
}

// NewMachine returns a machine; Start runs its timers.
func NewMachine(cfg Config) *Machine {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.TransferTimeout == 0 {
		cfg.TransferTimeout = 90 * time.Second
	}
	if cfg.HangupGrace == 0 {
		cfg.HangupGrace = 30 * time.Second
	}
	if cfg.CommandTimeout == 0 {
		cfg.CommandTimeout = 10 * time.Second
	}
	m := &Machine{cfg: cfg}
	m.flow.Store(cfg.Flow)
	return m
}

// SetFlow replaces the flow for decisions made from now on.
func (m *Machine) SetFlow(f *ivr.Flow) { m.flow.Store(f) }

func (m *Machine) env() Env {
	return Env{Flow: m.flow.Load(), Now: m.cfg.Now(), CallbackURI: m.cfg.CallbackURI,
		TransferTimeout: m.cfg.TransferTimeout, HangupGrace: m.cfg.HangupGrace}
}

// Notify implements graph.Sink: it turns each notification into an event and applies it.
// Storage failures are returned wrapped in graph.ErrUnavailable so the webhook asks Graph to
// send the request again; everything else is logged and the notification dropped.
func (m *Machine) Notify(ctx context.Context, tenant string, ns []graph.Notification) error {
	for _, n := range ns {
		ev, ok := EventOf(n, tenant, graph.ScenarioID(ctx))
		if !ok {
			m.cfg.Log.Debug("notification ignored", zap.String("call_id", n.CallID),
				zap.String("resource", n.ResourceURL), zap.String("type", n.DataType), zap.String("change", string(n.ChangeType)))
			continue
		}
		if _, err := m.Handle(ctx, tenant, graph.CallKey(n.CallID), ev); err != nil {
			if errors.Is(err, ErrInvalidTransition) {
				m.cfg.Log.Error("broken invariant", zap.String("call_id", n.CallID), zap.Error(err))
				continue
			}
			return fmt.Errorf("%w: %v", graph.ErrUnavailable, err)
		}
	}
	return nil
}

// EventOf maps a Graph notification to a machine event; false for notifications callbot does
// not act on (roster updates, content sharing, intermediate states).
func EventOf(n graph.Notification, tenant, scenario string) (Event, bool) {
	switch n.Kind {
	case graph.ResourceCall:
		c := n.Call
		switch {
		case n.Ended():
			ev := Event{Kind: EvEnded, Reason: c.TerminationReason}
			if c.ResultInfo != nil {
				ev.Result = *c.ResultInfo
			}
			return ev, true
		case n.ChangeType == graph.Created && c.State == graph.CallIncoming:
			in := &Incoming{GraphID: n.CallID, TenantID: tenant, ChainID: c.CallChainID, ScenarioID: scenario}
			if c.ID != "" {
				in.GraphID = c.ID
			}
			if c.Source != nil {
				in.Caller, _ = c.Source.Identity.Primary()
			}
			if len(c.Targets) > 0 {
				if p, ok := c.Targets[0].Identity.Primary(); ok {
					in.Dialled = p.ID
				}
			}
			return Event{Kind: EvIncoming, Incoming: in}, true
		case c.ToneInfo != nil:
			return Event{Kind: EvTone, Digit: c.ToneInfo.Digit(), Seq: int64(c.ToneInfo.SequenceID)}, true
		case c.State == graph.CallEstablished && c.ResultInfo != nil && c.ResultInfo.Code >= 400:
			return Event{Kind: EvTransferFailed, Result: *c.ResultInfo}, true
		case c.State == graph.CallEstablished:
			return Event{Kind: EvEstablished}, true
		case c.State == graph.CallTransferAccepted:
			return Event{Kind: EvTransferAccepted}, true
		}
	case graph.ResourceOperation:
		if op := n.Operation; op != nil && (op.Status.Final() || n.ChangeType == graph.Deleted) {
			return Event{Kind: EvPromptDone, ClientContext: op.ClientContext}, true
		}
	}
	return Event{}, false
}

// Handle applies one event to the call stored under callKey. It reports whether the event
// changed the call; an ignored event (unknown call, duplicate, no row in the table) is not an
// error. Errors are storage failures or ErrInvalidTransition.
func (m *Machine) Handle(ctx context.Context, tenant, callKey string, ev Event) (bool, error) {
	log := m.cfg.Log.With(zap.String("call_id", callKey), zap.String("tenant_id", tenant), zap.Stringer("event", ev.Kind))
	for attempt := 0; attempt < 16; attempt++ {
		var cur Call
		if ev.Kind != EvIncoming {
			var err error
			cur, err = m.cfg.Store.Get(ctx, callKey)
			if errors.Is(err, ErrNotFound) {
				log.Debug("event for unknown call ignored")
				return false, nil
			}
			if err != nil {
				return false, err
			}
		}
		next, cmds, err := Decide(cur, ev, m.env())
		if errors.Is(err, ErrIgnored) {
			log.Debug("event ignored", zap.Stringer("state", cur.State))
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if cur.State == StateNone {
			err = m.cfg.Store.Create(ctx, &next)
			if errors.Is(err, ErrExists) {
				log.Debug("repeated incoming notification ignored")
				return false, nil
			}
		} else {
			err = m.cfg.Store.Save(ctx, &next)
			if errors.Is(err, ErrConflict) {
				continue // another instance changed the call: decide again on the new state
			}
		}
		if err != nil {
			return false, err
		}
		log.Debug("transition", zap.Stringer("from", cur.State), zap.Stringer("to", next.State), zap.Int("commands", len(cmds)))
		m.carryOut(ctx, next, cmds, log)
		if next.State.Terminal() && m.cfg.OnEnd != nil {
			m.cfg.OnEnd(next)
		}
		return true, nil
	}
	return false, fmt.Errorf("call %s: %w after retries", callKey, ErrConflict)
}

// carryOut runs the storage commands now and queues the Graph commands for the call's executor.
func (m *Machine) carryOut(ctx context.Context, c Call, cmds []Command, log *zap.Logger) {
	key := graph.CallKey(c.ID)
	var toGraph []Command
	for _, cmd := range cmds {
		var err error
		switch cmd.Kind {
		case CmdEnqueue:
			err = m.cfg.Queues.Enqueue(ctx, c.Tenant, cmd.Queue, key, cmd.Score)
		case CmdLeaveQueue:
			err = m.cfg.Queues.Remove(ctx, c.Tenant, cmd.Queue, key)
		case CmdReleaseAgent:
			err = m.cfg.Queues.Release(ctx, c.Tenant, cmd.Agent, key, cmd.AgentOutcome)
		case CmdSetTimer:
			err = m.cfg.Timers.Set(ctx, c.Tenant, key, cmd.Timer, cmd.Token, m.cfg.Now().Add(cmd.After))
		default:
			toGraph = append(toGraph, cmd)
		}
		if err != nil {
			log.Error("command failed", zap.Stringer("command", cmd.Kind), zap.Error(err))
		}
	}
	if len(toGraph) == 0 {
		return
	}
	scenario := c.Scenario
	if s := graph.ScenarioID(ctx); s != "" {
		scenario = s
	}
	m.exec.do(key, func() {
		for _, cmd := range toGraph {
			m.send(c, scenario, cmd, log)
		}
	})
}

// send runs one Graph command and feeds its result back as an event where the result matters.
func (m *Machine) send(c Call, scenario string, cmd Command, log *zap.Logger) {
	ctx, cancel := context.WithTimeout(graph.WithScenarioID(context.Background(), scenario), m.cfg.CommandTimeout)
	defer cancel()
	cc := m.cfg.Control
	var (
		op  graph.Operation
		err error
	)
	switch cmd.Kind {
	case CmdAnswer:
		err = cc.Answer(ctx, c.ID, cmd.Answer)
	case CmdReject:
		err = cc.Reject(ctx, c.ID, cmd.Reject)
	case CmdPlayPrompt:
		op, err = cc.PlayPrompt(ctx, c.ID, cmd.Prompts, cmd.ClientContext)
	case CmdSubscribeToTone:
		_, err = cc.SubscribeToTone(ctx, c.ID, cmd.ClientContext)
	case CmdCancelMedia:
		_, err = cc.CancelMediaProcessing(ctx, c.ID, cmd.ClientContext)
	case CmdTransfer:
		err = cc.Transfer(ctx, c.ID, cmd.Target, cmd.ClientContext)
	case CmdHangup:
		err = cc.Hangup(ctx, c.ID)
	}
	key := graph.CallKey(c.ID)
	feed := func(ev Event) {
		if _, herr := m.Handle(context.Background(), c.Tenant, key, ev); herr != nil {
			log.Error("apply command result", zap.Stringer("command", cmd.Kind), zap.Error(herr))
		}
	}
	if err != nil {
		log.Warn("graph command failed", zap.Stringer("command", cmd.Kind), zap.Error(err))
		switch {
		case errors.Is(err, graph.ErrCallGone):
			feed(Event{Kind: EvEnded, Reason: "call gone: " + cmd.Kind.String()})
		case cmd.Kind == CmdAnswer && definitive(err):
			feed(Event{Kind: EvCommandFailed, Command: cmd.Kind.String()})
		case cmd.Kind == CmdAnswer:
			// ambiguous (timeout, 5xx, 429): the answer may have been taken; Graph says which by
			// sending established, or terminated when its 15 s deadline passes
		case cmd.Kind == CmdTransfer:
			feed(Event{Kind: EvTransferFailed, Reason: err.Error()})
		case cmd.Kind == CmdPlayPrompt:
			// a prompt that cannot play must not leave the caller waiting for its end
			feed(Event{Kind: EvPromptDone, ClientContext: cmd.ClientContext, Failed: true})
		}
		return
	}
	if cmd.Kind == CmdPlayPrompt && op.Status.Final() {
		feed(Event{Kind: EvPromptDone, ClientContext: cmd.ClientContext})
	}
}

// definitive reports whether a Graph error says the request was refused and not acted on (a
// 4xx other than 429), as opposed to an ambiguous failure that may have taken effect.
func definitive(err error) bool {
	var ge *graph.Error
	return errors.As(err, &ge) && ge.Status >= 400 && ge.Status < 500 && ge.Status != 429
}

// RunTimers claims due timers and applies them until ctx ends.
func (m *Machine) RunTimers(ctx context.Context, every time.Duration) {
	if every <= 0 {
		every = 100 * time.Millisecond
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for {
			due, err := m.cfg.Timers.Claim(ctx, m.cfg.Now(), 30*time.Second, 100)
			if err != nil {
				if ctx.Err() == nil {
					m.cfg.Log.Warn("claim timers", zap.Error(err))
				}
				break
			}
			for _, tm := range due {
				_, err := m.Handle(ctx, tm.Tenant, tm.Call, Event{Kind: EvTimeout, Timer: tm.Kind, TimerToken: tm.Token})
				if err != nil {
					m.cfg.Log.Warn("timer not applied, retried after its lease", zap.String("call_id", tm.Call), zap.Error(err))
					continue
				}
				_ = m.cfg.Timers.Done(ctx, tm)
			}
			if len(due) < 100 {
				break
			}
		}
	}
}

// Offer hands a caller the dispatcher took from a queue to an agent it reserved. It returns
// false when the call is no longer waiting (it ended meanwhile): the reservation must be undone.
func (m *Machine) Offer(ctx context.Context, tenant, callKey, agent string) (bool, error) {
	return m.Handle(ctx, tenant, callKey, Event{Kind: EvAgentOffer, Agent: agent})
}

// Wait blocks until every queued Graph command has run (used at shutdown and in tests).
func (m *Machine) Wait() { m.exec.wait() }

// serial runs functions one at a time per key, in submission order, each key on its own
// goroutine while it has work.
type serial struct {
	mu   sync.Mutex
	q    map[string][]func()
	busy sync.WaitGroup
}

func (s *serial) do(key string, f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.q == nil {
		s.q = map[string][]func(){}
	}
	if pending, running := s.q[key]; running {
		s.q[key] = append(pending, f)
		return
	}
	s.q[key] = []func(){f}
	s.busy.Add(1)
	go s.drain(key)
}

func (s *serial) drain(key string) {
	defer s.busy.Done()
	for {
		s.mu.Lock()
		fs := s.q[key]
		if len(fs) == 0 {
			delete(s.q, key)
			s.mu.Unlock()
			return
		}
		f := fs[0]
		s.q[key] = fs[1:]
		s.mu.Unlock()
		f()
	}
}

func (s *serial) wait() { s.busy.Wait() }
