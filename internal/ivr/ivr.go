// Package ivr holds callbot's interactive voice response flows: the definition of a flow (prompts,
// DTMF menus, queues), its loading and validation from a YAML file with a line number for every
// problem, and the menu interpreter, a set of pure functions that turn "the caller pressed 3" or
// "the caller said nothing" into the prompts to play next and, eventually, the action that ends
// the menu part of a call (queue, transfer, disconnect).
//
// The package decides and never acts: it does no I/O beyond reading the flow file and never
// reads the clock. Callers store a Position with the call, feed it back with the next event and
// carry out the Step they get.
package ivr

import (
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/callbot/callbot/internal/graph"
)

// Menu defaults and limits.
const (
	DefaultTimeout = 5 * time.Second
	MinTimeout     = 1 * time.Second
	MaxTimeout     = 60 * time.Second
	DefaultRetries = 2
	MaxRetries     = 9
)

// A queue's max-wait, when set (0: no limit): shorter passes the caller on before the hold
// music has played, longer is not a wait anyone means.
const (
	MinMaxWait = 1 * time.Second
	MaxMaxWait = 24 * time.Hour
)

// Flow is one validated IVR flow. Flows come from Parse or Load; the interpreter trusts that
// every id a flow refers to exists.
type Flow struct {
	Name string
	// Prompts maps a prompt id to its media. ResourceID is always set: the prompt id unless the
	// file gives one, so that prefetching at answer and playing later share Graph's cache entry.
	Prompts  map[string]graph.MediaPrompt
	Greeting string // prompt id played once after answer, "" for none
	Start    string // id of the first menu
	Menus    map[string]*Menu
	Queues   map[string]*Queue
}

// Menu is a DTMF menu: a prompt, then one key press chooses an option.
type Menu struct {
	ID      string
	Prompt  string        // prompt id
	Timeout time.Duration // how long to wait for a key once the prompt has finished
	Retries int           // replays after an invalid key or no input before Fallback
	Invalid string        // prompt id played before a replay after an invalid key, "" for none
	NoInput string        // prompt id played before a replay after no input, "" for none
	Options map[string]Action
	// Fallback is taken when the caller fails more than Retries times. Never ActionNone in a
	// parsed flow: the default is a disconnect without prompt.
	Fallback Action
}

// ActionKind says what an Action does.
type ActionKind int

// Action kinds.
const (
	ActionNone       ActionKind = iota // stay in the current menu and wait for a key
	ActionMenu                         // go to the menu Target
	ActionQueue                        // put the caller in the queue Target
	ActionTransfer                     // blind transfer to Target: a user object id or an E.164 number
	ActionDisconnect                   // play Prompt (if any), then hang up
)

var actionKindNames = [...]string{"none", "menu", "queue", "transfer", "disconnect"}

func (k ActionKind) String() string {
	if k >= 0 && int(k) < len(actionKindNames) {
		return actionKindNames[k]
	}
	return "ActionKind(" + strconv.Itoa(int(k)) + ")"
}

// Action is what a menu option, a menu fallback or a queue timeout does.
type Action struct {
	Kind ActionKind
	// Target is the menu id, the queue id, or the transfer target: a lowercase user object id
	// (GUID) or an E.164 number ("+4930...").
	Target string
	// Prompt is, for ActionDisconnect, the id of the prompt played before hanging up; "" for none.
	Prompt string
}

// TransferParty returns the party a transfer action names: a phone number for an E.164
// target, a Teams user otherwise.
func (a Action) TransferParty() graph.Party {
	if strings.HasPrefix(a.Target, "+") {
		return graph.Party{Kind: graph.KindPhone, ID: a.Target}
	}
	return graph.Party{Kind: graph.KindUser, ID: a.Target}
}

// Queue is a call queue as the flow defines it. Routing lives in package queue; the flow only
// names the queue, its prompts and its agents.
type Queue struct {
	ID      string
	Name    string        // display name; the id when the file gives none
	Welcome string        // prompt id played on entering the queue, "" for none
	Hold    string        // prompt id looped while the caller waits
	MaxWait time.Duration // 0 for no limit
	// OnTimeout is taken when MaxWait is reached: ActionQueue, ActionTransfer or
	// ActionDisconnect (the default, without prompt).
	OnTimeout Action
	Agents    []string // lowercase Entra object ids, in file order, no duplicates
	// Handoff is how a caller reaches an agent: HandoffTransfer (blind transfer, the default:
	// callbot leaves the call) or HandoffInvite (callbot invites the agent and stays in the call,
	// so it knows when the conversation ends).
	Handoff Handoff
	// WrapUp is the time an agent is not offered calls after a conversation (invite hand-off).
	WrapUp time.Duration
}

// Handoff is how a queue hands a caller to an agent.
type Handoff string

// Hand-off modes.
const (
	HandoffTransfer Handoff = "transfer"
	HandoffInvite   Handoff = "invite"
)

// Prompt returns the media of prompt id.
func (f *Flow) Prompt(id string) (graph.MediaPrompt, bool) {
	p, ok := f.Prompts[id]
	return p, ok
}

// AllPrompts returns every prompt of the flow, sorted by prompt id, for answer's preFetchMedia.
// Prompts that share a resource id (and so, after validation, a URI) appear once.
func (f *Flow) AllPrompts() []graph.MediaPrompt {
	ids := make([]string, 0, len(f.Prompts))
	for id := range f.Prompts {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	out := make([]graph.MediaPrompt, 0, len(ids))
	seen := make(map[string]bool, len(ids))
	for _, id := range ids {
		p := f.Prompts[id]
		if p.ResourceID == "" {
			p.ResourceID = id
		}
		if seen[p.ResourceID] {
			continue
		}
		seen[p.ResourceID] = true
		out = append(out, p)
	}
	return out
}

// Agents returns the agent ids of every queue, deduplicated and sorted.
func (f *Flow) Agents() []string {
	var out []string
	for _, q := range f.Queues {
		out = append(out, q.Agents...)
	}
	slices.Sort(out)
	return slices.Compact(out)
}
