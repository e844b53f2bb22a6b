package ivr

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/callbot/callbot/internal/graph"
)

const exampleFile = "../../deployments/examples/flow.yaml"

func TestLoadExample(t *testing.T) {
	f, err := Load(exampleFile)
	if err != nil {
		t.Fatalf("Load(%s): %v", exampleFile, err)
	}
	if got, want := f.Name, "contoso-support"; got != want {
		t.Errorf("Name = %q, want %q", got, want)
	}
	if got, want := f.Start, "main"; got != want {
		t.Errorf("Start = %q, want %q", got, want)
	}
	main := f.Menus["main"]
	if main == nil {
		t.Fatal("no menu main")
	}
	wantOptions := map[string]Action{
		"1": {Kind: ActionQueue, Target: "sales"},
		"2": {Kind: ActionQueue, Target: "support"},
		"3": {Kind: ActionTransfer, Target: "11111111-0000-4000-8000-000000000001"},
		"4": {Kind: ActionMenu, Target: "billing"},
		"9": {Kind: ActionDisconnect, Prompt: "goodbye"},
	}
	if diff := cmp.Diff(main.Options, wantOptions); diff != "" {
		t.Errorf("main options (-got +want):\n%s", diff)
	}
	if got, want := main.Fallback, (Action{Kind: ActionQueue, Target: "support"}); got != want {
		t.Errorf("main fallback = %+v, want %+v", got, want)
	}
	// The billing menu gives no fallback: the default is to hang up.
	if got, want := f.Menus["billing"].Fallback, (Action{Kind: ActionDisconnect}); got != want {
		t.Errorf("billing fallback = %+v, want %+v", got, want)
	}
	if got, want := len(f.Agents()), 6; got != want {
		t.Errorf("len(Agents()) = %d, want %d", got, want)
	}
	for _, p := range f.AllPrompts() {
		if !strings.HasPrefix(p.URI, "https://") || p.ResourceID == "" {
			t.Errorf("prompt %+v: want an https URI and a resource id", p)
		}
	}
}

func TestParseDefaults(t *testing.T) {
	const src = `name: minimal
prompts:
  menu: {uri: https://media.example/menu.wav}
  hold: {uri: https://media.example/hold.wav, resource-id: 7e0d1a5c-0000-4000-8000-000000000000}
start: main
menus:
  main:
    prompt: menu
    options:
      "0": {queue: q}
queues:
  q:
    hold: hold
    agents: [AAAAAAAA-0000-4000-8000-000000000001]
`
	got, err := Parse([]byte(src), "minimal.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want := &Flow{
		Name: "minimal",
		Prompts: map[string]graph.MediaPrompt{
			"menu": {URI: "https://media.example/menu.wav", ResourceID: "menu"},
			"hold": {URI: "https://media.example/hold.wav", ResourceID: "7e0d1a5c-0000-4000-8000-000000000000"},
		},
		Start: "main",
		Menus: map[string]*Menu{"main": {
			ID: "main", Prompt: "menu", Timeout: 5 * time.Second, Retries: 2,
			Options:  map[string]Action{"0": {Kind: ActionQueue, Target: "q"}},
			Fallback: Action{Kind: ActionDisconnect},
		}},
		Queues: map[string]*Queue{"q": {
			ID: "q", Name: "q", Hold: "hold",
			OnTimeout: Action{Kind: ActionDisconnect},
			Agents:    []string{"aaaaaaaa-0000-4000-8000-000000000001"}, // GUIDs are lowercased
			Handoff:   HandoffTransfer,
		}},
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("Parse (-got +want):\n%s", diff)
	}
}

// base is a valid flow the broken cases below start from. Line numbers matter: the tests
// name them.
const base = `name: t
prompts:
  p: {uri: https://media.example/p.wav}
  hold: {uri: https://media.example/hold.wav}
start: main
menus:
  main:
    prompt: p
    options:
      "1": {queue: q}
queues:
  q:
    hold: hold
    agents: [11111111-0000-4000-8000-000000000001]
`

func TestParseValid(t *testing.T) {
	tests := []struct {
		name string
		src  string
	}{
		{"base", base},
		{"submenu cycle", strings.Replace(base, `      "1": {queue: q}`, `      "1": {menu: sub}
  sub:
    prompt: p
    options:
      "*": {menu: main}
    fallback: {menu: main}`, 1)},
		{"unreachable menu", strings.Replace(base, "queues:\n", "  orphan:\n    prompt: p\n    options:\n      \"#\": {disconnect: true}\nqueues:\n", 1)},
		{"every key and action", strings.Replace(base, `      "1": {queue: q}`, `      "0": {queue: q}
      "1": {transfer: 11111111-0000-4000-8000-0000000000AB}
      "2": {transfer: "+4930123456"}
      "3": {disconnect: p}
      "4": {disconnect: true}
      "5": {menu: main}
      "6": {queue: q}
      "7": {queue: q}
      "8": {queue: q}
      "9": {queue: q}
      "*": {queue: q}
      "#": {queue: q}`, 1)},
		{"aliases", `name: t
prompts:
  p: &media {uri: https://media.example/p.wav}
  hold: *media
start: main
menus:
  main:
    prompt: p
    options: {"1": &q {queue: q}, "2": *q}
queues:
  q: {hold: hold, agents: [11111111-0000-4000-8000-000000000001], max-wait: 0s}
`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := Parse([]byte(tt.src), "flow.yaml"); err != nil {
				t.Errorf("Parse: %v", err)
			}
		})
	}
}

// problem is a Problem as the table below states it: the line and a substring of the message.
type problem struct {
	Line int
	Msg  string
}

func TestParseProblems(t *testing.T) {
	tests := []struct {
		name string
		src  string
		want []problem
	}{
		{
			name: "yaml syntax",
			src:  "name: t\nmenus:\n  main: [\n",
			want: []problem{{3, "yaml: did not find expected node content"}},
		},
		{
			name: "handoff and wrap-up",
			src:  base + "    handoff: conference\n    wrap-up: 20s\n",
			want: []problem{{15, `queues.q.handoff: "conference" is neither transfer nor invite`}, {16, "queues.q.wrap-up: has no effect without handoff: invite"}},
		},
		{
			name: "wrap-up too long",
			src:  base + "    handoff: invite\n    wrap-up: 1h\n",
			want: []problem{{16, "queues.q.wrap-up: 1h is not between 0s and 10m"}},
		},
		{
			name: "tab indentation",
			src:  "name: t\n\tstart: main\n",
			want: []problem{{2, "yaml: found a tab character"}},
		},
		{
			name: "empty",
			src:  "# nothing yet\n",
			want: []problem{{1, "flow file is empty"}},
		},
		{
			name: "not a mapping",
			src:  "- name: t\n",
			want: []problem{{1, "flow: want a mapping, got a list"}, {1, "name is required"}, {1, "start is required"}, {1, "menus: at least one menu is required"}},
		},
		{
			name: "missing name start menus",
			src:  "prompts:\n  p: {uri: https://media.example/p.wav}\n",
			want: []problem{{1, "name is required"}, {1, "start is required"}, {1, "menus: at least one menu is required"}},
		},
		{
			// YAML reads an unquoted # key as a comment: the option would vanish without a word,
			// and callers pressing # would hear the invalid-key prompt.
			name: "unquoted # key",
			src:  strings.Replace(base, "      \"1\": {queue: q}\n", "      \"1\": {queue: q}\n      #: {disconnect: true}\n", 1),
			want: []problem{{11, `quote the key`}},
		},
		{
			// the URL alone, not in a mapping: one problem that says how to write it, not two
			name: "prompt as a plain string",
			src:  strings.Replace(base, "  p: {uri: https://media.example/p.wav}", "  p: https://media.example/p.wav", 1),
			want: []problem{{3, `prompts.p: want a mapping such as {uri: https://media.example/p.wav}, got a string`}},
		},
		{
			name: "unknown keys everywhere",
			src: `name: t
prompts:
  p: {url: https://media.example/p.wav}
  hold: {uri: https://media.example/hold.wav}
start: main
menus:
  main:
    promt: p
    options:
      "1": {queu: q}
queues:
  q:
    hold: hold
    agent: [11111111-0000-4000-8000-000000000001]
queus: {}
`,
			want: []problem{
				{3, `prompts.p: unknown key "url" (did you mean "uri"?)`},
				{8, `menus.main: unknown key "promt" (did you mean "prompt"?)`},
				{10, `menus.main.options.1: unknown key "queu" (did you mean "queue"?)`},
				{14, `queues.q: unknown key "agent" (did you mean "agents"?)`},
				{15, `flow: unknown key "queus" (did you mean "queues"?)`},
			},
		},
		{
			name: "start names an unknown menu",
			src:  strings.Replace(base, "start: main", "start: mian", 1),
			want: []problem{{5, `start: unknown menu "mian" (did you mean "main"?)`}},
		},
		{
			name: "undefined prompts",
			src: `name: t
prompts:
  hold: {uri: https://media.example/hold.wav}
greeting: hello
start: main
menus:
  main:
    prompt: menu
    invalid: oops
    no-input: silence
    options:
      "1": {queue: q}
      "2": {disconnect: bye}
queues:
  q:
    welcome: hi
    hold: hold
    on-timeout: {disconnect: closed}
    max-wait: 1m
    agents: [11111111-0000-4000-8000-000000000001]
`,
			want: []problem{
				{4, `greeting: unknown prompt "hello"`},
				{8, `menus.main.prompt: unknown prompt "menu"`},
				{9, `menus.main.invalid: unknown prompt "oops"`},
				{10, `menus.main.no-input: unknown prompt "silence"`},
				{13, `menus.main.options.2.disconnect: unknown prompt "bye"`},
				{16, `queues.q.welcome: unknown prompt "hi"`},
				{18, `queues.q.on-timeout.disconnect: unknown prompt "closed"`},
			},
		},
		{
			name: "prompt uris",
			src: `name: t
prompts:
  p: {uri: "http://media.example/p.wav"}
  hold: {uri: "https://"}
  q: {uri: "https://media.example/%zz.wav"}
  r: {uri: [https://media.example/r.wav]}
  s: {uri: https://media.example/s.wav, resource-id: p}
  u: {uri: https://media.example/u.wav, resource-id: t}
  t: {uri: https://media.example/t.wav}
start: main
menus:
  main:
    prompt: p
    options:
      "1": {disconnect: true}
`,
			want: []problem{
				{3, `prompts.p.uri: "http://media.example/p.wav": want an https URL`},
				{4, `prompts.hold.uri: "https://" has no host`},
				{5, `prompts.q.uri: "https://media.example/%zz.wav" is not a valid URL`},
				{6, `prompts.r.uri: want a single value, got a list`},
				{7, `prompts.s: resource id "p" is already used for http://media.example/p.wav (line 3)`},
				{9, `prompts.t: resource id "t" is already used for https://media.example/u.wav (line 8)`},
			},
		},
		{
			name: "option keys and action counts",
			src: strings.Replace(base, `      "1": {queue: q}`, `      "1": {queue: q}
      "12": {queue: q}
      a: {queue: q}
      "": {queue: q}
      "2": {}
      "3": {queue: q, transfer: "+4930123456"}
      "4": q
      "5":
      "1": {disconnect: true}`, 1),
			want: []problem{
				{11, `menus.main.options: key "12" is not one of 0-9, * or #`},
				{12, `menus.main.options: key "a" is not one of 0-9, * or #`},
				{13, `menus.main.options: key "" is not one of 0-9, * or #`},
				{14, `menus.main.options.2: no action: want one of menu, queue, transfer or disconnect`},
				{15, `menus.main.options.3: several actions (queue, transfer): want exactly one`},
				{16, `menus.main.options.4: want a mapping, got "q"`},
				{17, `menus.main.options.5: no action`},
				{18, `menus.main.options: key "1" is defined twice (first at line 10)`},
			},
		},
		{
			name: "unknown targets",
			src: strings.Replace(base, `      "1": {queue: q}`, `      "1": {queue: sales}
      "2": {menu: billing}
      "3": {menu: }
    fallback: {queue: qq}`, 1),
			want: []problem{
				{10, `menus.main.options.1.queue: unknown queue "sales"`},
				{11, `menus.main.options.2.menu: unknown menu "billing"`},
				{12, `menus.main.options.3.menu: want a menu id`},
				{13, `menus.main.fallback.queue: unknown queue "qq"`},
			},
		},
		{
			name: "transfer targets",
			src: strings.Replace(base, `      "1": {queue: q}`, `      "1": {transfer: bob@contoso.example}
      "2": {transfer: "+12345"}
      "3": {transfer: "004930123456"}
      "4": {transfer: "+4930123456789012"}
      "5": {transfer: 11111111-0000-4000-8000-00000000000g}
      "6": {transfer: "+4930123456"}
      "7": {transfer: 11111111-0000-4000-8000-000000000001}`, 1),
			want: []problem{
				{10, `menus.main.options.1.transfer: "bob@contoso.example" is neither a user object id (GUID) nor an E.164 number`},
				{11, `"+12345" is neither`},
				{12, `"004930123456" is neither`},
				{13, `"+4930123456789012" is neither`},
				{14, `"11111111-0000-4000-8000-00000000000g" is neither`},
			},
		},
		{
			name: "timeouts and retries",
			src: `name: t
prompts:
  p: {uri: https://media.example/p.wav}
start: a
menus:
  a: {prompt: p, timeout: 0s, retries: 10, options: {"1": {menu: b}}}
  b: {prompt: p, timeout: 61s, retries: -1, options: {"1": {menu: c}}}
  c: {prompt: p, timeout: 5, retries: two, options: {"1": {menu: d}}}
  d: {prompt: p, timeout: 60s, retries: 0, options: {"1": {menu: a}}}
  e: {prompt: p, timeout: 1s, retries: 9, options: {"1": {menu: a}}, fallback: {menu: e}}
`,
			want: []problem{
				{6, `menus.a.timeout: 0s is out of range 1s-60s`},
				{6, `menus.a.retries: 10 is out of range 0-9`},
				{7, `menus.b.timeout: 61s is out of range`},
				{7, `menus.b.retries: -1 is out of range 0-9`},
				{8, `menus.c.timeout: "5" is not a duration`},
				{8, `menus.c.retries: "two" is not a whole number`},
				{10, `menus.e.fallback: names its own menu`},
			},
		},
		{
			// a caller who never presses a valid key would go round main and sub forever; a
			// chain that ends (c falls back to main, whose fallback disconnects) is fine
			name: "fallback and overflow cycles",
			src: `name: t
prompts:
  p: {uri: https://media.example/p.wav}
start: main
menus:
  main: {prompt: p, options: {"1": {queue: q}}, fallback: {menu: sub}}
  sub: {prompt: p, options: {"1": {queue: q}}, fallback: {menu: main}}
  c: {prompt: p, options: {"1": {queue: q}}, fallback: {menu: main}}
  d: {prompt: p, options: {"1": {menu: c}}, fallback: {menu: c}}
queues:
  q: {hold: p, max-wait: 1m, on-timeout: {queue: q2}, agents: [11111111-0000-4000-8000-000000000001]}
  q2: {hold: p, max-wait: 1m, on-timeout: {queue: q3}, agents: [11111111-0000-4000-8000-000000000001]}
  q3: {hold: p, max-wait: 1m, on-timeout: {queue: q}, agents: [11111111-0000-4000-8000-000000000001]}
`,
			want: []problem{
				{6, `menus.main.fallback: leads back to main through menus sub`},
				{11, `queues.q.on-timeout: leads back to q through queues q2, q3`},
			},
		},
		{
			name: "queues",
			src: `name: t
prompts:
  p: {uri: https://media.example/p.wav}
start: main
menus:
  main: {prompt: p, options: {"1": {queue: a}, "2": {queue: b}, "3": {queue: c}}}
queues:
  a:
    agents: [11111111-0000-4000-8000-000000000001]
  b:
    hold: p
    agents:
  c:
    hold: p
    max-wait: -5m
    agents:
      - 11111111-0000-4000-8000-000000000001
      - alice@contoso.example
      - 11111111-0000-4000-8000-00000000000A
      - 11111111-0000-4000-8000-00000000000a
  d:
    hold: p
    on-timeout: {menu: main}
    agents: [11111111-0000-4000-8000-000000000001]
  e:
    hold: p
    max-wait: 5m
    on-timeout: {queue: e}
    agents: [11111111-0000-4000-8000-000000000001]
  f:
    hold: p
    on-timeout: {transfer: "+4930123456"}
    agents: 11111111-0000-4000-8000-000000000001
  g:
    hold: p
    max-wait: 1ns
    agents: [11111111-0000-4000-8000-000000000001]
  h:
    hold: p
    max-wait: 25h
    agents: [11111111-0000-4000-8000-000000000001]
`,
			want: []problem{
				{8, `queues.a: hold is required`},
				{12, `queues.b.agents: at least one agent is required`},
				{15, `queues.c.max-wait: -5m is negative`},
				{18, `queues.c.agents: "alice@contoso.example" is not an Entra object id (GUID)`},
				{20, `queues.c.agents: agent 11111111-0000-4000-8000-00000000000a is listed twice (first at line 19)`},
				{23, `queues.d.on-timeout: a menu is not allowed here`},
				{28, `queues.e.on-timeout: names its own queue`},
				{32, `queues.f.on-timeout: has no effect without max-wait`},
				{33, `queues.f.agents: want a list, got "11111111-0000-4000-8000-000000000001"`},
				{36, `queues.g.max-wait: 1ns is not between 1s and 24h0m0s (0: no limit)`},
				{40, `queues.h.max-wait: 25h is not between 1s and 24h0m0s (0: no limit)`},
			},
		},
		{
			name: "wrong shapes",
			src: `name: [t]
prompts: [p]
start: main
menus:
  - main
queues: q
`,
			want: []problem{
				{1, `name: want a single value, got a list`},
				{2, `prompts: want a mapping, got a list`},
				{3, `start: unknown menu "main"`},
				{5, `menus: want a mapping, got a list`},
				{6, `queues: want a mapping, got "q"`},
			},
		},
		{
			name: "disconnect values",
			src: strings.Replace(base, `      "1": {queue: q}`, `      "1": {disconnect: false}
      "2": {disconnect: }
      "3": {disconnect: "true"}
      "4": {disconnect: True}`, 1),
			want: []problem{
				{10, `menus.main.options.1.disconnect: want a prompt id to play before hanging up, or true for none`},
				{11, `menus.main.options.2.disconnect: want a prompt id`},
				{12, `menus.main.options.3.disconnect: unknown prompt "true"`}, // quoted: a prompt id
			},
		},
		{
			name: "merge key",
			src:  strings.Replace(base, "    prompt: p\n", "    <<: {prompt: p}\n", 1),
			want: []problem{{7, "menus.main: prompt is required"}, {8, "menus.main: merge keys (<<) are not supported"}},
		},
		{
			name: "second document",
			src:  base + "---\nname: other\n",
			want: []problem{{15, "a flow file holds one YAML document"}},
		},
		{
			// saved as Latin-1: the YAML reader's error names no line; callbot finds it
			name: "not UTF-8",
			src:  strings.Replace(base, "  q:\n", "  q:\n    name: Caf\xe9\n", 1),
			want: []problem{{13, "invalid"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := Parse([]byte(tt.src), "flow.yaml")
			var verr *ValidationError
			if !errors.As(err, &verr) {
				t.Fatalf("Parse = %v, %v; want a *ValidationError", f, err)
			}
			got := make([]problem, len(verr.Problems))
			for i, p := range verr.Problems {
				got[i] = problem{p.Line, p.Msg}
				if i < len(tt.want) && strings.Contains(p.Msg, tt.want[i].Msg) {
					got[i].Msg = tt.want[i].Msg // the table states substrings
				}
				if p.File != "flow.yaml" {
					t.Errorf("problem %d: File = %q, want flow.yaml", i, p.File)
				}
			}
			if diff := cmp.Diff(got, tt.want); diff != "" {
				t.Errorf("problems (-got +want):\n%s\nfull error:\n%v", diff, err)
			}
		})
	}
}

// A YAML syntax error names the line an admin has to fix. yaml.v3 names the line where the
// enclosing block or flow collection began (for most errors the one before it), or no line at
// all for an error on the first line: a misindented option at the end of a long menu was
// reported on the "menus:" line.
func TestSyntaxErrorLine(t *testing.T) {
	tests := []struct {
		name string
		src  string
		line int
	}{
		{"misindented option", strings.Replace(base, "      \"1\": {queue: q}\n", "      \"1\": {queue: q}\n     \"2\": {queue: q}\n", 1), 11},
		{"misindented option, deeper", strings.Replace(base, "      \"1\": {queue: q}\n", "      \"1\": {queue: q}\n       \"2\": {queue: q}\n", 1), 11},
		{"bracket mismatch", strings.Replace(base, "{queue: q}", "{queue: q]", 1), 10},
		{"unclosed quote", strings.Replace(base, "{queue: q}", "{queue: \"q}", 1), 10},
		{"first line", strings.Replace(base, "name: t", "name: a: b", 1), 1},
		{"unclosed bracket", "name: t\nmenus:\n  main: [\n", 3},
		{"tab", "name: t\n\tstart: main\n", 2},
		{"second document", base + "---\nname: x\n  y: z\n", 17},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.src), "flow.yaml")
			var verr *ValidationError
			if !errors.As(err, &verr) {
				t.Fatalf("Parse: %v, want a *ValidationError", err)
			}
			var yamlLines []int
			for _, p := range verr.Problems {
				if strings.HasPrefix(p.Msg, "yaml: ") {
					yamlLines = append(yamlLines, p.Line)
				}
			}
			if len(yamlLines) != 1 || yamlLines[0] != tt.line {
				t.Errorf("syntax error on lines %v, want line %d; full error:\n%v", yamlLines, tt.line, err)
			}
		})
	}
}

func TestValidationErrorFormat(t *testing.T) {
	src := strings.Replace(base, "start: main", "start: nowhere", 1)
	src = strings.Replace(src, "    prompt: p\n", "    prompt: p\n    timeout: 2m\n", 1)
	_, err := Parse([]byte(src), "deploy/flow.yaml")
	got := fmt.Sprint(err)
	want := `deploy/flow.yaml:5:8: start: unknown menu "nowhere"
deploy/flow.yaml:9:14: menus.main.timeout: 2m is out of range 1s-60s`
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("Error() (-got +want):\n%s", diff)
	}
}

func TestLoadErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := Load(filepath.Join(dir, "missing.yaml")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load(missing) = %v, want an error matching os.ErrNotExist", err)
	}
	path := filepath.Join(dir, "flow.yaml")
	if err := os.WriteFile(path, []byte("name: t\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(path)
	var verr *ValidationError
	if !errors.As(err, &verr) || verr.Problems[0].File != path {
		t.Errorf("Load(%s) = %v, want a *ValidationError naming the file", path, err)
	}
}

func TestAllPrompts(t *testing.T) {
	f := &Flow{Prompts: map[string]graph.MediaPrompt{
		"zz":    {URI: "https://m.example/z.wav"},
		"alias": {URI: "https://m.example/a.wav", ResourceID: "shared"},
		"aa":    {URI: "https://m.example/a.wav", ResourceID: "shared"}, // same media under two ids
		"mm":    {URI: "https://m.example/m.wav", ResourceID: "mm"},
	}}
	got := f.AllPrompts()
	want := []graph.MediaPrompt{
		{URI: "https://m.example/a.wav", ResourceID: "shared"},
		{URI: "https://m.example/m.wav", ResourceID: "mm"},
		{URI: "https://m.example/z.wav", ResourceID: "zz"},
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("AllPrompts (-got +want):\n%s", diff)
	}
	if p, ok := f.Prompt("mm"); !ok || p.URI != "https://m.example/m.wav" {
		t.Errorf("Prompt(mm) = %+v, %v", p, ok)
	}
	if _, ok := f.Prompt("nope"); ok {
		t.Error("Prompt(nope) found")
	}
}

func TestAgents(t *testing.T) {
	f := &Flow{Queues: map[string]*Queue{
		"a": {Agents: []string{"c", "a"}},
		"b": {Agents: []string{"b", "a", "c"}},
		"c": {},
	}}
	if diff := cmp.Diff(f.Agents(), []string{"a", "b", "c"}); diff != "" {
		t.Errorf("Agents (-got +want):\n%s", diff)
	}
}

func TestActionKindString(t *testing.T) {
	tests := []struct {
		k    ActionKind
		want string
	}{
		{ActionNone, "none"}, {ActionMenu, "menu"}, {ActionQueue, "queue"},
		{ActionTransfer, "transfer"}, {ActionDisconnect, "disconnect"}, {ActionKind(9), "ActionKind(9)"},
	}
	for _, tt := range tests {
		if got := tt.k.String(); got != tt.want {
			t.Errorf("ActionKind(%d).String() = %q, want %q", int(tt.k), got, tt.want)
		}
	}
}

func TestTransferParty(t *testing.T) {
	tests := []struct {
		target string
		want   graph.Party
	}{
		{"+4930123456", graph.Party{Kind: graph.KindPhone, ID: "+4930123456"}},
		{"11111111-0000-4000-8000-000000000001", graph.Party{Kind: graph.KindUser, ID: "11111111-0000-4000-8000-000000000001"}},
	}
	for _, tt := range tests {
		got := Action{Kind: ActionTransfer, Target: tt.target}.TransferParty()
		if diff := cmp.Diff(got, tt.want); diff != "" {
			t.Errorf("TransferParty(%s) (-got +want):\n%s", tt.target, diff)
		}
	}
}
