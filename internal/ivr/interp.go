package ivr

import (
	"maps"
	"slices"
	"time"

	"github.com/callbot/callbot/internal/graph"
)

// Position is where a caller is in a flow. It is stored with the call record between events.
type Position struct {
	Menu string `json:"menu"`
	// Attempts counts the invalid keys and no-input timeouts in Menu so far.
	Attempts int `json:"attempts"`
}

// Step is what to do after an event.
type Step struct {
	// Prompts are to be played now, in order; may be empty. For ActionDisconnect they hold the
	// disconnect prompt, to be played before hanging up. For ActionQueue they are empty: the
	// queue's welcome and hold prompts belong to entering the queue, which also happens on
	// another queue's timeout.
	Prompts []graph.MediaPrompt
	// Position is where the caller is afterwards; after a terminal action, the menu the caller
	// left from.
	Position Position
	// Action is ActionNone to stay in Position.Menu and wait for a key, starting the no-input
	// timer once the prompts have finished; otherwise the terminal action (ActionQueue,
	// ActionTransfer or ActionDisconnect). ActionMenu never appears: moving to another menu is
	// ActionNone with that menu's prompt and Position.
	Action Action
	// Timeout is the no-input timeout of the menu waited in; 0 when Action is terminal.
	Timeout time.Duration
}

// Begin is the first step of a call once answered: the greeting, if any, and the start menu.
func (f *Flow) Begin() Step {
	return f.enter(f.Start, f.prompts(nil, f.Greeting))
}

// Restart is the step that takes a caller back to the start menu in a call already under way
// (a direct transfer failed): the start menu's prompt, without the greeting, which is played
// once, after answer.
func (f *Flow) Restart() Step {
	return f.enter(f.Start, nil)
}

// Goodbye is the prompt id to play when callbot ends a call of its own accord while the caller
// is at menu, a moment the flow has no step for (a direct transfer failing again and again
// with nobody pressing a key): the prompt of a disconnect the menu offers (its fallback's, else
// its options' in key order), else the start menu's; "" when neither offers one.
func (f *Flow) Goodbye(menu string) string {
	for _, id := range []string{menu, f.Start} {
		m := f.Menus[id]
		if m == nil {
			continue
		}
		if m.Fallback.Kind == ActionDisconnect && m.Fallback.Prompt != "" {
			return m.Fallback.Prompt
		}
		keys := slices.Sorted(maps.Keys(m.Options))
		for _, k := range keys {
			if a := m.Options[k]; a.Kind == ActionDisconnect && a.Prompt != "" {
				return a.Prompt
			}
		}
	}
	return ""
}

// Digit is the step after the caller pressed digit ("0"-"9", "*", "#", as
// graph.ToneInfo.Digit returns it) while at pos. A key the menu does not offer counts as a
// failed attempt: the invalid prompt and the menu prompt are replayed until the attempts
// exceed the menu's retries, then the fallback is taken. A position whose menu no longer
// exists (the flow was edited since) restarts at the start menu, without the greeting.
func (f *Flow) Digit(pos Position, digit string) Step {
	m := f.Menus[pos.Menu]
	if m == nil {
		return f.enter(f.Start, nil)
	}
	if a, ok := m.Options[digit]; ok {
		return f.take(pos.Menu, pos.Attempts, a)
	}
	return f.retry(m, pos.Attempts, m.Invalid)
}

// NoInput is the step after the menu's timeout passed without a key: like an invalid key, with
// the no-input prompt.
func (f *Flow) NoInput(pos Position) Step {
	m := f.Menus[pos.Menu]
	if m == nil {
		return f.enter(f.Start, nil)
	}
	return f.retry(m, pos.Attempts, m.NoInput)
}

func (f *Flow) retry(m *Menu, attempts int, apology string) Step {
	attempts++
	if attempts > m.Retries {
		fb := m.Fallback
		if fb.Kind == ActionNone {
			fb = Action{Kind: ActionDisconnect}
		}
		return f.take(m.ID, attempts, fb)
	}
	return Step{
		Prompts:  f.prompts(nil, apology, m.Prompt),
		Position: Position{Menu: m.ID, Attempts: attempts},
		Timeout:  timeout(m),
	}
}

// take carries out action a chosen in menu from.
func (f *Flow) take(from string, attempts int, a Action) Step {
	switch a.Kind {
	case ActionNone: // only in a flow built by hand: stay
		return f.enter(from, nil)
	case ActionMenu:
		return f.enter(a.Target, nil)
	}
	return Step{
		Prompts:  f.prompts(nil, a.Prompt), // set only for ActionDisconnect
		Position: Position{Menu: from, Attempts: attempts},
		Action:   a,
	}
}

// enter moves the caller to menu id with no attempts yet, after playing before.
func (f *Flow) enter(id string, before []graph.MediaPrompt) Step {
	m := f.Menus[id]
	if m == nil {
		// Only a flow that skipped validation gets here: hang up rather than leave the caller
		// waiting for a key nothing will answer.
		return Step{Prompts: before, Action: Action{Kind: ActionDisconnect}}
	}
	return Step{
		Prompts:  f.prompts(before, m.Prompt),
		Position: Position{Menu: id},
		Timeout:  timeout(m),
	}
}

// prompts appends the media of the given prompt ids to dst, skipping "" and unknown ids.
func (f *Flow) prompts(dst []graph.MediaPrompt, ids ...string) []graph.MediaPrompt {
	for _, id := range ids {
		if p, ok := f.Prompts[id]; ok && id != "" {
			if p.ResourceID == "" {
				p.ResourceID = id
			}
			dst = append(dst, p)
		}
	}
	return dst
}

func timeout(m *Menu) time.Duration {
	if m.Timeout <= 0 {
		return DefaultTimeout
	}
	return m.Timeout
}
