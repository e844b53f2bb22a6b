package callstate

// Transition is one legal move of the state machine: a call in From that sees On may go To.
type Transition struct {
	From State
	On   EventKind
	To   State
}

// Transitions is every legal move. An event with no row for the call's current state is
// ignored: Graph repeats and reorders notifications, and late ones must change nothing.
// EvEnded from any non-terminal state is added by legal(); terminated stays terminated.
var Transitions = []Transition{
	{StateNone, EvIncoming, StateAnswering},
	{StateNone, EvAdopt, StateInMenu}, // a call whose record was lost: its caller starts the menu again

	{StateAnswering, EvEstablished, StateInMenu},
	{StateAnswering, EvCommandFailed, StateTerminated}, // answer refused by Graph
	{StateAnswering, EvTimeout, StateAnswering},        // no established yet: ask Graph
	{StateAnswering, EvCallState, StateInMenu},         // Graph has it established: the notification was lost
	{StateAnswering, EvCallState, StateAnswering},      // Graph still has it incoming: the answer did not reach it

	{StateInMenu, EvPromptDone, StateInMenu}, // menu prompt over: no-input timer starts
	{StateInMenu, EvTone, StateInMenu},       // invalid key, replay; or a submenu
	{StateInMenu, EvTone, StateQueued},
	{StateInMenu, EvTone, StateTransferring},
	{StateInMenu, EvTone, StateTerminating},
	{StateInMenu, EvTimeout, StateInMenu}, // no input, replay
	{StateInMenu, EvTimeout, StateQueued}, // no input, fallback
	{StateInMenu, EvTimeout, StateTransferring},
	{StateInMenu, EvTimeout, StateTerminating},

	{StateQueued, EvPromptDone, StateQueued}, // hold music loops
	{StateQueued, EvAgentOffer, StateTransferring},
	{StateQueued, EvAgentOffer, StateInviting}, // conference hand-off
	{StateQueued, EvTimeout, StateQueued},      // max wait: another queue; hold music again
	{StateQueued, EvTimeout, StateTransferring},
	{StateQueued, EvTimeout, StateTerminating},
	{StateQueued, EvTimeout, StateInMenu},    // the flow no longer has the queue: back to the start menu
	{StateQueued, EvPromptDone, StateInMenu}, // likewise

	{StateTransferring, EvTransferFailed, StateTransferring}, // a failure notification: ask Graph first
	{StateTransferring, EvTransferAccepted, StateTransferring},
	{StateTransferring, EvTransferFailed, StateQueued},      // back to the head of the queue
	{StateTransferring, EvTransferFailed, StateInMenu},      // a direct transfer from the menu failed
	{StateTransferring, EvTransferFailed, StateTerminating}, // ... again, no key pressed since: goodbye
	{StateTransferring, EvTimeout, StateTransferring},       // no outcome from Graph in time: ask Graph
	{StateTransferring, EvCallState, StateQueued},           // Graph has it established again: the transfer failed
	{StateTransferring, EvCallState, StateInMenu},
	{StateTransferring, EvCallState, StateTerminating},
	{StateTransferring, EvCallState, StateTransferring},    // a failure not known to be this attempt's: look again soon
	{StateTransferring, EvTransferring, StateTransferring}, // Graph took the current attempt

	{StateInviting, EvPromptDone, StateInviting},  // hold music loops while the agent rings
	{StateInviting, EvInviteDone, StateConnected}, // the agent joined
	{StateInviting, EvInviteDone, StateInviting},  // the agent did not: read the roster to be sure
	{StateInviting, EvTimeout, StateInviting},     // hold music again; no outcome in time: read the roster
	{StateInviting, EvTimeout, StateQueued},       // no outcome, and the roster could not be read
	{StateInviting, EvRoster, StateConnected},     // the roster shows the agent: joined, whatever the invite's completion says
	{StateInviting, EvRoster, StateQueued},        // the roster read confirms a failure: back to the head of the queue
	{StateConnected, EvRoster, StateConnected},    // someone joined or left; the agent is still there
	{StateConnected, EvRoster, StateTerminating},  // the agent left: callbot hangs up
	{StateConnected, EvTimeout, StateConnected},   // read the roster now and then (the agent's leaving may be lost)

	{StateTerminating, EvPromptDone, StateTerminating},   // goodbye played, hang up now
	{StateTerminating, EvTimeout, StateTerminating},      // goodbye never finished, hang up anyway
	{StateTerminating, EvHangupFailed, StateTerminating}, // Graph did not end the call: hang up again soon

	// A timer the table refused (a bug) in a state only Graph's notifications move the call out
	// of, Graph showing the caller alone with callbot: callbot gives up and hangs up. A caller in
	// the menu or a queue has no such row: their keys or the dispatcher still move them on.
	{StateAnswering, EvAbort, StateTerminating},
	{StateTransferring, EvAbort, StateTerminating},
	{StateInviting, EvAbort, StateTerminating},
	{StateConnected, EvAbort, StateTerminating},

	// the tone subscription failed: subscribe again later (a TimerTone, in any of these states,
	// until the call is being hung up); the caller's keys matter whenever they are at a menu
	{StateInMenu, EvToneFailed, StateInMenu},
	{StateQueued, EvToneFailed, StateQueued},
	{StateTransferring, EvToneFailed, StateTransferring},
	{StateInviting, EvToneFailed, StateInviting},
	{StateConnected, EvToneFailed, StateConnected},
}

var legalSet = func() map[Transition]bool {
	m := map[Transition]bool{}
	for _, t := range Transitions {
		m[t] = true
	}
	for s := StateNone + 1; s < StateTerminated; s++ {
		m[Transition{s, EvEnded, StateTerminated}] = true
	}
	return m
}()

// legal reports whether the table allows the move.
func legal(from State, on EventKind, to State) bool {
	return legalSet[Transition{from, on, to}]
}

type stateEvent struct {
	s State
	e EventKind
}

var handledSet = func() map[stateEvent]bool {
	m := map[stateEvent]bool{}
	for t := range legalSet {
		m[stateEvent{t.From, t.On}] = true
	}
	return m
}()

// handles reports whether the table has any row for an event in a state.
func handles(from State, on EventKind) bool { return handledSet[stateEvent{from, on}] }
