package callstate

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
)

// Queues is what the machine needs from the queue package. With a store that waits for
// replicas on Redis Cluster (Store.WaitsOnNodes), Enqueue, Remove and Release must return nil
// only once their write is replicated (Store.Durably): the machine acknowledges them then.
type Queues interface {
	Enqueue(ctx context.Context, tenant, queue, callKey string, score int64) error
	Remove(ctx context.Context, tenant, queue, callKey string) error
	// Release ends an agent's reservation; hold, when not zero, is how long the agent is not
	// offered another call (wrap-up).
	Release(ctx context.Context, tenant, agent, callKey string, outcome AgentOutcome, hold time.Duration) error
	// Reservations lists the agents reserved in a tenant, with the call each is reserved for.
	Reservations(ctx context.Context, tenant string) (map[string]string, error)
}

// QueueWriter is implemented by Queues whose writes can join the round trip of the save that
// decided them (behind it: they run even if the save meets a conflict, so only writes that are
// harmless then are given: an enqueue, and what a call that ends leaves behind). An enqueue
// whose save lost to the call's end leaves a ghost in the queue, which the reconciler removes
// (QueueSweeper).
type QueueWriter interface {
	// Writes returns the pipeline writes of cmds, and what to do once they are sent.
	Writes(ctx context.Context, tenant, callKey string, cmds []Command) (write func(redis.Pipeliner), after func())
}

// QueueEntry is a caller in a queue with its score (arrival, ms), as read.
type QueueEntry struct {
	Call  string
	Score float64
}

// QueueSweeper is implemented by Queues whose queues the reconciler can sweep of ghosts: entries
// of callers whose call ended (or whose record is gone). A queue write that goes behind a save
// runs even when the save loses its race (QueueWriter), and the dispatcher's undo of a failed
// offer puts the caller back, so a caller whose call ends at that moment can be left in a queue.
type QueueSweeper interface {
	// KnownQueues returns the tenant's queues that may hold callers, whichever flow named them:
	// a flow edit that removes or renames a queue leaves its entries to no instance's flow.
	KnownQueues(ctx context.Context, tenant string) ([]string, error)
	// Entries returns the callers waiting in each of the tenant's queues named, with their scores.
	Entries(ctx context.Context, tenant string, queues []string) (map[string][]QueueEntry, error)
	// RemoveEntries takes out of a queue each entry still there with the score given (one put
	// back since, at another score, stays), and returns how many it took out.
	RemoveEntries(ctx context.Context, tenant, queue string, entries []QueueEntry) (int, error)
}

// Config wires a Machine.
type Config struct {
	// Tenants whose agent reservations the reconciler checks on every pass, whether or not they
	// have a live call (an agent reserved for a caller who hung up before the offer would
	// otherwise stay reserved until the tenant had a call older than a minute).
	Tenants     []string
	Store       *Store
	Timers      *Timers
	Control     CallControl
	Queues      Queues
	Flow        *ivr.Flow
	CallbackURI string
	Log         *zap.Logger
	// Now is the clock the machine decides by and writes to Redis (timers' due times, outbox
	// leases): every instance's must agree, so callbot gives it Redis's (clock.Redis). Default
	// time.Now.
	Now             func() time.Time
	TransferTimeout time.Duration // default 90s
	HangupGrace     time.Duration // default 30s
	CommandTimeout  time.Duration // deadline of one Graph command; default 10s
	// OutboxLease is how long an instance has to carry out the commands it saved (or to apply a
	// timer it claimed) before any instance may re-drive them; default 8 s, so an answer a dead
	// instance saved is still re-driven within Graph's 15 s answer deadline.
	OutboxLease time.Duration
	// OnEnd, when set, is called once for every call that ends through this instance.
	OnEnd func(Call)
	// CutOff, when set and true, says this instance does not reach Graph while the others do
	// (cmd/callbot's graphReach): it leaves Graph's work to them. It claims no timer and no
	// outbox, renews no lease of the calls it is carrying out, and sends no Graph command: those
	// it has decided, and those that failed without an answer from Graph, are handed back (their
	// outbox due at once), for another instance to re-drive. What it saves in Redis it still
	// saves: a notification it takes is applied, and its commands go to another instance.
	CutOff func() bool
	// OthersReachGraph, when set and true, says another instance has had an answer from Graph
	// within the last moments. A command that fails here without an answer from Graph is then
	// handed back for the others to re-drive, as when cut off, rather than taken for Graph's
	// failure (a prompt skipped, a tone subscription put off, a read of the call that fails as
	// fast): the path from here fails, not Graph, and this instance may not yet have failed
	// long enough to be found cut off.
	OthersReachGraph func() bool
}

// Machine applies events to calls: it loads the call, decides, saves the change with a version
// check (retrying on conflict, so any instance may handle any notification), then carries out
// the commands. Graph commands of one call run in order, off the request path.
type Machine struct {
	// suspect holds reservations the last reconciliation found with a caller still queued, by
	// tenant and agent: one still there at the next pass is stale (its offer was lost), not in flight.
	mu      sync.Mutex
	suspect map[[2]string]string

	acks     chan Ack    // acknowledgements waiting for RunAcks' next batch
	batching atomic.Bool // RunAcks is running
	// ackMu makes batch's look at batching and its send one step against RunAcks' stop (write
	// lock): an acknowledgement sent after RunAcks took the channel's last would stay there.
	ackMu sync.RWMutex

	// carrying counts, per call, the batches of commands this instance has taken on and not yet
	// acknowledged: RunOutbox renews their outbox leases while it lives.
	carryMu  sync.Mutex
	carrying map[string]int
	// leases holds, for the calls carried, the outbox lease this instance last wrote for each
	// (its save's, a renewal's, its claim's): the only one it may hand back (handOver), a lease
	// written since by another instance (its claim, its save) being that instance's.
	leases map[string]float64

	// handBacks holds, by call, the outbox leases this instance failed to hand back (handBack):
	// RunOutbox tries them again every tick until Redis takes them or their lease runs out.
	handMu    sync.Mutex
	handBacks map[string]HandBack

	cfg  Config
	flow atomic.Pointer[ivr.Flow]
	// flowSince is when flow took effect (Env.FlowSince), in Unix nanoseconds
	flowSince atomic.Int64
	exec      serial
	cache     *cache
	// Closed counts calls the reconciler found gone from Graph and ended.
	Closed atomic.Int64
	// Ghosts counts queue entries the reconciler removed because their call had ended or its
	// record was gone (sweepGhosts).
	Ghosts atomic.Int64
	// ReconcilePasses counts the reconciler's passes this instance completed, ReconcileChecked
	// the live calls they (and passes cut short) checked; ReconcileLastPass is how long the
	// last completed pass took, in nanoseconds, and ReconcileLastCalls how many calls it
	// checked. KeepAlives counts keepAlives Graph took,
	// KeepAliveFailures those it refused or did not answer (the next pass sends them again;
	// Graph ends a call that has had none for 45 minutes).
	ReconcilePasses, ReconcileChecked     atomic.Int64
	ReconcileLastPass, ReconcileLastCalls atomic.Int64
	KeepAlives, KeepAliveFailures         atomic.Int64
	// Redriven counts commands re-driven from outboxes other instances (or this one before a
	// restart) left behind; Skipped those found already done by asking Graph.
	Redriven, Skipped atomic.Int64
	// Superseded counts media commands not sent because a transfer decided after them took the
	// caller's media first (queueGraph).
	Superseded atomic.Int64
	// InvalidTransitions counts decisions the transition table refused (ErrInvalidTransition: a
	// bug, never input), whatever the event: a notification's is dropped, a timer's removed and
	// its call given up on (giveUp).
	InvalidTransitions atomic.Int64
	// ToneGivenUp counts calls whose tone subscription failed maxToneRetries+1 times: callbot
	// stopped asking, and the caller's keys do nothing for the rest of the call.
	ToneGivenUp atomic.Int64
	// HangupGivenUp counts calls whose hangup Graph refused (a 4xx other than 404 and 429)
	// maxHangupRefusals+1 times: callbot stopped sending it again quickly, and hangs up only
	// every hang-up grace from then on; the caller may hear silence until they hang up.
	HangupGivenUp atomic.Int64
	// HandedOver counts the batches of Graph commands this instance left to the others because
	// it did not reach Graph while they did (Config.CutOff).
	HandedOver atomic.Int64
	// Adopted counts calls Graph had established and callbot had no record of, taken back
	// (adopt); adoptMu guards adoptSeen, when each call was last found not to be taken back, and
	// adopting, the calls being taken back now.
	Adopted   atomic.Int64
	adoptMu   sync.Mutex
	adoptSeen map[string]time.Time
	adopting  map[string]bool
	// kept holds the notifications Redis refused that RunKept applies again (keep). Kept counts
	// those kept; KeptApplied those it applied before Graph delivered them again; KeptGivenUp
	// those still refused keepFor after the first refusal (or when the instance stopped);
	// KeptDropped those not kept because keepMax were already.
	kept                                        kept
	Kept, KeptApplied, KeptGivenUp, KeptDropped atomic.Int64
	// storageRetries holds the storage commands Redis refused on carryOut, carried out again by
	// RunOutbox (retryLater).
	storageRetries storageRetries
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
	if cfg.OutboxLease == 0 {
		cfg.OutboxLease = 8 * time.Second
	}
	m := &Machine{cfg: cfg, cache: newCache(100_000), acks: make(chan Ack, 1024), carrying: map[string]int{}, leases: map[string]float64{},
		handBacks: map[string]HandBack{}}
	m.flow.Store(cfg.Flow)
	m.flowSince.Store(cfg.Now().UnixNano())
	return m
}

// SetFlow replaces the flow for decisions made from now on.
func (m *Machine) SetFlow(f *ivr.Flow) {
	m.flowSince.Store(m.cfg.Now().UnixNano())
	m.flow.Store(f)
}

func (m *Machine) env() Env {
	return Env{Flow: m.flow.Load(), Now: m.cfg.Now(), CallbackURI: m.cfg.CallbackURI,
		TransferTimeout: m.cfg.TransferTimeout, HangupGrace: m.cfg.HangupGrace, FlowSince: time.Unix(0, m.flowSince.Load())}
}

// Notify implements graph.Sink: it turns each notification into an event and applies it.
// Storage failures are returned wrapped in graph.ErrUnavailable so the webhook asks Graph to
// send the request again (an incoming call, a key press, a call's end and the other
// notifications whose repeat is harmless are also kept and applied again by this instance: keep); everything else is logged and the notification
// dropped.
func (m *Machine) Notify(ctx context.Context, tenant string, ns []graph.Notification) error {
	for _, n := range ns {
		ev, ok := EventOf(n, tenant, graph.ScenarioID(ctx))
		if !ok {
			m.cfg.Log.Debug("notification ignored", zap.String("call_id", n.CallID),
				zap.String("resource", n.ResourceURL), zap.String("type", n.DataType), zap.String("change", string(n.ChangeType)))
			continue
		}
		key := graph.CallKey(n.CallID)
		if ev.Kind == EvIncoming {
			// the record is created under the id resourceData gives (EventOf), which may name
			// another call than resourceUrl: it is cached, and its timers armed, under that id
			key = graph.CallKey(ev.Incoming.GraphID)
		}
		if _, keep, err := m.notifyOne(ctx, tenant, n.CallID, key, ev); err != nil {
			if keep {
				m.keep(tenant, n.CallID, key, graph.ScenarioID(ctx), ev)
			}
			return err
		}
	}
	return nil
}

// notifyOne applies the event of one notification of callID, stored under key. It reports
// whether the event changed the call, and, with an error, whether that error is Redis's refusal
// of the event itself (the notification may be kept: keep).
func (m *Machine) notifyOne(ctx context.Context, tenant, callID, key string, ev Event) (changed, keep bool, err error) {
	changed, err = m.handle(ctx, tenant, key, ev)
	switch {
	case err == nil:
		if ev.Kind == EvEnded {
			m.unkeep(key) // what is kept of the call would be ignored
		}
		return changed, false, nil
	case errors.Is(err, errUnknownCall) && ev.Kind == EvEnded:
		// A call with no record may still be listed live: a create writes the entry ahead of
		// the record, and on Redis Cluster the record's master may have refused it (down)
		// while the entry's took it. Graph gave up delivering the incoming call and now
		// reports its end; left, the entry waited for the reconciler's pass.
		if err := m.cfg.Store.Forget(ctx, key); err != nil {
			return false, true, fmt.Errorf("%w: %v", graph.ErrUnavailable, err)
		}
		m.unkeep(key) // an incoming kept: the caller hung up while it rang
		return false, false, nil
	case errors.Is(err, errUnknownCall):
		if err := m.adopt(ctx, tenant, callID, graph.ScenarioID(ctx), ev); err != nil {
			return false, false, fmt.Errorf("%w: %v", graph.ErrUnavailable, err)
		}
		return false, false, nil
	case errors.Is(err, ErrInvalidTransition):
		m.cfg.Log.Error("broken invariant", zap.String("call_id", callID), zap.Error(err))
		return false, false, nil
	case errors.Is(err, graph.ErrWrongTenant):
		return false, false, err
	}
	return false, true, fmt.Errorf("%w: %v", graph.ErrUnavailable, err)
}

// EventOf maps a Graph notification to a machine event; false for notifications callbot does
// not act on (content sharing, intermediate states such as establishing).
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
		case c.State == graph.CallTransferring:
			return Event{Kind: EvTransferring}, true
		}
	case graph.ResourceOperation:
		op := n.Operation
		if op == nil || !(op.Status.Final() || n.ChangeType == graph.Deleted) {
			break
		}
		if strings.EqualFold(n.DataType, graph.TypeInviteParticipantsOp) {
			return Event{Kind: EvInviteDone, ClientContext: op.ClientContext, Failed: op.Status != graph.OpCompleted}, true
		}
		// A failed prompt (a media file Graph could not fetch) is played again only after a
		// while; a cancelled one (400/8508) is one callbot no longer waits for, ignored either way.
		return Event{Kind: EvPromptDone, ClientContext: op.ClientContext, Failed: op.Status == graph.OpFailed}, true
	case graph.ResourceParticipants:
		if n.Participants == nil {
			// not a roster (resourceData null, absent, or one participant's object): reading it
			// as an empty one would take the agent for gone and hang up on the caller
			break
		}
		return rosterEvent(n.Participants), true
	}
	return Event{}, false
}

// adoptEvery is how long a call found not to be taken back (gone from Graph, not established,
// a conference) is not looked at again (adopt).
const adoptEvery = 10 * time.Second

// adoptWithin bounds the Graph reads of adopt, on the webhook's path.
const adoptWithin = 3 * time.Second

// errAdopting: another notification of the call is taking it back; this one is refused (503)
// and delivered again.
var errAdopting = errors.New("call being taken back")

// adopt takes back a call callbot has no record of, if Graph has it established with the caller
// alone with callbot: its record was lost with Redis data (a failover that lost unreplicated
// writes, a crash within the AOF's second), and its caller would otherwise wait in a call nobody
// serves. ev is the event that found it unknown: only those of a call in callbot's IVR or queue
// count (a key press, a prompt's end, established, a failed transfer); a call in a transfer or a
// conference is left alone, as is a call being created (incoming). It runs on the notification's
// own path, so that the notification is acknowledged only once the call is taken back and ev
// (a key press) applied: an error (Graph not read, the call being taken back by another
// notification, the record not saved or not replicated) refuses it (503), and Graph delivers it
// again. A call found not to be taken back is not looked at again for adoptEvery.
func (m *Machine) adopt(ctx context.Context, tenant, callID, scenario string, ev Event) error {
	switch ev.Kind {
	case EvEstablished, EvTone, EvPromptDone, EvTransferFailed:
	default:
		return nil
	}
	if len(m.cfg.Tenants) > 0 && !slices.Contains(m.cfg.Tenants, tenant) {
		return nil
	}
	key := graph.CallKey(callID)
	now := m.cfg.Now()
	m.adoptMu.Lock()
	if t, ok := m.adoptSeen[key]; ok && now.Sub(t) < adoptEvery {
		m.adoptMu.Unlock()
		return nil
	}
	if m.adopting[key] {
		m.adoptMu.Unlock()
		return errAdopting
	}
	if m.adoptSeen == nil {
		m.adoptSeen, m.adopting = map[string]time.Time{}, map[string]bool{}
	}
	for k, t := range m.adoptSeen {
		if now.Sub(t) >= adoptEvery {
			delete(m.adoptSeen, k)
		}
	}
	m.adopting[key] = true
	m.adoptMu.Unlock()
	defer func() {
		m.adoptMu.Lock()
		delete(m.adopting, key)
		m.adoptMu.Unlock()
	}()
	leave := func(why string, fields ...zap.Field) error { // not one to take back
		m.adoptMu.Lock()
		m.adoptSeen[key] = now
		m.adoptMu.Unlock()
		m.cfg.Log.Debug("notification of a call callbot does not know: "+why, append(fields, zap.String("call_id", callID))...)
		return nil
	}
	log := m.cfg.Log.With(zap.String("call_id", callID), zap.String("tenant_id", tenant), zap.Stringer("event", ev.Kind))
	gctx, cancel := context.WithTimeout(graph.WithTenantID(graph.WithScenarioID(ctx, scenario), tenant), min(m.cfg.CommandTimeout, adoptWithin))
	defer cancel()
	st, err := m.cfg.Control.GetCall(gctx, callID)
	switch {
	case errors.Is(err, graph.ErrCallGone):
		return leave("gone from Graph")
	case err != nil:
		return fmt.Errorf("call %s has no record, and Graph could not be read: %w", callID, err)
	case st != graph.CallEstablished:
		return leave("not established in Graph", zap.String("graph_state", string(st)))
	}
	// A conference (an invited agent talking to the caller, callbot in the call) must not get
	// the menu played over it: only a call of the caller and callbot alone is taken back (Graph
	// lists no participants of a peer-to-peer call).
	ps, err := m.participants(gctx, callID)
	switch {
	case peerToPeer(err):
	case err != nil:
		return fmt.Errorf("call %s has no record, and its participants could not be read: %w", callID, err)
	case people(ps) > 1:
		log.Warn("call established in Graph had no record, but others are in it with the caller: left alone", zap.Int("participants", len(ps)))
		return leave("a conference")
	}
	ok, err := m.Handle(ctx, tenant, key, Event{Kind: EvAdopt, Incoming: &Incoming{GraphID: callID, TenantID: tenant, ScenarioID: scenario}})
	if err != nil {
		return fmt.Errorf("take back call %s: %w", callID, err)
	}
	if ok {
		m.Adopted.Add(1)
		log.Warn("call established in Graph had no record (lost with Redis data): taken back, its menu starts again")
	}
	if ev.Kind == EvTone {
		// the key press that found the call unknown is the caller's latest choice: the new menu
		// takes it (a menu key, or a barge-in that replays the menu)
		if _, err := m.Handle(ctx, tenant, key, ev); err != nil {
			return fmt.Errorf("apply the key press to call %s taken back: %w", callID, err)
		}
	}
	return nil
}

// people counts the participants that are not applications (callbot, other bots), nor listed
// as removed (removedState: not in the call, as in rosterEvent; an agent who had left made the
// caller alone with callbot a conference, neither taken back nor given up on).
func people(ps []graph.Participant) int {
	n := 0
	for _, p := range ps {
		if id := p.Info.Identity; id.Application == nil && id.ApplicationInstance == nil && !p.Removed() {
			n++
		}
	}
	return n
}

// rosterEvent is the EvRoster of a roster, notified or read: the ids of its users, but those
// listed as removed (removedState): an agent removed from the call is not in it, and was taken
// for present (a roster showing them removed ignored, the caller left with nobody).
func rosterEvent(ps []graph.Participant) Event {
	ev := Event{Kind: EvRoster, Participants: []string{}}
	for _, p := range ps {
		if p.Info.Identity.User != nil && !p.Removed() {
			ev.Participants = append(ev.Participants, strings.ToLower(p.Info.Identity.User.ID))
		}
	}
	return ev
}

// Handle applies one event to the call stored under callKey. It reports whether the event
// changed the call; an ignored event (unknown call, duplicate, no row in the table) is not an
// error. Errors are storage failures or ErrInvalidTransition.
//
// The commands a transition decides are saved in the call's outbox in the same atomic write as
// the new state, then carried out: storage commands at once, Graph commands on the call's
// executor. Each kind is acknowledged when done; what an instance leaves unacknowledged (it
// died) is re-driven by RunOutbox on any instance.
func (m *Machine) Handle(ctx context.Context, tenant, callKey string, ev Event) (bool, error) {
	ok, err := m.handle(ctx, tenant, callKey, ev)
	if errors.Is(err, errUnknownCall) {
		return false, nil
	}
	return ok, err
}

// errUnknownCall: the event is for a call callbot has no record of (handle).
var errUnknownCall = errors.New("unknown call")

// handle is Handle, with errUnknownCall for an event of a call callbot has no record of.
func (m *Machine) handle(ctx context.Context, tenant, callKey string, ev Event) (bool, error) {
	// WithLazy: the fields are encoded only if something is logged, which on the hot path is rare.
	log := m.cfg.Log.WithLazy(zap.String("call_id", callKey), zap.String("tenant_id", tenant), zap.Stringer("event", ev.Kind))
	if s := graph.ScenarioID(ctx); s != "" {
		log = log.WithLazy(zap.String("scenario_id", s))
	}
	// Timers are armed ahead of the save: a save that loses its race to another instance's
	// leaves them in the timer set, armed for a decision no record holds (lost). Those that
	// neither a record read since nor a later attempt holds leave it with the next batch of
	// acknowledgements (left, each fired for nothing later: a claim, a read and a removal, up to
	// 90 s or minutes on; a stale cached copy loses such races all the time behind a balancer).
	var (
		lost  []Timer
		kept  []string
		drawn int64 // the highest token drawn by a record read, or saved, since
	)
	defer func() { m.dropLost(lost, kept, drawn) }()
	for attempt := 0; attempt < 16; attempt++ {
		var cur Call
		fromCache := false
		if ev.Kind != EvIncoming && ev.Kind != EvAdopt {
			cached, ok := m.cache.get(callKey)
			if ok && attempt == 0 {
				cur, fromCache = cached, true
			} else {
				var err error
				cur, err = m.cfg.Store.Get(ctx, callKey)
				if errors.Is(err, ErrNotFound) {
					log.Debug("event for unknown call ignored")
					return false, errUnknownCall
				}
				if err != nil {
					return false, err
				}
				if len(lost) > 0 { // only after a lost save: the hot path builds no strings
					kept = appendMembers(kept, cur.Tenant, callKey, cur.Timers)
				}
				drawn = max(drawn, cur.Seq)
			}
		}
		if cur.Tenant != "" && cur.Tenant != tenant {
			// Only a notification can name another tenant (callbot's own events carry the
			// call's): its token was issued for a tenant this call is not of.
			log.Warn("notification for a call of another tenant refused", zap.String("call_tenant", cur.Tenant))
			return false, fmt.Errorf("call %s: %w", callKey, graph.ErrWrongTenant)
		}
		next, cmds, err := Decide(cur, ev, m.env())
		if errors.Is(err, ErrIgnored) && fromCache && !Stale(cur, ev) {
			// The cached copy may be behind (another instance moved the call on): an event is
			// only ignored on the record in Redis, unless it is one that no later version can
			// take either (Stale). A decision to act needs no such check, as the save's version
			// check catches a copy that is behind.
			m.cache.drop(callKey)
			continue
		}
		if errors.Is(err, ErrIgnored) {
			log.Debug("event ignored", zap.Stringer("state", cur.State))
			// The record read may hold a change refused as unreplicated, this event's own
			// (delivered again): acknowledge it only once the replicas have it. A cached record
			// was written with its replicas' acknowledgement. An offer is refused outright: the
			// record shows the caller elsewhere, so the dispatcher's entry was a ghost (a queue
			// write of a save that lost its race, or its own undo); an error would have it put
			// the caller back, to be reserved and refused every tick while the replicas lag. If
			// a failover takes the record back to the queue, the follow-up of the offer that
			// moved it, or the reconciler, puts the caller back.
			//
			// But a record that shows the call with the offer's agent holds this offer: its save
			// was applied and sent again (go-redis sends a pipeline again when it could not read
			// the reply, up to MaxRetries), which found its own version, a conflict. Refused, the
			// dispatcher would free the agent while the record (and the transfer in its outbox,
			// re-driven a lease later) has the call with them. It stands, once replicated as any
			// offer (an error: the dispatcher reads the record, finds the offer, follows it up).
			if ev.Kind == EvAgentOffer && !fromCache && withAgent(cur, ev.Agent) {
				return true, m.cfg.Store.Sync(ctx, callKey)
			}
			if !fromCache && ev.Kind != EvAgentOffer {
				err := m.cfg.Store.Sync(ctx, callKey)
				if err == nil && cur.State.Terminal() {
					// The call's removal from the live calls goes behind the save that ended it,
					// and may have failed when the save did not (on Redis Cluster another master,
					// down while the call's served): the save's error had this event, or the one
					// that ended the call, delivered again. Left, the entry waited for the
					// reconciler's pass (the cluster failover soak).
					err = m.cfg.Store.Forget(ctx, callKey)
				}
				return false, err
			}
			return false, nil
		}
		if errors.Is(err, ErrInvalidTransition) {
			m.InvalidTransitions.Add(1)
		}
		if err != nil {
			return false, err
		}
		// Timers are armed in the same round trip as the save, ahead of it; the other commands
		// go in the outbox.
		var timers []Timer
		rest := cmds[:0:0]
		for _, cmd := range cmds {
			if cmd.Kind == CmdSetTimer {
				timers = append(timers, Timer{Tenant: next.Tenant, Call: callKey, Kind: cmd.Timer, Token: cmd.Token, At: m.cfg.Now().Add(cmd.After)})
			} else {
				rest = append(rest, cmd)
			}
		}
		// Queue writes that are harmless even if this save loses a race join its round trip too.
		// An agent's release is not one: decided on a copy that is behind (the agent's transfer
		// accepted meanwhile, on another instance), a call's end frees the agent at once, as if
		// the caller had left while they rang, while they talk to the caller; it runs once the
		// save has won, from the outbox. Not on Redis Cluster with replicas to wait for: they live on another master than the
		// record, which a failover could take back to before them while keeping the record
		// (a caller queued in their record and in no queue). There they stay outbox commands,
		// carried out once the save is replicated and acknowledged only once they are
		// (Queues' writes wait for their replicas), and re-driven if they are not.
		var behind func(redis.Pipeliner)
		var after func()
		if qw, ok := m.cfg.Queues.(QueueWriter); ok && !m.cfg.Store.WaitsOnNodes() {
			var piped, kept []Command
			for _, cmd := range rest {
				switch {
				case cmd.Kind == CmdEnqueue, next.State.Terminal() && cmd.Kind == CmdLeaveQueue:
					piped = append(piped, cmd)
				default:
					kept = append(kept, cmd)
				}
			}
			if len(piped) > 0 {
				behind, after = qw.Writes(ctx, next.Tenant, callKey, piped)
				rest = kept
			}
		}
		added := next.addToOutbox(rest, next.Version+1) // next.Version is cur's, but for a call taken back (EvAdopt)
		w := Write{Timers: timers, Behind: behind}
		if len(next.Outbox) > 0 {
			w.OutboxDue = m.cfg.Now().Add(m.cfg.OutboxLease)
			// Commands of earlier transitions alone: their lease stays theirs. Pushed a lease
			// on at every save, those of an instance that died waited a lease after the call's
			// last notification, not theirs (and a re-drive under way lost its claim).
			w.KeepLease = len(added) == 0
		}
		// The Graph commands take their place on the call's executor before the save makes the
		// new state visible: a transition saved after this one (on a dispatcher woken by another
		// call, the moment this caller is in the queue) then sends its commands after these.
		execKey := graph.CallKey(next.ID)
		var slot *place
		if slices.ContainsFunc(added, func(p Pending) bool { return p.Cmd.Kind.Graph() }) {
			slot = m.exec.reserve(execKey)
		}
		if cur.State == StateNone {
			err = m.cfg.Store.CreateWith(ctx, &next, w)
			if errors.Is(err, ErrExists) {
				m.exec.fill(execKey, slot, nil)
				log.Debug("repeated incoming notification ignored")
				if err := m.cfg.Store.Sync(ctx, callKey); err != nil {
					return false, err // the record may be one refused as unreplicated
				}
				// The create wrote the call's live entry ahead of the record it found: a repeat
				// that comes after the call ended (Graph's, late, or one another instance kept
				// while Redis refused it) put an ended call back among the live ones, until the
				// reconciler's pass (the cluster failover soak). Read after that write, the
				// record shows an end that took the entry out before it; an end saved after it
				// takes it out itself.
				rec, err := m.cfg.Store.Get(ctx, callKey)
				if err == nil && rec.State.Terminal() {
					err = m.cfg.Store.Forget(ctx, callKey)
				}
				return false, err
			}
		} else {
			err = m.cfg.Store.SaveWith(ctx, &next, w)
			if errors.Is(err, ErrConflict) {
				m.exec.fill(execKey, slot, nil)
				m.cache.drop(callKey) // another instance changed the call: decide again on its record
				lost = append(lost, timers...)
				if behind != nil {
					// its queue writes went out all the same: an enqueue here is a ghost entry if
					// the record has moved on (a dispatcher may reserve it; the offer is refused)
					log.Debug("save lost its race, its queue writes sent", zap.Stringer("state", cur.State), zap.Bool("cached", fromCache))
				}
				continue
			}
		}
		for _, tm := range timers { // saved, or perhaps saved (an error after the write)
			if len(lost) == 0 {
				break // a lost timer's token is drawn by the attempt that lost: none before it matter
			}
			kept = append(kept, member(tm.Tenant, tm.Call, tm.Kind, tm.Token))
		}
		if err != nil {
			// Not drawn: a save that failed may never have reached Redis, and another instance
			// deciding on the record this one read draws the same tokens again (the lost save's
			// timer armed anew, which dropLost would take out of the timer set).
			m.exec.fill(execKey, slot, nil)
			m.cache.drop(callKey)
			if errors.Is(err, ErrNotReplicated) && !w.OutboxDue.IsZero() && len(cur.Outbox) == 0 {
				// The record is on the master, its commands in its outbox, and this instance
				// does not carry them out (a failover could lose the decision): the outbox is due
				// at once for a re-drive, which sends them only once the replicas have the record
				// (Redrive's Sync). Left leased, they waited the whole lease once the
				// notification, delivered again, was acknowledged: answers 6 to 10 s late
				// (Graph drops a call not answered in 15 s), a key press's hold music 6 s late.
				// Only when the outbox holds this save's commands alone: earlier ones may be
				// on their way to Graph from another instance, which a re-drive now could send
				// again before that instance renews its lease.
				m.handBack(context.WithoutCancel(ctx), callKey, float64(w.OutboxDue.UnixMilli()), m.cfg.Now(),
					"outbox of a save refused as unreplicated", log)
			}
			return false, err
		}
		drawn = max(drawn, next.Seq)
		m.cache.put(callKey, next)
		m.dropTimers(cur, next, callKey)
		if ev.Kind == EvToneFailed && next.ToneFails == maxToneRetries+1 {
			// the save that gives up is made once: counted once, whichever instance made it
			m.ToneGivenUp.Add(1)
			log.Error("tone subscription failed too often, given up: the caller's keys do nothing in this call", zap.Int("attempts", next.ToneFails))
		}
		if ev.Kind == EvHangupFailed && ev.Refused && next.HangupRefusals == maxHangupRefusals+1 {
			m.HangupGivenUp.Add(1)
			log.Error("hangup refused by Graph too often, no more quick retries: hung up again only every hang-up grace",
				zap.Int("refusals", next.HangupRefusals), zap.Duration("grace", m.cfg.HangupGrace))
		}
		log.Debug("transition", zap.Stringer("from", cur.State), zap.Stringer("to", next.State), zap.Int("commands", len(cmds)))
		var lease float64 // the lease this save wrote for the commands it added
		if len(added) > 0 && !w.OutboxDue.IsZero() {
			lease = float64(w.OutboxDue.UnixMilli())
		}
		m.carryOut(ctx, next, added, slot, after, lease, log)
		if next.State.Terminal() && m.cfg.OnEnd != nil {
			m.cfg.OnEnd(next) // the save also took the call out of the set of live calls
		}
		return true, nil
	}
	return false, fmt.Errorf("call %s: %w after retries", callKey, ErrConflict)
}

// addToOutbox numbers cmds and appends them to the outbox, decided by the transition to version.
func (c *Call) addToOutbox(cmds []Command, version int64) []Pending {
	if len(cmds) == 0 {
		return nil
	}
	out := make([]Pending, len(cmds))
	for i, cmd := range cmds {
		c.CmdSeq++
		out[i] = Pending{Seq: c.CmdSeq, Version: version, Cmd: cmd}
	}
	c.Outbox = append(slices.Clone(c.Outbox), out...)
	return out
}

// carryOut queues the Graph commands for the call's executor, then runs after (what follows the
// queue writes the save carried: it wakes the dispatcher) and the storage commands.
func (m *Machine) carryOut(ctx context.Context, c Call, ps []Pending, slot *place, after func(), lease float64, log *zap.Logger) {
	// The commands of each kind decided before these and not done yet: their batch is acknowledged
	// behind them, so that one finished here first does not retire them (another instance may
	// still be carrying them out, or have died before it did).
	var prevGraph, prevStorage int64
	if len(ps) > 0 {
		for _, p := range c.Outbox {
			if p.Seq >= ps[0].Seq {
				break
			}
			if p.Cmd.Kind.Graph() {
				prevGraph = p.Seq
			} else {
				prevStorage = p.Seq
			}
		}
	}
	var storage, toGraph []Pending
	for _, p := range ps {
		if p.Cmd.Kind.Graph() {
			toGraph = append(toGraph, p)
		} else {
			storage = append(storage, p)
		}
	}
	// Graph commands are queued first: an enqueue (carried by the save, or a storage command)
	// can set off the call's next transition at once, as the dispatcher offers the caller to an
	// agent, and that transition's Graph commands (the transfer) must follow this one's (silence
	// the menu, start the hold music) on the call's executor.
	m.queueGraph(ctx, c, toGraph, prevGraph, slot, lease, log)
	if after != nil {
		after()
	}
	if !m.runStorage(ctx, c, storage, prevStorage, log) {
		m.retryLater(c, storage, prevStorage)
	}
}

// runStorage carries out storage commands in order and acknowledges them (prev: the last storage
// command before them not done when they were decided; 0 when none). A failure leaves them in the
// outbox, for RunOutbox to retry (they are idempotent); it reports whether all were done.
func (m *Machine) runStorage(ctx context.Context, c Call, ps []Pending, prev int64, log *zap.Logger) bool {
	if len(ps) == 0 {
		return true
	}
	key := graph.CallKey(c.ID)
	if m.batchReleases(ctx, c, ps, prev) {
		return true
	}
	if cmd, err := m.doStorage(ctx, c, ps); err != nil {
		log.Error("command failed, left in the outbox", zap.Stringer("command", cmd), zap.Error(err))
		return false
	}
	m.ack(ctx, key, false, prev, ps[len(ps)-1].Seq, log)
	return true
}

// doStorage carries out the storage commands ps of c in order, up to the first Redis refuses,
// whose kind it returns with the error.
func (m *Machine) doStorage(ctx context.Context, c Call, ps []Pending) (CommandKind, error) {
	key := graph.CallKey(c.ID)
	for _, p := range ps {
		cmd := p.Cmd
		var err error
		switch cmd.Kind {
		case CmdEnqueue:
			err = m.cfg.Queues.Enqueue(ctx, c.Tenant, cmd.Queue, key, cmd.Score)
		case CmdLeaveQueue:
			err = m.cfg.Queues.Remove(ctx, c.Tenant, cmd.Queue, key)
		case CmdReleaseAgent:
			err = m.cfg.Queues.Release(ctx, c.Tenant, cmd.Agent, key, cmd.AgentOutcome, cmd.After)
		case CmdSetTimer: // armed with the save now; kept for outboxes saved before that
			err = m.cfg.Timers.Set(ctx, c.Tenant, key, cmd.Timer, cmd.Token, m.cfg.Now().Add(cmd.After))
			if err == nil && m.cfg.Store.WaitsOnNodes() {
				err = m.cfg.Store.Durably(ctx, m.cfg.Store.timers, nil) // replicated before its acknowledgement
			}
		}
		if err != nil {
			return cmd.Kind, err
		}
	}
	return 0, nil
}

// batchReleases hands the agent releases of an ended call to the next batch of acknowledgements
// (RunAcks), written in its pipeline ahead of their own acknowledgement: no round trip of their
// own, once the save that decided them has won (a release in the save's own pipeline went out
// even when the save lost its race: decided on a stale copy, it freed an agent talking to the
// caller). It reports whether it took them: only releases, of a call that ended, with batching on,
// and not on Redis Cluster, where the batch's pipeline spans masters: the acknowledgement applied
// on the record's master while the release failed on the queue's (a failover), and the batch
// dropped before that master is back, would lose the release (there it runs on its own, and is
// acknowledged once done; with replicas, once replicated). The cached copy learns they are done once the batch is written; until then a
// crash leaves them in the outbox, for the re-drive.
func (m *Machine) batchReleases(ctx context.Context, c Call, ps []Pending, prev int64) bool {
	qw, ok := m.cfg.Queues.(QueueWriter)
	if !ok || !c.State.Terminal() || !m.batching.Load() || m.cfg.Store.Clustered() {
		return false
	}
	cmds := make([]Command, 0, len(ps))
	for _, p := range ps {
		if p.Cmd.Kind != CmdReleaseAgent {
			return false
		}
		cmds = append(cmds, p.Cmd)
	}
	key := graph.CallKey(c.ID)
	seq := ps[len(ps)-1].Seq
	write, after := qw.Writes(context.WithoutCancel(ctx), c.Tenant, key, cmds) // written later, by RunAcks
	done := func() {
		m.cache.acked(key, false, prev, seq)
		if after != nil {
			after()
		}
	}
	// not taken (the batch is full, or RunAcks stopped meanwhile): at once, on their own
	taken, _ := m.batch(Ack{Call: key, Prev: prev, Seq: seq, Writes: write, Done: done})
	return taken
}

// dropTimers takes the timers the saved transition from cur to next disarmed (superseded,
// cancelled, fired, or left by the call's end) out of the timer set, with the next batch of
// acknowledgements (RunAcks): no round trip of their own. Left there, each fires later for
// nothing: a claim, a read of the record and a removal, more than a round trip per call. Without
// batching (RunAcks has stopped: a shutdown, whose grace still applies what Graph answers to the
// commands being sent) they go at once; with the batch full they are left to fire and be
// ignored, as any timer a crash leaves behind.
func (m *Machine) dropTimers(cur, next Call, key string) {
	if len(cur.Timers) == 0 {
		return
	}
	var stale []string
	for kind, tok := range cur.Timers {
		if tok != 0 && next.Timers[kind] != tok {
			stale = append(stale, member(cur.Tenant, key, kind, tok))
		}
	}
	m.dropMembers(key, stale)
}

// dropMembers takes timer-set members out with the next batch of acknowledgements, or at once
// when there is no batching.
func (m *Machine) dropMembers(key string, stale []string) {
	if len(stale) == 0 {
		return
	}
	if _, on := m.batch(Ack{Call: key, Timers: stale}); on {
		return // taken, or the batch is full: left to fire and be ignored
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := m.cfg.Store.AckMany(ctx, Ack{Call: key, Timers: stale}); err != nil {
		m.cfg.Log.Debug("disarmed timers left in the timer set", zap.String("call_id", key), zap.Error(err))
	}
}

// dropLost takes the timers armed ahead of saves that lost their race (lost) out of the timer
// set with the next batch of acknowledgements, as dropTimers does: those whose token a record
// read or saved since has drawn (drawn; tokens only grow, so no later decision arms it again)
// and that no such record holds (kept: another instance's save, or the attempt after the lost
// one, armed the same timer). Any other is left to fire and be ignored, as one a crash leaves.
func (m *Machine) dropLost(lost []Timer, kept []string, drawn int64) {
	if len(lost) == 0 {
		return
	}
	var stale []string
	for _, tm := range lost {
		l := member(tm.Tenant, tm.Call, tm.Kind, tm.Token)
		if tm.Token <= drawn && !slices.Contains(kept, l) && !slices.Contains(stale, l) {
			stale = append(stale, l)
		}
	}
	m.dropMembers(lost[0].Call, stale)
}

// appendMembers appends the timer-set members of a record's timers.
func appendMembers(out []string, tenant, key string, timers map[TimerKind]int64) []string {
	for kind, tok := range timers {
		if tok != 0 {
			out = append(out, member(tenant, key, kind, tok))
		}
	}
	return out
}

// ack records that a batch of a call's commands of one kind (after prev, up to seq) is done: at
// once in the cached copy (so its next save drops them from the outbox), and in Redis either in
// the next batch (RunAcks) or now.
func (m *Machine) ack(ctx context.Context, key string, graphKind bool, prev, seq int64, log *zap.Logger) {
	m.cache.acked(key, graphKind, prev, seq)
	a := Ack{Call: key, Graph: graphKind, Prev: prev, Seq: seq}
	if taken, _ := m.batch(a); taken {
		return
	}
	// no batching, or the batch is full: write this one now
	if err := m.cfg.Store.AckMany(ctx, a); err != nil {
		log.Warn("acknowledge commands", zap.Error(err))
	}
}

// batch hands a to RunAcks' next batch: taken, or not because RunAcks is not running (on false)
// or the batch is full. RunAcks, stopping, turns batching off under ackMu before it takes what is
// left in the channel, so an acknowledgement taken is one it writes.
func (m *Machine) batch(a Ack) (taken, on bool) {
	m.ackMu.RLock()
	defer m.ackMu.RUnlock()
	if !m.batching.Load() {
		return false, false
	}
	select {
	case m.acks <- a:
		return true, true
	default:
		return false, true
	}
}

// RunAcks writes acknowledgements in batches, one round trip each, every interval (or sooner
// when a batch fills) until ctx ends; then it writes what is left. An acknowledgement that is
// late by a batch only risks what a crash already risks: a command done twice, which the outbox
// re-drive is built for.
func (m *Machine) RunAcks(ctx context.Context, every time.Duration) {
	m.batching.Store(true)
	defer m.batching.Store(false)
	t := time.NewTicker(every)
	defer t.Stop()
	var batch []Ack
	// Writes do not stop with ctx: acknowledgements already taken are written on the way out.
	flush := func() {
		if len(batch) == 0 {
			return
		}
		wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := m.cfg.Store.AckMany(wctx, batch...); err != nil {
			if len(batch) < 4*cap(m.acks) && ctx.Err() == nil {
				return // Redis is away: try again with the next batch
			}
			m.cfg.Log.Warn("acknowledgements dropped; the outbox will re-drive their commands", zap.Int("acks", len(batch)), zap.Error(err))
		} else {
			for _, a := range batch {
				if a.Done != nil {
					a.Done()
				}
			}
		}
		clear(batch)
		batch = batch[:0]
	}
	for {
		select {
		case a := <-m.acks:
			if batch = append(batch, a); len(batch) >= cap(m.acks)/4 {
				flush()
			}
		case <-t.C:
			flush()
		case <-ctx.Done():
			m.ackMu.Lock() // no batch is sending: whatever was taken is in the channel
			m.batching.Store(false)
			m.ackMu.Unlock()
			for {
				select {
				case a := <-m.acks:
					batch = append(batch, a)
					continue
				default:
				}
				break
			}
			flush()
			return
		}
	}
}

// queueGraph sends Graph commands in order on the call's executor, then acknowledges them (prev:
// the last Graph command before them not done when they were decided, which another instance
// may still be carrying out; 0 when none). slot, if not nil, is the place on the executor taken
// for them before the save.
func (m *Machine) queueGraph(ctx context.Context, c Call, ps []Pending, prev int64, slot *place, lease float64, log *zap.Logger) {
	key := graph.CallKey(c.ID)
	if len(ps) == 0 {
		if slot != nil {
			m.exec.fill(key, slot, nil)
		}
		return
	}
	scenario := c.Scenario
	if s := graph.ScenarioID(ctx); s != "" {
		scenario = s
	}
	if slot == nil {
		slot = m.exec.reserve(key)
	}
	if c.State == StateTransferring && slices.ContainsFunc(ps, func(p Pending) bool { return p.Cmd.Kind == CmdTransfer }) {
		// The transfer takes the caller's media: the prompts and cancellations decided before
		// it and not yet sent (the hold music of the queue the caller just joined) would only
		// delay it, and Graph refuses them once the call is transferring. A failed transfer
		// starts the hold music again (transferFailed).
		m.exec.supersede(key, ps[0].Version)
	}
	m.carry(key)
	if lease > 0 {
		m.leased(lease, key)
	}
	m.exec.fill(key, slot, func() {
		for i, p := range ps {
			if (p.Cmd.Kind == CmdPlayPrompt || p.Cmd.Kind == CmdCancelMedia) && m.exec.superseded(key, p.Version) {
				m.Superseded.Add(1)
				continue
			}
			if m.cutOff() || !m.send(c, scenario, p.Cmd, log) {
				// this instance does not reach Graph, and others do: the commands from this one
				// on are theirs (those before it are done)
				if i > 0 {
					m.ack(context.Background(), key, true, prev, ps[i-1].Seq, log)
				}
				m.handOver(key, len(ps)-i, true, log)
				return
			}
		}
		// a command whose result was fed back as an event is done too: the event decided what next
		m.ack(context.Background(), key, true, prev, ps[len(ps)-1].Seq, log)
		m.carried(key)
	})
}

// cutOff reports whether this instance leaves Graph's work to the others (Config.CutOff).
func (m *Machine) cutOff() bool { return m.cfg.CutOff != nil && m.cfg.CutOff() }

// handOver makes key's outbox, whose commands from the n-th on this instance did not carry out
// (cut off from Graph), due at once for the other instances, if its lease is still the one this
// instance last wrote (leased): one claimed since by another instance (its lease ran out) or
// saved by one (a later transition's commands, which it carries out) is theirs already.
//
// done: the batch handed over is no longer carried here (carried, in the same step as the lease
// is read, so that a renewal does not move the lease on once it is handed back).
func (m *Machine) handOver(key string, n int, done bool, log *zap.Logger) {
	m.carryMu.Lock()
	score, ok := m.leases[key]
	if done {
		m.uncarry(key)
	}
	m.carryMu.Unlock()
	if !ok {
		return // none written here: the lease is another instance's, or runs out on its own
	}
	m.HandedOver.Add(1)
	if n > 0 {
		log.Info("commands left to the other instances: Graph not reached from here", zap.Int("commands", n))
	} else {
		log.Info("commands under way left to the other instances: Graph not reached from here")
	}
	ctx, cancel := context.WithTimeout(context.Background(), m.cfg.CommandTimeout)
	defer cancel()
	m.handBack(ctx, key, score, m.cfg.Now(), "commands left to the other instances", log)
}

// HandOverCarried hands the outboxes of the calls this instance is carrying out to the other
// instances, due at once (handOver): callbot calls it when it finds this instance cut off from
// Graph (Config.CutOff), whose requests under way here may wait their whole deadline, and the
// checks of the call that follow their failure as long again. A re-drive reads the call before
// it repeats what may have taken effect; a request of this instance that reaches Graph after
// all is then refused, or repeats a prompt.
func (m *Machine) HandOverCarried() {
	for _, key := range m.Carrying() {
		m.handOver(key, 0, false, m.cfg.Log.With(zap.String("call_id", key)))
	}
}

// send runs one Graph command and feeds its result back as an event where the result matters.
// It reports false, feeding nothing back, when the command is left to the other instances: it
// failed without an answer from Graph while this instance is cut off from Graph (Config.CutOff)
// or another instance has just had one (Config.OthersReachGraph). A re-drive then reads the call
// before it repeats what may have taken effect.
func (m *Machine) send(c Call, scenario string, cmd Command, log *zap.Logger) bool {
	ctx := graph.WithIncomingAt(graph.WithTenantID(graph.WithScenarioID(context.Background(), scenario), c.Tenant), c.CreatedAt)
	ctx, cancel := context.WithTimeout(ctx, m.cfg.CommandTimeout)
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
		op, err = cc.SubscribeToTone(ctx, c.ID, cmd.ClientContext)
	case CmdCancelMedia:
		_, err = cc.CancelMediaProcessing(ctx, c.ID, cmd.ClientContext)
	case CmdTransfer:
		err = cc.Transfer(ctx, c.ID, cmd.Target, cmd.ClientContext)
	case CmdHangup:
		err = cc.Hangup(ctx, c.ID)
	case CmdCheckCall:
		m.checkCall(c, scenario, cmd.Settles, log, false)
		return true
	case CmdCheckRoster:
		if cur, ok := m.cache.get(graph.CallKey(c.ID)); ok && pastToken(cur, cmd.ClientContext, cur.RosterCtx) {
			// A later read superseded it (each roster without the agent decides one): its answer
			// would be ignored, and Graph asked once per notification, ahead of what the call
			// decided since (its hangup). As Stale on a notification: a token the cached copy has
			// moved past, no later version waits for.
			log.Debug("roster read superseded: not sent", zap.String("client_context", cmd.ClientContext))
			return true
		}
		m.checkRoster(c, scenario, cmd.ClientContext, log)
		return true
	case CmdInvite:
		op, err = cc.InviteParticipants(ctx, c.ID, graph.InviteRequest{Participants: []graph.Invitee{{Party: cmd.Target}}, ClientContext: cmd.ClientContext})
	}
	key := graph.CallKey(c.ID)
	feed := func(ev Event) {
		m.applyResult(c.Tenant, key, ev, "apply command result", cmd.Kind.String(), log)
	}
	if err != nil {
		log.Warn("graph command failed", zap.Stringer("command", cmd.Kind), zap.Error(err))
		var ge *graph.Error
		if !errors.As(err, &ge) && (m.cutOff() || m.cfg.OthersReachGraph != nil && m.cfg.OthersReachGraph()) {
			return false // no answer from Graph, which the other instances reach: theirs to re-drive
		}
		switch {
		case errors.Is(err, graph.ErrCallGone):
			feed(Event{Kind: EvEnded, Reason: "call gone: " + cmd.Kind.String(), Command: cmd.Kind.String()})
		case cmd.Kind == CmdAnswer && graph.Classify(err) == graph.Refused && !cmd.Unverified:
			m.answerRefused(c, scenario, log)
		case cmd.Kind == CmdAnswer && graph.Classify(err) == graph.Refused:
			// an answer sent without a read (Command.Unverified): Graph may refuse it because the
			// earlier answer took, and the call is established; ask, rather than end the call
			m.checkCall(c, scenario, false, log, false)
		case cmd.Kind == CmdAnswer:
			// ambiguous (timeout, 5xx): the answer may have been taken; or not taken (throttled,
			// never sent: the token could not be had), which is no refusal of the call. Ask
			// Graph, and answer again only if it still has the call incoming; one Graph did not
			// process does not count against maxAnswers
			m.checkCall(c, scenario, false, log, graph.Classify(err) == graph.NotProcessed)
		case cmd.Kind == CmdTransfer && !definitive(err):
			// Graph may have taken it: do not send it again, ask where the call is. A request
			// that timed out may still be under way in Graph, which may not have left
			// established yet: established now is one more look, settled by the transfer's
			// notifications or a second read a while later (transferRecheck), not a failure
			m.checkCall(c, scenario, false, log, false)
		case cmd.Kind == CmdTransfer:
			// the attempt's clientContext: applied again (Redis refused it, but may have taken
			// it), the failure is not taken for a later attempt's
			feed(Event{Kind: EvTransferFailed, ClientContext: cmd.ClientContext, Reason: err.Error(), Verified: true,
				NotSent: graph.Classify(err) == graph.NotProcessed})
		case cmd.Kind == CmdPlayPrompt:
			// a prompt that cannot play must not leave the caller waiting for its end
			feed(Event{Kind: EvPromptDone, ClientContext: cmd.ClientContext, Failed: true})
		case cmd.Kind == CmdSubscribeToTone:
			// Without it the caller's keys do nothing for the whole call: subscribe again later
			// (the call's tone timer, a durable one, with backoff), a few times.
			feed(Event{Kind: EvToneFailed, ClientContext: cmd.ClientContext})
		case cmd.Kind == CmdHangup:
			// Graph did not end the call (throttled, failing, timed out, refused): hang up again
			// soon (the call's hang-up timer, brought forward, with backoff), not only at the
			// hang-up grace, the caller in silence after the goodbye meanwhile
			ev := Event{Kind: EvHangupFailed, ClientContext: cmd.ClientContext, Refused: graph.Classify(err) == graph.Refused}
			var ge *graph.Error
			if errors.As(err, &ge) {
				ev.RetryAfter = ge.RetryAfter // what Graph asked for, if it said
			}
			feed(ev)
		case cmd.Kind == CmdInvite && cmd.Again:
			// Re-sent not knowing whether the first invite reached Graph: a refusal may only
			// mean the agent is ringing already. The first invite's completion, the roster or
			// the invite's timer settles it.
			log.Info("invite refused when sent again; waiting for the first one's outcome")
		case cmd.Kind == CmdInvite && definitive(err):
			feed(Event{Kind: EvInviteDone, ClientContext: cmd.ClientContext, Failed: true, NotSent: graph.Classify(err) == graph.NotProcessed})
			// an ambiguous invite failure is settled by the invite's notification or its timer
		}
		return true
	}
	switch {
	case cmd.Kind == CmdPlayPrompt && op.Status.Final():
		// a final status in the response is the outcome, and no notification follows: a failed
		// one is a failed prompt (hold music is then tried again later, not at once)
		feed(Event{Kind: EvPromptDone, ClientContext: cmd.ClientContext, Failed: op.Status == graph.OpFailed})
	case cmd.Kind == CmdSubscribeToTone && op.Status == graph.OpFailed:
		feed(Event{Kind: EvToneFailed, ClientContext: cmd.ClientContext})
	case cmd.Kind == CmdInvite && op.Status.Final():
		feed(Event{Kind: EvInviteDone, ClientContext: cmd.ClientContext, Failed: op.Status == graph.OpFailed})
	}
	return true
}

// checkCall reads the call's state from Graph and feeds it back (EvCallState), when callbot
// doubts a notification: a transfer failure that may belong to an earlier attempt, a transfer
// request that failed ambiguously (Graph may have taken it), a transfer or an answer with no
// outcome in time (a notification may be lost). A call Graph no longer has is ended; how it
// ended (transferred, caller gone) is what its terminated notification says, when it comes.
// settles: the read follows the current transfer attempt's own request or timer (EvCallState's
// Verified).
// notSent: the read follows an answer Graph did not process (EvCallState's NotSent).
func (m *Machine) checkCall(c Call, scenario string, settles bool, log *zap.Logger, notSent bool) {
	ctx, cancel := context.WithTimeout(graph.WithTenantID(graph.WithScenarioID(context.Background(), scenario), c.Tenant), m.cfg.CommandTimeout)
	defer cancel()
	st, err := m.cfg.Control.GetCall(ctx, c.ID)
	key := graph.CallKey(c.ID)
	var ev Event
	switch {
	case errors.Is(err, graph.ErrCallGone) && c.State == StateTransferring && !settles:
		// transferred, or the caller left while it rang: the terminated notification, on its
		// way, says which; if it never comes, the transfer's timer asks again
		log.Info("call gone from Graph during a transfer; waiting for its terminated notification")
		return
	case errors.Is(err, graph.ErrCallGone):
		ev = Event{Kind: EvEnded, Reason: ReasonGone}
	case err != nil && c.State == StateTransferring:
		// a transfer in doubt waits on this read: asked again a recheck later (EvCallState)
		log.Warn("cannot read the call from Graph during a transfer", zap.Error(err))
		ev = Event{Kind: EvCallState, Unreadable: true}
	case err != nil && c.State == StateAnswering:
		// an answer in doubt waits on this read, and Graph drops a call not answered 15 s
		// after it came in: asked again soon (EvCallState)
		log.Warn("cannot read the call from Graph while answering it", zap.Error(err))
		ev = Event{Kind: EvCallState, Unreadable: true}
	case err != nil:
		log.Warn("cannot read the call from Graph; its timers will ask again", zap.Error(err))
		return
	default:
		ev = Event{Kind: EvCallState, GraphState: st, Verified: settles}
	}
	if ev.Kind == EvCallState {
		ev.ClientContext = readFor(c) // a later transfer attempt takes nothing from it
		ev.NotSent = notSent && c.State == StateAnswering
	}
	m.applyResult(c.Tenant, key, ev, "apply call state from Graph", "", log)
}

// answerRefused settles an answer Graph refused (a 4xx but 404 and 429). Graph refuses an answer
// to a call another answer of ours has taken ("Action answer is not allowed: call is in state
// establishing"): two ways of answering a call may both have found it incoming, such as the
// outbox's re-drive of a dead or stalled instance's answer and the answer's own timer, both due
// when Redis came back from a stall (TestRedisStall, 12 s). Taking that refusal for the call's
// ended the call in callbot while Graph established it: the caller was left in silence, in a call
// no one would end. So the call is read first: answered (establishing, established), it carries
// on (established: the menu starts; establishing: its established notification follows, or the
// answer's timer reads it again); gone, it ended; otherwise (incoming, or no answer to the read)
// the refusal ends the call, as before.
func (m *Machine) answerRefused(c Call, scenario string, log *zap.Logger) {
	ctx, cancel := context.WithTimeout(graph.WithTenantID(graph.WithScenarioID(context.Background(), scenario), c.Tenant), m.cfg.CommandTimeout)
	defer cancel()
	st, err := m.cfg.Control.GetCall(ctx, c.ID)
	key := graph.CallKey(c.ID)
	var ev Event
	switch {
	case err == nil && st == graph.CallEstablishing:
		log.Info("answer refused, the call being answered by an earlier answer: carrying on")
		return
	case err == nil && st == graph.CallEstablished:
		log.Info("answer refused, the call answered by an earlier answer: carrying on")
		ev = Event{Kind: EvCallState, GraphState: st, ClientContext: readFor(c)}
	case errors.Is(err, graph.ErrCallGone):
		ev = Event{Kind: EvEnded, Reason: ReasonGone}
	default:
		ev = Event{Kind: EvCommandFailed, Command: CmdAnswer.String()}
	}
	m.applyResult(c.Tenant, key, ev, "apply the answer's refusal", CmdAnswer.String(), log)
}

// readFor is what a read of c's call is made for (EvCallState's ClientContext): the transfer
// attempt under way, or the state the call is in when none is.
func readFor(c Call) string {
	if c.State == StateTransferring {
		return c.TransferCtx
	}
	return c.State.String()
}

// checkRoster reads the call's participants from Graph and feeds them back (EvRoster with the
// read's token), when an invite's outcome or the agent's leaving may not have been notified. A
// call Graph no longer has is ended; a failed read is left to the call's timers.
func (m *Machine) checkRoster(c Call, scenario, token string, log *zap.Logger) {
	ctx, cancel := context.WithTimeout(graph.WithTenantID(graph.WithScenarioID(context.Background(), scenario), c.Tenant), m.cfg.CommandTimeout)
	defer cancel()
	ps, err := m.participants(ctx, c.ID)
	var ev Event
	switch {
	case errors.Is(err, graph.ErrCallGone):
		ev = Event{Kind: EvEnded, Reason: ReasonGone}
	case peerToPeer(err) && c.State == StateInviting:
		// Graph does not list the participants of a peer-to-peer call: the agent has not joined
		// (a call they joined has three parties, a group call)
		ev = Event{Kind: EvRoster, Participants: []string{}, ClientContext: token}
	case err != nil:
		log.Warn("cannot read the call's participants from Graph; its timers will ask again", zap.Error(err))
		return
	default:
		ev = rosterEvent(ps)
		ev.ClientContext = token
	}
	m.applyResult(c.Tenant, graph.CallKey(c.ID), ev, "apply the participants read from Graph", "", log)
}

// redriveRecheck is how soon an outbox whose record the replicas do not have yet is looked at
// again by a re-drive.
const redriveRecheck = time.Second

// Redis refusing a command's result for a moment (down, restarting, failing over: on Redis
// Cluster the call's master alone) is waited out: the result is applied again resultRetryFirst
// later, then twice as long after each refusal, resultRetries times at most (about 16 s, past a
// Cluster's failover and most of Sentinel's).
const (
	resultRetryFirst = 250 * time.Millisecond
	resultRetries    = 6
)

// applyResult applies ev, what a Graph command or a read of the call came back with, to the
// call. Nothing would deliver it again (a notification Redis refuses is answered 503, and Graph
// sends it again): when Redis refuses the change, it is applied again a moment later, a few
// times, on the call's executor (the call's next commands wait for it). Before, it was dropped,
// and the call waited for its timers: a transfer's failure read from Graph while a Cluster
// master failed over left the caller in silence until the transfer's timer, 90 s on.
// command names the command whose result it is, if any, in its log lines.
func (m *Machine) applyResult(tenant, key string, ev Event, what, command string, log *zap.Logger) {
	wait := resultRetryFirst
	for try := 0; ; try++ {
		_, err := m.Handle(context.Background(), tenant, key, ev)
		if err == nil {
			if try > 0 {
				log.Info(what+": applied once Redis took it", zap.String("command", command), zap.Stringer("event", ev.Kind), zap.Int("retries", try))
			}
			return
		}
		fields := []zap.Field{zap.String("command", command), zap.Stringer("event", ev.Kind), zap.Int("retries", try), zap.Error(err)}
		if errors.Is(err, ErrInvalidTransition) || try == resultRetries {
			log.Error(what, fields...) // left to the call's timers
			return
		}
		log.Warn(what+": Redis refused it, applied again", append(fields, zap.Duration("in", wait))...)
		time.Sleep(wait)
		wait *= 2
	}
}

// carry records that this instance has taken on a batch of key's commands; carried, that the
// batch is done and acknowledged (or its acknowledgement queued for RunAcks).
func (m *Machine) carry(key string) {
	m.carryMu.Lock()
	m.carrying[key]++
	m.carryMu.Unlock()
}

func (m *Machine) carried(key string) {
	m.carryMu.Lock()
	m.uncarry(key)
	m.carryMu.Unlock()
}

// uncarry is carried under carryMu.
func (m *Machine) uncarry(key string) {
	if m.carrying[key]--; m.carrying[key] <= 0 {
		delete(m.carrying, key)
		delete(m.leases, key)
	}
}

// leased records score as the outbox lease this instance wrote for key, carried.
func (m *Machine) leased(score float64, keys ...string) {
	m.carryMu.Lock()
	for _, key := range keys {
		if m.carrying[key] > 0 {
			m.leases[key] = score
		}
	}
	m.carryMu.Unlock()
}

// Carrying lists the calls whose commands this instance is carrying out.
func (m *Machine) Carrying() []string {
	m.carryMu.Lock()
	defer m.carryMu.Unlock()
	return slices.Collect(maps.Keys(m.carrying))
}

// renewLeases moves the outbox leases of the calls this instance is carrying out a lease ahead:
// a command held up by a slow Graph (each may take CommandTimeout, and a call's commands go one
// after another) is not re-driven by another instance while this one lives, though the lease is
// short enough to re-drive an answer a dead instance saved within Graph's answer deadline.
func (m *Machine) renewLeases(ctx context.Context) {
	keys := m.Carrying()
	if len(keys) == 0 || m.cutOff() {
		return // cut off from Graph: what it carries is handed back, or falls due a lease on
	}
	due := m.cfg.Now().Add(m.cfg.OutboxLease)
	if err := m.cfg.Store.RenewOutbox(ctx, keys, due); err != nil {
		if ctx.Err() == nil {
			m.cfg.Log.Warn("renew outbox leases", zap.Int("calls", len(keys)), zap.Error(err))
		}
		return
	}
	// a lease another instance wrote later (GT kept it) is not this one's: the hand-back, which
	// compares, leaves it alone
	m.leased(float64(due.UnixMilli()), keys...)
}

// RenewLeases renews, every quarter lease until ctx ends, the outbox leases of the calls this
// instance is carrying out. RunOutbox runs it; an instance shutting down runs it until its last
// commands are sent, so that no other instance sends them again meanwhile.
func (m *Machine) RenewLeases(ctx context.Context) {
	repeat(ctx, max(m.cfg.OutboxLease/4, time.Millisecond), false, func() { m.renewLeases(ctx) })
}

// handBack makes key's outbox, leased with score and not carried out here, due at due for any
// instance (Store.HandBackOutbox). When Redis refuses that, the hand-back is remembered and tried
// again by RunOutbox every tick until Redis takes it or the lease runs out (a claim then takes
// the outbox anyway). Before, it was only logged: a save refused as unreplicated as its master
// was SIGKILLed (a Sentinel failover after a replication stall) found that master gone, and the
// answer it decided waited on the promoted master for the whole lease (answers 6.6 to 10.9 s
// after the call's first delivery in the Sentinel soak; Graph drops a call not answered in 15 s).
func (m *Machine) handBack(ctx context.Context, key string, score float64, due time.Time, what string, log *zap.Logger) {
	err := m.cfg.Store.HandBackOutbox(ctx, []string{key}, score, due)
	if err == nil {
		return
	}
	m.handMu.Lock()
	m.handBacks[key] = HandBack{Call: key, Score: score, Due: due}
	m.handMu.Unlock()
	log.Info(what+": not handed back, tried again until Redis takes it", zap.Error(err))
}

// retryHandBacks tries again, in one round trip, the hand-backs Redis refused (handBack), and
// forgets those it takes and those whose lease has run out. It returns how many are left.
func (m *Machine) retryHandBacks(ctx context.Context) int {
	now := float64(m.cfg.Now().UnixMilli())
	m.handMu.Lock()
	var todo []HandBack
	for key, h := range m.handBacks {
		if now >= h.Score {
			delete(m.handBacks, key) // due for a claim anyway
		} else {
			todo = append(todo, h)
		}
	}
	m.handMu.Unlock()
	if len(todo) == 0 {
		return 0
	}
	// not under handMu: a save refused meanwhile adds to it without waiting for Redis
	err := m.cfg.Store.HandBackOutboxes(ctx, todo)
	m.handMu.Lock()
	defer m.handMu.Unlock()
	if err == nil {
		for _, h := range todo {
			if m.handBacks[h.Call] == h { // not replaced by a later hand-back of the call
				delete(m.handBacks, h.Call)
			}
		}
		m.cfg.Log.Info("outboxes handed back once Redis took them", zap.Int("calls", len(todo)))
	}
	return len(m.handBacks)
}

// RunOutbox, every interval until ctx ends, re-drives the commands of calls whose lease ran out
// (all of those due, a hundred at a time): commands an instance saved and did not acknowledge,
// because it died or lost Redis. Meanwhile it renews the leases of the calls this instance is
// carrying out (RenewLeases), on a goroutine of its own: a re-drive that waits for Graph must not
// hold the renewal up.
func (m *Machine) RunOutbox(ctx context.Context, every time.Duration) {
	var renewing sync.WaitGroup
	renewing.Go(func() { m.RenewLeases(ctx) })
	defer renewing.Wait()
	defer func() {
		// a shutdown: the hand-backs still refused are tried once more (at worst their
		// outboxes wait their lease)
		hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		if n := m.retryHandBacks(hctx); n > 0 {
			m.cfg.Log.Warn("outbox leases not handed back at shutdown: re-driven once their lease runs out", zap.Int("calls", n))
		}
		cancel()
	}()
	repeat(ctx, max(min(cmp.Or(every, time.Second), m.cfg.OutboxLease/4), time.Millisecond), false, func() {
		m.retryHandBacks(ctx) // before the claim: an outbox handed back now is claimed at once
		m.retryStorage(ctx)   // before the claim: done now, these are not re-driven
		// Every call whose transition decided commands falls due here a lease later, nearly
		// always acknowledged by then: claim until none is left due, or the outbox of an
		// instance that died waits behind the calls done already.
		for ctx.Err() == nil && !m.cutOff() {
			keys, score, err := m.cfg.Store.ClaimOutbox(ctx, m.cfg.Now(), m.cfg.OutboxLease, 100)
			if err != nil {
				if ctx.Err() == nil {
					m.cfg.Log.Warn("claim outboxes", zap.Error(err))
				}
				return
			}
			claimed := len(keys)
			// Most are done with: one read of them all, one removal from the index, and only
			// those with commands pending are re-driven (a read and a removal for each of a few
			// hundred calls a second was a quarter of a round trip per notification).
			keys = m.skipDone(ctx, keys, score)
			if !m.redriveAll(ctx, keys, score) {
				return
			}
			if claimed < 100 {
				return
			}
		}
	})
}

// redriveParallel is how many claimed outboxes RunOutbox re-drives at once. The re-drive of an
// answer or a transfer reads the call from Graph first; one at a time, the calls a killed
// instance left answering waited for each other's reads, and at Graph's 100-200 ms those re-driven
// last missed its 15 s answer deadline (their lease alone is 8 s).
const redriveParallel = 16

// redriveAll re-drives the claimed outboxes keys (score), redriveParallel at once, and reports
// whether it got through them all. On a shutdown (ctx ends) those not begun are handed back, due
// at once for the other instances, not a lease later; those begun are carried through (a read of
// Graph cut short would count as Graph unreadable, and its command be given up).
func (m *Machine) redriveAll(ctx context.Context, keys []string, score float64) bool {
	work := make(chan string)
	var wg sync.WaitGroup
	for range min(redriveParallel, len(keys)) {
		wg.Go(func() {
			for key := range work {
				m.Redrive(context.WithoutCancel(ctx), key, score)
			}
		})
	}
	defer wg.Wait()
	defer close(work)
	for i, key := range keys {
		if ctx.Err() == nil {
			select {
			case work <- key:
				continue
			case <-ctx.Done():
			}
		}
		hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		if err := m.cfg.Store.HandBackOutbox(hctx, keys[i:], score, m.cfg.Now()); err != nil {
			m.cfg.Log.Warn("hand back claimed outboxes", zap.Int("calls", len(keys)-i), zap.Error(err))
		}
		cancel()
		return false
	}
	return true
}

// skipDone takes out of the outbox index the claimed calls (score) whose commands are all
// acknowledged, or that have no record, and returns the others, for Redrive. When the records
// cannot be read it returns keys whole: Redrive reads each.
func (m *Machine) skipDone(ctx context.Context, keys []string, score float64) []string {
	pending, err := m.cfg.Store.Pending(ctx, keys)
	if err != nil {
		return keys
	}
	var todo, done []string
	for i, k := range keys {
		if pending[i] {
			todo = append(todo, k)
		} else {
			done = append(done, k)
		}
	}
	if err := m.cfg.Store.DoneOutboxes(ctx, done, score); err != nil && ctx.Err() == nil {
		m.cfg.Log.Warn("remove done outboxes from the index", zap.Int("calls", len(done)), zap.Error(err))
	}
	return todo
}

// repeat calls f every interval until ctx ends (at once first when now is set).
func repeat(ctx context.Context, every time.Duration, now bool, f func()) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if now {
			f()
		}
		now = true
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Redrive carries out what is left in one call's outbox. Storage commands are idempotent and
// run again, in order, but for those the call has moved past (a queue write for a queue the
// call has left or joined again since, a release of the agent the call is with again). Of the
// Graph commands, those of the call's latest transition, and older ones the call still waits on
// (an answer while answering, the transfer to the agent it is transferring to, the invite it
// waits for, a hangup while terminating, the tone subscription): an older prompt or
// cancellation is moot, as later events decided without it. One that acts on the call itself
// (answer, reject, transfer) is first checked against the call's state in Graph, and skipped if
// it evidently took effect.
func (m *Machine) Redrive(ctx context.Context, key string, claimScore float64) {
	log := m.cfg.Log.With(zap.String("call_id", key))
	c, err := m.cfg.Store.Get(ctx, key)
	if errors.Is(err, ErrNotFound) {
		m.cfg.Store.DoneOutbox(ctx, key, claimScore)
		return
	}
	if err != nil {
		log.Warn("re-drive outbox", zap.Error(err))
		return
	}
	if len(c.Outbox) == 0 {
		m.cfg.Store.DoneOutbox(ctx, key, claimScore)
		return
	}
	// The claim may have taken an entry whose lease ran out just as a live instance saved the
	// call's next transition: that record's commands are that instance's, being sent now (a
	// transfer re-driven then went twice, the look at Graph made before the first reached it).
	// Its save wrote its own index entry ahead of the record read here, and the instance renews
	// it while it works: the claim no longer stands.
	if mine, err := m.cfg.Store.OutboxClaimed(ctx, key, claimScore); err != nil || !mine {
		if err != nil {
			log.Warn("re-drive outbox", zap.Error(err))
		} else {
			log.Debug("outbox saved or renewed since its claim: left to its instance")
		}
		return
	}
	// The record may hold a change refused as unreplicated (CALLBOT_REDIS_REPLICAS): its commands
	// are carried out only once the replicas have it, as a save's are. Sent before, a failover
	// could take the record back to before the decision Graph carried out (a caller transferred
	// while their record has them in the queue, their agent freed by the offer's follow-up). The
	// outbox stays claimed until its lease runs out and is re-driven then. Nil at once without
	// replicas to wait for.
	if err := m.cfg.Store.Sync(ctx, key); err != nil {
		// Nobody sends these commands meanwhile: looked at again a second later, not a lease
		// (an answer saved in the second after a failover, before the new master had a
		// replica, went out 7 to 11 s after the call came in; Graph drops it at 15 s)
		log.Warn("re-drive outbox: the record is not on the replicas yet; again a second later", zap.Error(err))
		m.handBack(ctx, key, claimScore, m.cfg.Now().Add(redriveRecheck), "outbox not on the replicas yet", log)
		return
	}
	m.cache.drop(key)
	// The claim leased the outbox for one lease; asking Graph whether commands took effect may
	// take longer: the lease is renewed while this instance works on it.
	m.carry(key)
	defer m.carried(key)
	m.leased(claimScore, key)
	var storage, current []Pending
	var lastGraph, lastStorage int64
	for _, p := range c.Outbox {
		switch {
		case movedPast(c, p.Cmd):
			lastStorage = max(lastStorage, p.Seq)
		case !p.Cmd.Kind.Graph():
			storage = append(storage, p)
		case p.Version == c.Version || awaited(c, p.Cmd):
			current = append(current, p)
			lastGraph = max(lastGraph, p.Seq)
		default:
			lastGraph = max(lastGraph, p.Seq)
		}
	}
	switch {
	case !m.runStorage(ctx, c, storage, 0, log):
		// tried again on each tick of RunOutbox, as carryOut's are, not a lease later by the
		// next re-drive: a dead instance's release refused in a Redis hiccup kept its agent
		// reserved for a call that had ended for one more lease
		m.retryLater(c, storage, 0)
	case lastStorage > 0:
		m.ack(ctx, key, false, 0, lastStorage, log) // the releases skipped above are done with
	}
	m.Redriven.Add(int64(len(storage)))
	var send []Pending
	for _, p := range current {
		if !p.Cmd.Kind.Idempotent() {
			if done, known := m.tookEffect(ctx, c, p.Cmd, log); done {
				if known {
					m.Skipped.Add(1) // counted only when Graph showed it: the metric says so
				}
				continue
			}
			p.Cmd.Again = true
		}
		send = append(send, p)
	}
	if len(send) == 0 {
		if lastGraph > 0 {
			m.ack(ctx, key, true, 0, lastGraph, log)
		}
		return
	}
	log.Info("re-driving commands left unacknowledged", zap.Int("commands", len(send)))
	m.Redriven.Add(int64(len(send)))
	scenario := c.Scenario
	m.carry(key)
	m.exec.do(key, func() {
		for i, p := range send {
			if m.cutOff() || !m.send(c, scenario, p.Cmd, log) {
				// cut off from Graph meanwhile: the rest is the other instances' (Config.CutOff)
				if i > 0 {
					m.ack(context.Background(), key, true, 0, send[i-1].Seq, log)
				}
				m.handOver(key, len(send)-i, true, log)
				return
			}
		}
		m.ack(context.Background(), key, true, 0, lastGraph, log)
		m.carried(key)
	})
}

// awaited reports whether the call, in its current state, still waits on a Graph command an
// earlier transition decided: such a command was never superseded, only left unsent (its
// instance died) while later events moved the call's version on.
func awaited(c Call, cmd Command) bool {
	switch cmd.Kind {
	case CmdAnswer, CmdReject:
		return c.State == StateAnswering
	case CmdSubscribeToTone:
		// the latest request, while callbot waits on it (a failed one is retried by the call's
		// tone timer); a record saved before ToneCtx existed waits on any
		return !c.State.Terminal() && c.State != StateTerminating &&
			(cmd.ClientContext == c.ToneCtx || c.ToneCtx == "" && c.ToneFails == 0)
	case CmdTransfer:
		return c.State == StateTransferring && cmd.ClientContext != "" && cmd.ClientContext == c.TransferCtx
	case CmdInvite:
		// not while its failure is being checked against the roster (RosterCtx)
		return c.State == StateInviting && cmd.ClientContext != "" && cmd.ClientContext == c.InviteCtx && c.RosterCtx == ""
	case CmdHangup:
		// the latest hangup, while callbot waits on it (a failed one is sent again by the
		// call's hang-up timer); a record saved before HangupCtx existed waits on any
		return c.State == StateTerminating && (cmd.ClientContext == c.HangupCtx || c.HangupCtx == "" && c.HangupFails == 0)
	case CmdCheckRoster:
		return (c.State == StateInviting || c.State == StateConnected) && cmd.ClientContext != "" && cmd.ClientContext == c.RosterCtx
	}
	return false
}

// movedPast reports whether c has moved past the storage command cmd, left undone (its instance
// died, or Redis refused it): run now, it would undo what came after.
func movedPast(c Call, cmd Command) bool {
	switch {
	case cmd.Kind == CmdReleaseAgent && !c.State.Terminal() && cmd.Agent != "" && cmd.Agent == c.Agent:
		// The call is with this agent again (a later offer reserved them for it): releasing
		// now would free them in the middle of that offer. Nothing to do: the release ran, or
		// the later reservation could not have been made.
		return true
	case cmd.Kind == CmdEnqueue && (c.State != StateQueued || c.Queue != cmd.Queue),
		cmd.Kind == CmdLeaveQueue && c.State == StateQueued && c.Queue == cmd.Queue:
		// A queue write the call has moved past (left unacknowledged: on Redis Cluster, one its
		// replicas did not confirm in time): the caller no longer waits in that queue (hung up,
		// or offered: the reservation took them out), or waits in it again. Run now it would
		// put a caller who is gone back in the queue, or take out one who waits.
		return true
	}
	return false
}

// tookEffect asks Graph whether a non-idempotent command already acted on the call. known is
// false when Graph could not be read: done is then true all the same (when in doubt, do not act
// twice; timers and notifications settle the call).
func (m *Machine) tookEffect(ctx context.Context, c Call, cmd Command, log *zap.Logger) (done, known bool) {
	cctx, cancel := context.WithTimeout(ctx, m.cfg.CommandTimeout)
	defer cancel()
	if cmd.Kind == CmdInvite {
		return m.inviteTookEffect(cctx, c, cmd, log)
	}
	st, err := m.cfg.Control.GetCall(cctx, c.ID)
	if errors.Is(err, graph.ErrCallGone) {
		m.Handle(ctx, c.Tenant, graph.CallKey(c.ID), Event{Kind: EvEnded, Reason: "call gone"})
		return true, true
	}
	if err != nil {
		log.Warn("cannot read the call from Graph; not repeating "+cmd.Kind.String(), zap.Error(err))
		if cmd.Kind == CmdTransfer && c.State == StateTransferring || cmd.Kind == CmdAnswer && c.State == StateAnswering {
			// the call waits on this read: asked again soon (a transfer's recheck, an answer's
			// within Graph's deadline), not at its timer (the transfer's, 90 s after the offer,
			// the caller in silence and the agent reserved meanwhile), as checkCall does
			// an answer given up here may never have been sent: not counted (NotSent)
			ev := Event{Kind: EvCallState, Unreadable: true, ClientContext: readFor(c), NotSent: cmd.Kind == CmdAnswer}
			if _, herr := m.Handle(ctx, c.Tenant, graph.CallKey(c.ID), ev); herr != nil {
				log.Warn("ask Graph again soon", zap.Error(herr))
			}
		}
		return true, false
	}
	switch cmd.Kind {
	case CmdAnswer, CmdReject:
		return st != graph.CallIncoming, true
	case CmdTransfer:
		return st != graph.CallEstablished, true
	}
	return false, true
}

// inviteTookEffect asks Graph whether the invited agent is in the call already: the call's own
// state cannot tell (it stays established). An agent in the roster is fed to the call as a
// notified roster would be (connected). An agent not in it may be ringing from the first invite,
// or the first was never sent: the invite goes again, and a refusal of it is not taken as the
// attempt's failure (send).
func (m *Machine) inviteTookEffect(ctx context.Context, c Call, cmd Command, log *zap.Logger) (done, known bool) {
	ps, err := m.participants(ctx, c.ID)
	if errors.Is(err, graph.ErrCallGone) {
		m.Handle(ctx, c.Tenant, graph.CallKey(c.ID), Event{Kind: EvEnded, Reason: "call gone"})
		return true, true
	}
	if peerToPeer(err) {
		return false, true // still the caller and callbot alone: the agent has not joined
	}
	if err != nil {
		log.Warn("cannot read the call's participants from Graph; not inviting again (the invite's timer settles it)", zap.Error(err))
		return true, false
	}
	ev := rosterEvent(ps)
	if !slices.Contains(ev.Participants, strings.ToLower(cmd.Target.ID)) {
		return false, true
	}
	if _, err := m.Handle(ctx, c.Tenant, graph.CallKey(c.ID), ev); err != nil {
		log.Warn("apply the participants read from Graph", zap.Error(err))
	}
	return true, true
}

// peerToPeer reports whether Graph refused to list a call's participants as it does for a
// peer-to-peer call (documented as unsupported; its answer is a 400, or a 405): a call an invited
// agent joined has three parties and is a group call, so the agent is not in it.
func peerToPeer(err error) bool {
	var ge *graph.Error
	return errors.Is(err, errNoRoster) || errors.As(err, &ge) && (ge.Status == 400 || ge.Status == 405)
}

// errNoRoster: Graph answered 404 for the call's participants while it still has the call
// (participants).
var errNoRoster = errors.New("the call's participants are not found, the call is")

// participants reads the call's roster from Graph. A 404 for the roster alone is not the call
// gone: Graph documents no answer for the participants of a peer-to-peer call (graphsim refuses
// with 400), and a 404 there ended the record of a live call, its caller left in a call nobody
// served. The call itself is read to tell: still there, the roster is unlisted (errNoRoster,
// which peerToPeer takes for the caller and callbot alone); gone too, the 404 stands.
func (m *Machine) participants(ctx context.Context, callID string) ([]graph.Participant, error) {
	ps, err := m.cfg.Control.Participants(ctx, callID)
	if !errors.Is(err, graph.ErrCallGone) {
		return ps, err
	}
	switch _, gerr := m.cfg.Control.GetCall(ctx, callID); {
	case gerr == nil:
		return nil, fmt.Errorf("%w (%v)", errNoRoster, err) // not the 404 itself: not ErrCallGone
	case errors.Is(gerr, graph.ErrCallGone):
		return nil, err
	default:
		return nil, gerr // not known: as any failed read
	}
}

// definitive reports whether a failed Graph request certainly did not act (refused, or not
// processed), as opposed to an ambiguous failure (timeout, 5xx) that may have taken effect.
func definitive(err error) bool {
	o := graph.Classify(err)
	return o == graph.Refused || o == graph.NotProcessed
}

// RunTimers claims due timers and applies them until ctx ends. A batch claimed is applied even
// if ctx ends meanwhile (a shutdown), within the claim's lease: left claimed, its timers would
// fire, on another instance, only once the claim ran out, a lease late (an answer check past
// Graph's answer deadline).
func (m *Machine) RunTimers(ctx context.Context, every time.Duration) {
	repeat(ctx, cmp.Or(every, 100*time.Millisecond), false, func() {
		for ctx.Err() == nil {
			if m.fireTimers(ctx) < 100 {
				break
			}
		}
	})
}

// fireTimers claims up to 100 due timers and applies them, on a context that outlives ctx by at
// most the claim's lease; it returns how many it claimed.
func (m *Machine) fireTimers(ctx context.Context) int {
	if m.cutOff() {
		return 0 // the instances that reach Graph fire them
	}
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.cfg.OutboxLease)
	defer cancel()
	due, err := m.cfg.Timers.Claim(wctx, m.cfg.Now(), m.cfg.OutboxLease, 100)
	if err != nil {
		m.cfg.Log.Warn("claim timers", zap.Error(err))
		return 0
	}
	for _, tm := range due {
		_, err := m.Handle(wctx, tm.Tenant, tm.Call, Event{Kind: EvTimeout, Timer: tm.Kind, TimerToken: tm.Token})
		var broken *TransitionError
		switch {
		case errors.As(err, &broken):
			// A bug, never input: the same record decides the same, so left in the set the timer
			// would be claimed and refused again every lease, for ever. It goes, and its call is
			// given up on where nothing else may move it on.
			m.cfg.Log.Error("timer refused by the transition table (a bug): removed", zap.String("call_id", tm.Call),
				zap.String("tenant_id", tm.Tenant), zap.String("timer", string(tm.Kind)), zap.Stringer("state", broken.From), zap.Error(err))
			m.giveUp(tm.Tenant, tm.Call, broken.From)
		case err != nil:
			m.cfg.Log.Warn("timer not applied, retried after its lease", zap.String("call_id", tm.Call), zap.Error(err))
			continue
		}
		_ = m.cfg.Timers.Done(wctx, tm)
	}
	return len(due)
}

// giveUp follows a timer the transition table refused (a bug) in state from: without it, a call
// in a state only Graph's notifications move it out of (EvAbort's rows: answering, transferring,
// inviting, connected) may stay there for ever, a lost notification no longer guarded against
// (the reconciler does not help: it ends only calls Graph no longer has, and keeps the others
// alive). A caller in the menu or a queue is left there: their keys or the dispatcher still move
// them on. callbot asks Graph, on the call's executor (off the timer loop): a call it no longer
// has is ended (but for a transfer, most likely completed: left to its terminated notification,
// as checkCall leaves it, or the reconciler); one it has established with the caller alone with callbot is hung up (EvAbort),
// unless the record changed while Graph was read (the agent answered their invite meanwhile);
// one with others in it (the caller talking to an agent), or not established (still ringing in,
// being transferred), or that cannot be read, is left to its notifications and to the caller,
// never hung up. Not durable: an instance that dies first leaves the call as it was, as the
// error logged and callbot_invalid_transitions_total tell.
func (m *Machine) giveUp(tenant, key string, from State) {
	log := m.cfg.Log.With(zap.String("call_id", key), zap.String("tenant_id", tenant), zap.Stringer("state", from))
	if !handles(from, EvAbort) {
		// the menu, a queue (the caller's keys or the dispatcher still move it on), terminating
		// (callbot hung up already; the reconciler ends the call once Graph no longer has it)
		log.Warn("call left where the timer the table refused found it: something else still moves it on")
		return
	}
	m.exec.do(key, func() {
		ctx := context.Background()
		c, err := m.cfg.Store.Get(ctx, key)
		switch {
		case errors.Is(err, ErrNotFound):
			return
		case err != nil:
			log.Error("call left where a timer the table refused found it: its record could not be read", zap.Error(err))
			return
		case c.State != from:
			return // moved on since
		}
		gctx, cancel := context.WithTimeout(graph.WithTenantID(graph.WithScenarioID(ctx, c.Scenario), c.Tenant), m.cfg.CommandTimeout)
		defer cancel()
		st, err := m.cfg.Control.GetCall(gctx, c.ID)
		ev := Event{Kind: EvAbort, Version: c.Version} // only this version: see EvAbort
		switch {
		case errors.Is(err, graph.ErrCallGone) && c.State == StateTransferring:
			// most likely transferred (callbot's leg ends when the target takes the caller), the
			// terminated notification lost or late: ended now as a caller gone, the agent would be
			// free at once, in the middle of the conversation. As checkCall: left to that
			// notification, or the reconciler.
			log.Error("call left where a timer the table refused found it: gone from Graph during a transfer; waiting for its terminated notification")
			return
		case errors.Is(err, graph.ErrCallGone):
			ev = Event{Kind: EvEnded, Reason: ReasonGone}
		case err != nil:
			log.Error("call left where a timer the table refused found it: Graph could not be read", zap.Error(err))
			return
		case st != graph.CallEstablished:
			log.Error("call left where a timer the table refused found it: not established in Graph", zap.String("graph_state", string(st)))
			return
		default:
			ps, err := m.participants(gctx, c.ID)
			switch {
			case peerToPeer(err): // the caller and callbot alone
			case errors.Is(err, graph.ErrCallGone):
				ev = Event{Kind: EvEnded, Reason: ReasonGone}
			case err != nil:
				log.Error("call left where a timer the table refused found it: its participants could not be read", zap.Error(err))
				return
			case people(ps) > 1:
				log.Error("call left where a timer the table refused found it: others are in it with the caller", zap.Int("participants", len(ps)))
				return
			}
		}
		if ok, err := m.Handle(ctx, tenant, key, ev); err != nil {
			log.Error("give up on a call a timer the table refused left", zap.Error(err))
		} else if ok {
			log.Warn("call a timer the table refused left given up on", zap.Stringer("event", ev.Kind))
		}
	})
}

// Offer hands a caller the dispatcher took from a queue to an agent it reserved. It returns
// false when the call is no longer waiting (it ended meanwhile): the reservation must be undone.
func (m *Machine) Offer(ctx context.Context, tenant, callKey, agent string) (bool, error) {
	return m.OfferFrom(ctx, tenant, "", callKey, agent)
}

// OfferFrom is Offer of a caller the dispatcher took from queue: false too when the caller waits
// in another queue now (the entry was one left behind in a queue they moved on from).
func (m *Machine) OfferFrom(ctx context.Context, tenant, queue, callKey, agent string) (bool, error) {
	return m.Handle(ctx, tenant, callKey, Event{Kind: EvAgentOffer, Agent: agent, OfferQueue: queue})
}

// Offered reports whether the stored call has been offered to agent (it left the queue for them).
func (m *Machine) Offered(ctx context.Context, tenant, callKey, agent string) (bool, error) {
	m.cache.drop(callKey)
	c, err := m.cfg.Store.Get(ctx, callKey)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return withAgent(c, agent), nil
}

// withAgent reports whether c has been offered to agent and is with them: it left the queue for
// them and has not ended.
func withAgent(c Call, agent string) bool {
	return c.Agent == agent && c.State != StateQueued && !c.State.Terminal()
}

// OfferCheck is what a call's record shows of an offer whose save returned an error
// (Machine.CheckOffer).
type OfferCheck struct {
	// Took: the record on the master has the offer (the call is with the agent, neither queued
	// nor ended).
	Took bool
	// Replicated: the replicas the store waits for have everything the master has, the offer
	// included (Store.Sync); always so when the store waits for none. An offer that took and is
	// not replicated is the master's alone: a failover now loses it, putting the record back in
	// the queue while the caller is in none and the agent stays reserved for them (OfferFate).
	Replicated bool
	// Offers is the record's count of transfer attempts, the offer's included: a record read
	// later that counts fewer has lost the offer.
	Offers int
	// Queue and QueueScore are the queue the offer took the caller from and their place in it:
	// a record that lost the offer waits there again, unless the caller has moved on since.
	Queue      string
	QueueScore int64
	// Waiting: the record shows the caller waiting in Queue (queued). A reservation whose offer
	// did not apply puts the caller back only then: one who has hung up, or moved on to a menu
	// or another queue, would be a ghost entry there.
	Waiting bool
	// Agent is whom the offer was made to: a record read later that shows the call neither
	// queued nor with them is past the offer, and their reservation for it is stale.
	Agent string
}

// CheckOffer reads the record of a call whose offer to agent returned an error (the save's
// answer lost, or the save refused as unreplicated): whether the offer took, and if so whether
// the replicas have it.
func (m *Machine) CheckOffer(ctx context.Context, tenant, callKey, agent string) (OfferCheck, error) {
	m.cache.drop(callKey)
	c, err := m.cfg.Store.Get(ctx, callKey)
	if errors.Is(err, ErrNotFound) {
		return OfferCheck{}, nil
	}
	if err != nil {
		return OfferCheck{}, err
	}
	oc := OfferCheck{Took: withAgent(c, agent), Offers: c.Offers,
		Queue: c.Queue, QueueScore: c.QueueScore, Waiting: c.State == StateQueued, Agent: agent}
	if oc.Took {
		oc.Replicated = m.cfg.Store.Sync(ctx, callKey) == nil
	}
	return oc, nil
}

// OfferFate is what a later read of its call's record shows of an offer that took on the master
// but was not replicated (OfferCheck): kept, lost with a failover, or not known yet.
type OfferFate uint8

// Offer fates.
const (
	// OfferUnsettled: the record still shows the offer and the replicas have not confirmed it, or
	// the record could not be read: look again later.
	OfferUnsettled OfferFate = iota
	// OfferKept: the replicas have the offer, or the call is somewhere the follow-up has no
	// business with (with an agent, in a menu); whatever comes next is the machine's, or the
	// reconciler's.
	OfferKept
	// OfferLost: a failover lost the offer and the call waits in the queue again in its record
	// (fewer transfer attempts than the offer made, the same queue and place): the caller, whom
	// the reservation took out of the queue, must be put back at their place, and the agent,
	// still reserved for them, freed.
	OfferLost
	// OfferLostEnded: the offer was lost and the call has ended since, or its record is gone:
	// only the agent is to be freed.
	OfferLostEnded
	// OfferPassed: the call is past the offer, neither queued nor with its agent (back in a menu,
	// where a failover took the record; with another agent, offered again after a failover lost
	// this offer or after its transfer failed; ended with another), or queued elsewhere than the
	// offer took it from without the offer's attempt (lost, and moved on since to another queue
	// at the caller's max wait, or queued again from the menu): nothing will free the agent
	// if they are still reserved for it but the reconciler (up to 5 minutes), so the follow-up
	// does, and leaves the caller alone. Not counted as lost: a failed transfer gets there too.
	// A record that counts the offer's transfer attempt is taken as past it only once the
	// replicas have it (until then the offer may yet be lost: unsettled).
	OfferPassed
)

var offerFates = [...]string{"unsettled", "kept", "lost", "lost_ended", "passed"}

func (f OfferFate) String() string {
	if int(f) < len(offerFates) {
		return offerFates[f]
	}
	return "fate?"
}

// OfferFate reads again the record of a call whose offer took on the master without being
// replicated; offer is its OfferCheck. The count of transfer attempts tells a lost offer from
// one that took and failed since: a failed transfer also puts the call back in the queue (the
// machine requeues the caller and frees the agent itself), but with the attempt counted, while a
// record a failover took back to before the offer counts one attempt fewer. A record that shows
// the offer, or anything after it, settles once the replicas have it (Store.Sync covers
// everything the master has). A record that lost the offer and has moved on since (the caller's
// max wait passed them on to another queue, or the flow lost their queue) is the machine's: the
// caller is not put back where the offer took them from, and the agent is freed (OfferPassed).
func (m *Machine) OfferFate(ctx context.Context, tenant, callKey string, offer OfferCheck) (OfferFate, error) {
	offers := offer.Offers
	m.cache.drop(callKey)
	c, err := m.cfg.Store.Get(ctx, callKey)
	switch {
	case errors.Is(err, ErrNotFound):
		return OfferLostEnded, nil
	case err != nil:
		return OfferUnsettled, err
	case c.Offers < offers && c.State == StateQueued && c.Queue == offer.Queue && c.QueueScore == offer.QueueScore:
		return OfferLost, nil
	case c.Offers < offers && c.State.Terminal():
		return OfferLostEnded, nil
	case offer.Agent != "" && c.Agent != offer.Agent && (c.State != StateQueued || c.Offers < offers):
		// The transfer attempts counted cannot tell: a failover that lost the offer and a later
		// offer of the caller (put back by a ghost entry, or queued again from the menu) count
		// as many. Not while the record is queued with the attempt counted: the offer's agent,
		// freed by the machine when the transfer failed, may be reserved for the call again and
		// about to offer it (another instance). A record queued without it (the offer lost, the
		// caller passed on to another queue at their max wait since, or queued again from the
		// menu) is past it too: the lost offer's reservation, which nothing else released, holds
		// the agent for a caller who is not with them (left to the reconciler, up to 5 minutes);
		// another agent reserved for the caller meanwhile is not touched. A record that counts
		// the offer's attempt may have gone past it on the master alone (its transfer failed,
		// the caller offered to another agent, while the replicas stalled): it settles only once
		// the replicas have it, as one that shows the offer does, or a failover that then takes
		// the record back to before the offer finds the follow-up gone (the caller in no queue,
		// the agent reserved for them, until the reconciler).
		if c.Offers >= offers {
			if err := m.cfg.Store.Sync(ctx, callKey); err != nil {
				return OfferUnsettled, err
			}
		}
		return OfferPassed, nil
	case c.Offers < offers:
		// with the offer's agent (an earlier offer to them, which a failover took the record
		// back to): theirs
		return OfferKept, nil
	}
	if err := m.cfg.Store.Sync(ctx, callKey); err != nil {
		return OfferUnsettled, err
	}
	return OfferKept, nil
}

// Wait blocks until every queued Graph command has run (used at shutdown and in tests).
func (m *Machine) Wait() { m.exec.wait() }

// serial runs functions one at a time per key, in the order their places were taken, each key
// on its own goroutine while it has work. A place can be taken before its function is known
// (reserve, then fill): the machine takes one before the save that decides a call's Graph
// commands, so that a transition saved after it (the dispatcher's offer, woken the moment the
// caller is visible in the queue) queues its commands behind them even if it is quicker to carry
// them out. A key whose next place is still empty waits without a goroutine.
//
// A goroutine whose key runs dry waits up to workerIdle for another key before it exits: a Graph
// request grows a deep stack (kiota, TLS), and a new goroutine per call would grow it again
// every time (runtime.copystack was 6% of callbot's CPU under load).
type serial struct {
	mu sync.Mutex
	q  map[string]*lane
	// busy counts places not yet run or given up, under mu; done is signalled when it falls to
	// zero. Not a sync.WaitGroup: wait may be called while new places are taken (a test waits
	// while timers fire), which a WaitGroup forbids when its counter is at zero.
	busy int
	done *sync.Cond
	idle chan string // a key handed to a goroutine that waits for work

	started atomic.Int64 // goroutines started, for tests
}

// lane is one key's places in order; running: a goroutine is draining it. mootBefore: media
// commands decided before this record version need not be sent (see Machine.queueGraph).
type lane struct {
	places     []*place
	running    bool
	mootBefore int64
}

// place is a position in a key's order. ready: fill was called; f may be nil (given up).
type place struct {
	f     func()
	ready bool
}

// workerIdle is how long a goroutine of serial waits for another key before it exits.
const workerIdle = 10 * time.Second

// do runs f after everything queued or reserved on key so far.
func (s *serial) do(key string, f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.take(key).fill(f)
	s.kick(key)
}

// reserve takes key's next place; the caller must fill it, with nil to give it up.
func (s *serial) reserve(key string) *place {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.take(key)
}

// fill gives a reserved place its function; nil gives the place up, and what follows it on key
// runs without waiting for it.
func (s *serial) fill(key string, p *place, f func()) {
	if p == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p.fill(f)
	if f == nil {
		l := s.q[key]
		if i := slices.Index(l.places, p); i >= 0 && !(i == 0 && l.running) {
			l.places = slices.Delete(l.places, i, i+1)
			s.release()
		}
		if len(l.places) == 0 && !l.running {
			delete(s.q, key)
			return
		}
	}
	s.kick(key)
}

func (p *place) fill(f func()) { p.f, p.ready = f, true }

// supersede records, while key has places, that media commands decided before version are moot.
func (s *serial) supersede(key string, version int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if l := s.q[key]; l != nil {
		l.mootBefore = max(l.mootBefore, version)
	}
}

// superseded reports whether a media command decided by version is moot (supersede).
func (s *serial) superseded(key string, version int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.q[key]
	return l != nil && version < l.mootBefore
}

// take appends an empty place to key's lane and returns it. s.mu is held.
func (s *serial) take(key string) *place {
	if s.q == nil {
		s.q = map[string]*lane{}
		s.idle = make(chan string)
		s.done = sync.NewCond(&s.mu)
	}
	l := s.q[key]
	if l == nil {
		l = &lane{}
		s.q[key] = l
	}
	p := &place{}
	l.places = append(l.places, p)
	s.busy++
	return p
}

// kick puts a goroutine on key if none runs and its next place is ready. s.mu is held.
func (s *serial) kick(key string) {
	l := s.q[key]
	if l == nil || l.running || len(l.places) == 0 || !l.places[0].ready {
		return
	}
	l.running = true
	select {
	case s.idle <- key: // a waiting goroutine takes it
	default:
		s.started.Add(1)
		go s.worker(key)
	}
}

func (s *serial) worker(key string) {
	t := time.NewTimer(workerIdle)
	defer t.Stop()
	for {
		s.drain(key)
		t.Reset(workerIdle)
		select {
		case key = <-s.idle:
		case <-t.C:
			return
		}
	}
}

// drain runs key's functions until its lane is empty or its next place is not filled yet.
func (s *serial) drain(key string) {
	ran := false
	for {
		s.mu.Lock()
		if ran {
			// released under mu: a waiter then sees the lane as this step leaves it (gone if empty)
			s.release()
			ran = false
		}
		l := s.q[key]
		if len(l.places) == 0 {
			delete(s.q, key)
			s.mu.Unlock()
			return
		}
		p := l.places[0]
		if !p.ready {
			l.running = false // fill kicks the lane again
			s.mu.Unlock()
			return
		}
		l.places[0] = nil
		l.places = l.places[1:]
		s.mu.Unlock()
		if p.f != nil {
			p.f()
		}
		ran = true
	}
}

// release counts one place run or given up. s.mu is held.
func (s *serial) release() {
	if s.busy--; s.busy == 0 {
		s.done.Broadcast()
	}
}

// wait returns once no place is left to run. Places taken meanwhile are waited for too.
func (s *serial) wait() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for s.busy > 0 {
		s.done.Wait()
	}
}

// keepAliveAfter: Graph ends a call that has had no keepAlive for 45 minutes; callbot sends one
// for every call older than this on each reconciliation pass.
const keepAliveAfter = 15 * time.Minute

// reconcilePage is how many live calls one read of the live-call set returns.
const reconcilePage = 1000

// reconcileParallel is how many calls a pass checks at once, each a record read and a Graph
// request (a GET, or a keepAlive). One at a time, a pass over 10,000 live calls took 10,000
// Graph round trips end to end (500 s at 50 ms each), longer than the interval between passes.
// 16 at 50 ms are 320 requests/s, about a tenth of what Graph allows an app per tenant for calls
// (50,000 requests per 15 s).
const reconcileParallel = 16

// Reconcile walks every live call older than a minute once: records that ended or expired
// leave the set; a call Graph no longer knows (404) is ended and counted in Closed; a call
// older than 15 minutes gets a keepAlive (but one callbot is hanging up); a queued caller is
// put back in its queue if a failure took it out. reconcileParallel calls are checked at once.
// Then agent reservations whose call ended or moved on are released, and queue entries whose
// call ended are removed (sweepGhosts). Run at start-up it picks up calls whose instance
// vanished. A record Redis does not give stops the pass (the others would fail as well).
func (m *Machine) Reconcile(ctx context.Context) error {
	start := time.Now()
	now := m.cfg.Now()
	keys, err := m.liveCalls(ctx, now.Add(-time.Minute)) // a newer call is still being set up
	if err != nil {
		return fmt.Errorf("reconcile: %w", err)
	}
	var (
		mu      sync.Mutex
		checked int64
		tenants = map[string]bool{}
		live    = map[string]bool{} // calls read live on this pass: their queue entries need no second read
		failed  error
	)
	for _, t := range m.cfg.Tenants {
		tenants[t] = true
	}
	work := make(chan string)
	var wg sync.WaitGroup
	for range min(reconcileParallel, len(keys)) {
		wg.Go(func() {
			for key := range work {
				tenant, isLive, err := m.reconcileCall(ctx, key, now)
				mu.Lock()
				switch {
				case err != nil && failed == nil:
					failed = err
				case err == nil:
					m.ReconcileChecked.Add(1)
					checked++
					if tenant != "" {
						tenants[tenant] = true
					}
					if isLive {
						live[key] = true
					}
				}
				mu.Unlock()
			}
		})
	}
	for _, key := range keys {
		mu.Lock()
		stop := failed != nil
		mu.Unlock()
		if stop || ctx.Err() != nil {
			break
		}
		work <- key
	}
	close(work)
	wg.Wait()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if failed != nil {
		return fmt.Errorf("reconcile: %w", failed)
	}
	for tenant := range tenants {
		m.releaseStale(ctx, tenant)
		m.sweepGhosts(ctx, tenant, live)
	}
	m.ReconcileLastPass.Store(int64(time.Since(start)))
	m.ReconcileLastCalls.Store(checked)
	m.ReconcilePasses.Add(1) // last: a reader that sees the pass counted sees its figures
	return nil
}

// liveCalls reads every call in the live-call set created before before, oldest first, a page
// at a time (a call that ends between two reads shifts the next page by one: the call it skips
// is read on the next pass).
func (m *Machine) liveCalls(ctx context.Context, before time.Time) ([]string, error) {
	var keys []string
	seen := map[string]bool{}
	for offset := int64(0); ; offset += reconcilePage {
		page, err := m.cfg.Store.LivePage(ctx, before, offset, reconcilePage)
		if err != nil {
			return nil, err
		}
		for _, k := range page {
			if !seen[k] {
				seen[k] = true
				keys = append(keys, k)
			}
		}
		if len(page) < reconcilePage {
			return keys, nil
		}
	}
}

// reconcileCall checks one live call for Reconcile: the call's tenant ("" without a record),
// whether Graph has it still, and the error that stops the pass (Redis refusing the read).
func (m *Machine) reconcileCall(ctx context.Context, key string, now time.Time) (tenant string, live bool, err error) {
	c, err := m.cfg.Store.Get(ctx, key)
	if errors.Is(err, ErrNotFound) || err == nil && c.State.Terminal() {
		m.cfg.Store.Forget(ctx, key)
		return "", false, nil
	}
	if err != nil {
		return "", false, err
	}
	cctx, cancel := context.WithTimeout(graph.WithTenantID(graph.WithScenarioID(ctx, c.Scenario), c.Tenant), m.cfg.CommandTimeout)
	keepAlive := now.Sub(c.CreatedAt) > keepAliveAfter && c.State != StateTerminating
	if keepAlive {
		// not a call callbot is hanging up (its hangups refused or failing): Graph's drop of
		// a call without keepAlive, 45 minutes on, is the backstop that ends it
		err = m.cfg.Control.KeepAlive(cctx, c.ID)
	} else {
		_, err = m.cfg.Control.GetCall(cctx, c.ID)
	}
	cancel()
	switch {
	case errors.Is(err, graph.ErrCallGone):
		if ok, _ := m.Handle(ctx, c.Tenant, key, Event{Kind: EvEnded, Reason: ReasonGone}); ok {
			m.Closed.Add(1)
			m.cfg.Log.Info("call gone from Graph closed", zap.String("call_id", key), zap.Stringer("state", c.State))
		}
		return c.Tenant, false, nil
	case err != nil:
		if keepAlive {
			m.KeepAliveFailures.Add(1)
		}
		m.cfg.Log.Warn("reconcile call", zap.String("call_id", key), zap.Bool("keep_alive", keepAlive), zap.Error(err))
	case keepAlive:
		m.KeepAlives.Add(1)
	}
	if f := m.flow.Load(); c.State == StateQueued && c.Queue != "" && f != nil && f.Queues[c.Queue] != nil {
		// idempotent: a caller a failed offer took out of the queue is back at its place.
		// Not in a queue the flow lacks: a removed one (no dispatcher serves it, and the
		// caller is on their way to the start menu: queueGone) or a newer flow's, which an
		// updated instance's pass puts them back in.
		if err := m.cfg.Queues.Enqueue(ctx, c.Tenant, c.Queue, key, c.QueueScore); err != nil {
			m.cfg.Log.Warn("reconcile queue", zap.String("call_id", key), zap.Error(err))
		}
	}
	return c.Tenant, true, nil
}

// sweepBatch is how many call records sweepGhosts reads in one round trip.
const sweepBatch = 500

// sweepGhosts removes from the tenant's queues the entries of callers whose call ended, or whose
// record is gone (expired, lost with Redis data): ghosts, which a queue write behind a save that
// lost its race, or the dispatcher's undo of a failed offer, can leave when the call ends at that
// moment. A ghost otherwise stays until an agent is free to be reserved for it (the offer is
// refused), counted among the callers waiting meanwhile. Only those entries are removed: a
// caller in any other state may be put back at the same score at any moment (a failed
// transfer), and taking one out would lose their place. An ended call never waits again, so its
// entry is removed only while it is still there with the score read first: one put back since
// stays. live holds the calls this pass read and found live: their entries are kept unread.
//
// The queues swept are those of the flow and every other the tenant has (KnownQueues): one a
// flow edit removed or renamed, whose ghosts no dispatcher reserves and no flow names (left, they
// stayed in Redis for good), or, in a rolling update, one of a newer or older flow than this
// instance's. The rule is the same there: a caller waiting in such a queue by their record
// stays (an instance whose flow has the queue serves them, or a newer flow's sends them back to
// the start menu).
func (m *Machine) sweepGhosts(ctx context.Context, tenant string, live map[string]bool) {
	qs, ok := m.cfg.Queues.(QueueSweeper)
	if !ok {
		return
	}
	var queues []string
	if flow := m.flow.Load(); flow != nil {
		queues = slices.Collect(maps.Keys(flow.Queues))
	}
	known, err := qs.KnownQueues(ctx, tenant)
	if err != nil {
		m.cfg.Log.Warn("sweep queues: the queues not in the flow are not swept", zap.String("tenant_id", tenant), zap.Error(err))
	}
	queues = append(queues, known...)
	slices.Sort(queues)
	queues = slices.Compact(queues)
	if len(queues) == 0 {
		return
	}
	// the entries first, then the records: a record read after its entry was, so an entry whose
	// record is found ended (or gone) was there, at that score, while the call had ended
	entries, err := qs.Entries(ctx, tenant, queues)
	if err != nil {
		m.cfg.Log.Warn("sweep queues", zap.String("tenant_id", tenant), zap.Error(err))
		return
	}
	seen := map[string]bool{}
	var keys []string
	for _, es := range entries {
		for _, e := range es {
			if !live[e.Call] && !seen[e.Call] {
				seen[e.Call] = true
				keys = append(keys, e.Call)
			}
		}
	}
	ended := map[string]bool{}
	for chunk := range slices.Chunk(keys, sweepBatch) {
		got, err := m.cfg.Store.Ended(ctx, chunk)
		if err != nil {
			m.cfg.Log.Warn("sweep queues: read calls", zap.String("tenant_id", tenant), zap.Error(err))
			return
		}
		for i, k := range chunk {
			if got[i] {
				ended[k] = true
			}
		}
	}
	if len(ended) == 0 {
		return
	}
	for _, q := range slices.Sorted(maps.Keys(entries)) {
		var ghosts []QueueEntry
		for _, e := range entries[q] {
			if ended[e.Call] {
				ghosts = append(ghosts, e)
			}
		}
		if len(ghosts) == 0 {
			continue
		}
		n, err := qs.RemoveEntries(ctx, tenant, q, ghosts)
		if err != nil {
			m.cfg.Log.Warn("sweep queue", zap.String("tenant_id", tenant), zap.String("queue", q), zap.Error(err))
		}
		if n > 0 {
			m.Ghosts.Add(int64(n))
			inFlow := false
			if flow := m.flow.Load(); flow != nil {
				inFlow = flow.Queues[q] != nil
			}
			m.cfg.Log.Info("callers whose call ended removed from a queue", zap.String("tenant_id", tenant), zap.String("queue", q),
				zap.Bool("queue_in_flow", inFlow), zap.Int("removed", n))
		}
	}
}

// releaseStale frees agents reserved for a call that ended, or that is with another agent, or
// that has been queued since the previous pass (its offer was lost between the reservation and
// the call's change); not one whose release the call's outbox still holds.
func (m *Machine) releaseStale(ctx context.Context, tenant string) {
	res, err := m.cfg.Queues.Reservations(ctx, tenant)
	if err != nil {
		m.cfg.Log.Warn("reconcile reservations", zap.Error(err))
		return
	}
	suspect := map[[2]string]string{}
	for agent, key := range res {
		c, err := m.cfg.Store.Get(ctx, key)
		stale := false
		switch {
		case errors.Is(err, ErrNotFound):
			stale = true
		case err != nil:
			continue
		case c.State == StateQueued,
			// its release is on its way, with its outcome (an ended call's goes with the next
			// batch of acknowledgements, after the save; the outbox's re-drive if this instance
			// dies): freed now as abandoned, a transferred caller's agent was offered the next
			// caller mid-conversation, their connected guard never set. Still there at the next
			// pass, the outbox was never re-driven (its index entry lost with Redis data): freed then.
			slices.ContainsFunc(c.Outbox, func(p Pending) bool { return p.Cmd.Kind == CmdReleaseAgent && p.Cmd.Agent == agent }):
			m.mu.Lock()
			was := m.suspect[[2]string{tenant, agent}]
			m.mu.Unlock()
			if was == key {
				stale = true
			} else {
				suspect[[2]string{tenant, agent}] = key
			}
		case c.State.Terminal(), c.Agent != agent:
			stale = true
		}
		if stale {
			m.cfg.Log.Info("stale agent reservation released", zap.String("agent", agent), zap.String("call_id", key))
			m.cfg.Queues.Release(ctx, tenant, agent, key, AgentAbandoned, 0)
		}
	}
	m.mu.Lock()
	maps.DeleteFunc(m.suspect, func(k [2]string, _ string) bool { return k[0] == tenant })
	if m.suspect == nil {
		m.suspect = suspect
	} else {
		maps.Copy(m.suspect, suspect)
	}
	m.mu.Unlock()
}

// RunReconcile reconciles at once and then every interval until ctx ends. Among instances,
// the one holding the reconciler's lease in Redis does the pass (holder names this instance).
// An instance without the lease asks for it every tenth of the interval (30 s at most), so a
// lease handed back at shutdown is taken within that: in a rolling update the instance that
// replaces a stopped one started before it stopped, and its start-up pass found the lease held.
// The lease is renewed every tick while a pass runs.
func (m *Machine) RunReconcile(ctx context.Context, every time.Duration, holder string) {
	var last time.Time // this instance's last pass
	tick := max(min(every/10, 30*time.Second), time.Millisecond)
	repeat(ctx, tick, true, func() {
		// half a tick of slack: the tick that comes an interval after the last pass is the next
		// pass (measured strictly, it came a hair early and the pass waited one more tick)
		if !last.IsZero() && time.Since(last) < every-tick/2 {
			return
		}
		if m.cutOff() {
			return // each call it would read from Graph, and keep alive, waits in vain here
		}
		held, err := m.cfg.Store.TryLease(ctx, "reconcile", holder, every+every/2)
		if err != nil || !held {
			return
		}
		last = time.Now()
		pctx, cancel := context.WithCancel(ctx)
		renewed := make(chan struct{})
		go func() {
			// a pass may outlast the lease (many live calls, a slow Graph): it is renewed every
			// tick meanwhile, and the pass stops if another instance has it (it lapsed while Redis
			// did not answer), which makes its own
			defer close(renewed)
			t := time.NewTicker(tick)
			defer t.Stop()
			for {
				select {
				case <-pctx.Done():
					return
				case <-t.C:
				}
				if held, err := m.cfg.Store.TryLease(pctx, "reconcile", holder, every+every/2); err == nil && !held {
					m.cfg.Log.Warn("reconciler's lease taken by another instance during the pass: pass stopped")
					cancel()
					return
				}
			}
		}()
		err = m.Reconcile(pctx)
		cancel()
		<-renewed
		if err != nil && pctx.Err() == nil {
			m.cfg.Log.Warn("reconcile", zap.Error(err))
		}
	})
}
