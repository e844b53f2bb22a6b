package ivr

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/callbot/callbot/internal/graph"
)

const interpFlow = `name: interp
prompts:
  hello: {uri: https://m.example/hello.wav}
  menu:  {uri: https://m.example/menu.wav}
  sub:   {uri: https://m.example/sub.wav}
  plain: {uri: https://m.example/plain.wav}
  bad:   {uri: https://m.example/bad.wav}
  quiet: {uri: https://m.example/quiet.wav}
  bye:   {uri: https://m.example/bye.wav}
  hold:  {uri: https://m.example/hold.wav}
greeting: hello
start: main
menus:
  main:
    prompt: menu
    timeout: 4s
    retries: 2
    invalid: bad
    no-input: quiet
    options:
      "1": {queue: q}
      "2": {transfer: "+4930123456"}
      "3": {disconnect: bye}
      "4": {menu: sub}
      "5": {disconnect: true}
      "6": {menu: plain}
    fallback: {queue: q}
  sub:              # no fallback: hang up; no retries
    prompt: sub
    timeout: 10s
    retries: 0
    options:
      "*": {menu: main}
      "#": {transfer: 11111111-0000-4000-8000-000000000001}
  plain:            # no invalid or no-input prompt
    prompt: plain
    retries: 1
    options:
      "0": {menu: main}
queues:
  q:
    hold: hold
    agents: [11111111-0000-4000-8000-000000000001]
`

func parseInterp(t *testing.T) *Flow {
	t.Helper()
	f, err := Parse([]byte(interpFlow), "interp.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func media(ids ...string) []graph.MediaPrompt {
	var out []graph.MediaPrompt
	for _, id := range ids {
		out = append(out, graph.MediaPrompt{URI: "https://m.example/" + id + ".wav", ResourceID: id})
	}
	return out
}

func TestBegin(t *testing.T) {
	f := parseInterp(t)
	want := Step{Prompts: media("hello", "menu"), Position: Position{Menu: "main"}, Timeout: 4 * time.Second}
	if diff := cmp.Diff(f.Begin(), want); diff != "" {
		t.Errorf("Begin with greeting (-got +want):\n%s", diff)
	}

	f.Greeting = ""
	want.Prompts = media("menu")
	if diff := cmp.Diff(f.Begin(), want); diff != "" {
		t.Errorf("Begin without greeting (-got +want):\n%s", diff)
	}
}

func TestDigit(t *testing.T) {
	f := parseInterp(t)
	tests := []struct {
		name  string
		pos   Position
		digit string
		want  Step
	}{
		{"queue", Position{"main", 0}, "1", Step{
			Position: Position{"main", 0}, Action: Action{Kind: ActionQueue, Target: "q"}}},
		{"transfer to a number keeps the attempts", Position{"main", 1}, "2", Step{
			Position: Position{"main", 1}, Action: Action{Kind: ActionTransfer, Target: "+4930123456"}}},
		{"transfer to a user", Position{"sub", 0}, "#", Step{
			Position: Position{"sub", 0}, Action: Action{Kind: ActionTransfer, Target: "11111111-0000-4000-8000-000000000001"}}},
		{"disconnect with prompt", Position{"main", 0}, "3", Step{
			Prompts: media("bye"), Position: Position{"main", 0}, Action: Action{Kind: ActionDisconnect, Prompt: "bye"}}},
		{"disconnect without prompt", Position{"main", 0}, "5", Step{
			Position: Position{"main", 0}, Action: Action{Kind: ActionDisconnect}}},
		{"submenu", Position{"main", 2}, "4", Step{
			Prompts: media("sub"), Position: Position{"sub", 0}, Timeout: 10 * time.Second}},
		{"back to main without greeting", Position{"sub", 0}, "*", Step{
			Prompts: media("menu"), Position: Position{"main", 0}, Timeout: 4 * time.Second}},
		{"invalid key replays", Position{"main", 0}, "7", Step{
			Prompts: media("bad", "menu"), Position: Position{"main", 1}, Timeout: 4 * time.Second}},
		{"second invalid key replays", Position{"main", 1}, "A", Step{
			Prompts: media("bad", "menu"), Position: Position{"main", 2}, Timeout: 4 * time.Second}},
		{"invalid key beyond retries falls back", Position{"main", 2}, "", Step{
			Position: Position{"main", 3}, Action: Action{Kind: ActionQueue, Target: "q"}}},
		{"no invalid prompt: menu only", Position{"plain", 0}, "9", Step{
			Prompts: media("plain"), Position: Position{"plain", 1}, Timeout: DefaultTimeout}},
		{"retries 0, default fallback disconnects", Position{"sub", 0}, "1", Step{
			Position: Position{"sub", 1}, Action: Action{Kind: ActionDisconnect}}},
		{"unknown menu restarts", Position{"gone", 3}, "1", Step{
			Prompts: media("menu"), Position: Position{"main", 0}, Timeout: 4 * time.Second}},
		{"empty position restarts", Position{}, "1", Step{
			Prompts: media("menu"), Position: Position{"main", 0}, Timeout: 4 * time.Second}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := f.Digit(tt.pos, tt.digit)
			if diff := cmp.Diff(got, tt.want); diff != "" {
				t.Errorf("Digit(%+v, %q) (-got +want):\n%s", tt.pos, tt.digit, diff)
			}
		})
	}
}

func TestNoInput(t *testing.T) {
	f := parseInterp(t)
	tests := []struct {
		name string
		pos  Position
		want Step
	}{
		{"replays with no-input prompt", Position{"main", 0}, Step{
			Prompts: media("quiet", "menu"), Position: Position{"main", 1}, Timeout: 4 * time.Second}},
		{"second replay", Position{"main", 1}, Step{
			Prompts: media("quiet", "menu"), Position: Position{"main", 2}, Timeout: 4 * time.Second}},
		{"beyond retries falls back", Position{"main", 2}, Step{
			Position: Position{"main", 3}, Action: Action{Kind: ActionQueue, Target: "q"}}},
		{"no no-input prompt: menu only", Position{"plain", 0}, Step{
			Prompts: media("plain"), Position: Position{"plain", 1}, Timeout: DefaultTimeout}},
		{"default fallback disconnects", Position{"plain", 1}, Step{
			Position: Position{"plain", 2}, Action: Action{Kind: ActionDisconnect}}},
		{"unknown menu restarts", Position{"gone", 0}, Step{
			Prompts: media("menu"), Position: Position{"main", 0}, Timeout: 4 * time.Second}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := f.NoInput(tt.pos)
			if diff := cmp.Diff(got, tt.want); diff != "" {
				t.Errorf("NoInput(%+v) (-got +want):\n%s", tt.pos, diff)
			}
		})
	}
}

// TestCallerPath follows one caller: invalid keys and silences share the retry count, and the
// position survives a JSON round trip between events as it does in the call record.
func TestCallerPath(t *testing.T) {
	f := parseInterp(t)
	type event struct {
		digit string // "" for a no-input timeout
		want  Step
	}
	path := []event{
		{"4", Step{Prompts: media("sub"), Position: Position{"sub", 0}, Timeout: 10 * time.Second}},
		{"*", Step{Prompts: media("menu"), Position: Position{"main", 0}, Timeout: 4 * time.Second}},
		{"", Step{Prompts: media("quiet", "menu"), Position: Position{"main", 1}, Timeout: 4 * time.Second}},
		{"8", Step{Prompts: media("bad", "menu"), Position: Position{"main", 2}, Timeout: 4 * time.Second}},
		{"", Step{Position: Position{"main", 3}, Action: Action{Kind: ActionQueue, Target: "q"}}},
	}
	step := f.Begin()
	for i, ev := range path {
		stored, err := json.Marshal(step.Position)
		if err != nil {
			t.Fatal(err)
		}
		var pos Position
		if err := json.Unmarshal(stored, &pos); err != nil {
			t.Fatal(err)
		}
		if ev.digit == "" {
			step = f.NoInput(pos)
		} else {
			step = f.Digit(pos, ev.digit)
		}
		if diff := cmp.Diff(step, ev.want); diff != "" {
			t.Fatalf("event %d (%q) (-got +want):\n%s", i, ev.digit, diff)
		}
	}
}

func TestPositionJSON(t *testing.T) {
	got, err := json.Marshal(Position{Menu: "main", Attempts: 1})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(string(got), `{"menu":"main","attempts":1}`); diff != "" {
		t.Errorf("json (-got +want):\n%s", diff)
	}
}

// A flow built by hand, without Parse, must not make the interpreter panic or strand a caller.
func TestHandBuiltFlow(t *testing.T) {
	f := &Flow{
		Prompts: map[string]graph.MediaPrompt{"m": {URI: "https://m.example/m.wav"}},
		Start:   "main",
		Menus:   map[string]*Menu{"main": {ID: "main", Prompt: "m"}},
	}
	tests := []struct {
		name string
		got  Step
		want Step
	}{
		{"begin: resource id and default timeout filled in", f.Begin(), Step{
			Prompts: []graph.MediaPrompt{{URI: "https://m.example/m.wav", ResourceID: "m"}}, Position: Position{"main", 0}, Timeout: DefaultTimeout}},
		{"zero fallback disconnects", f.NoInput(Position{"main", 0}), Step{
			Position: Position{"main", 1}, Action: Action{Kind: ActionDisconnect}}},
		{"missing start menu disconnects", (&Flow{Start: "x"}).Begin(), Step{
			Action: Action{Kind: ActionDisconnect}}},
	}
	for _, tt := range tests {
		if diff := cmp.Diff(tt.got, tt.want); diff != "" {
			t.Errorf("%s (-got +want):\n%s", tt.name, diff)
		}
	}
}

// Goodbye finds the disconnect prompt of the menu the caller is at, else of the start menu.
func TestGoodbye(t *testing.T) {
	f := parseInterp(t)
	for _, tc := range []struct{ menu, want string }{
		{"main", "bye"},  // option 3 (5 hangs up without a prompt)
		{"sub", "bye"},   // none of its own: the start menu's
		{"gone", "bye"},  // a menu the flow no longer has
		{"plain", "bye"}, // likewise
	} {
		if got := f.Goodbye(tc.menu); got != tc.want {
			t.Errorf("Goodbye(%q) = %q, want %q", tc.menu, got, tc.want)
		}
	}
	f.Menus["sub"].Fallback = Action{Kind: ActionDisconnect, Prompt: "quiet"}
	if got := f.Goodbye("sub"); got != "quiet" {
		t.Errorf("Goodbye(sub) with a disconnect fallback = %q, want its prompt", got)
	}
	delete(f.Menus["main"].Options, "3")
	if got := f.Goodbye("main"); got != "" {
		t.Errorf("Goodbye(main) with no disconnect prompt = %q, want none", got)
	}
}
