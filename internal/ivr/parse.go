package ivr

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/url"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"go.yaml.in/yaml/v3"

	"github.com/callbot/callbot/internal/graph"
)

// Problem is one thing wrong with a flow file, at a position in it (Line and Column are
// 1-based; 0 when unknown).
type Problem struct {
	File   string
	Line   int
	Column int
	Msg    string
}

func (p Problem) String() string {
	var b strings.Builder
	if p.File != "" {
		b.WriteString(p.File + ":")
	}
	if p.Line > 0 {
		b.WriteString(strconv.Itoa(p.Line) + ":")
		if p.Column > 0 {
			b.WriteString(strconv.Itoa(p.Column) + ":")
		}
	}
	if b.Len() > 0 {
		b.WriteString(" ")
	}
	return b.String() + p.Msg
}

// ValidationError lists every problem found in a flow file, sorted by position.
type ValidationError struct {
	Problems []Problem
}

// Error returns one "file:line:col: msg" line per problem.
func (e *ValidationError) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

// Load reads the flow file at path and parses it. Errors are a read error or, for a file that
// is not a valid flow, a *ValidationError.
func Load(path string) (*Flow, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load flow: %w", err)
	}
	return Parse(data, path)
}

// Parse decodes and validates a flow file; filename is used in problem positions only. A file
// that is not a valid flow gives a *ValidationError with every problem found, not only the first.
func Parse(data []byte, filename string) (*Flow, error) {
	p := &parser{file: filename}
	f := p.parse(data)
	if len(p.problems) > 0 {
		sort.SliceStable(p.problems, func(i, j int) bool {
			a, b := p.problems[i], p.problems[j]
			if a.Line != b.Line {
				return a.Line < b.Line
			}
			return a.Column < b.Column
		})
		return nil, &ValidationError{Problems: p.problems}
	}
	return f, nil
}

// The keys each mapping may hold. The walk below checks them itself instead of decoding into
// structs with KnownFields, which stops at the first unknown key.
var (
	flowKeys   = []string{"name", "prompts", "greeting", "start", "menus", "queues"}
	promptKeys = []string{"uri", "resource-id"}
	menuKeys   = []string{"prompt", "timeout", "retries", "invalid", "no-input", "options", "fallback"}
	actionKeys = []string{"menu", "queue", "transfer", "disconnect"}
	queueKeys  = []string{"name", "welcome", "hold", "max-wait", "on-timeout", "agents", "handoff", "wrap-up"}
)

var (
	guidRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)
	// E.164: a plus, a country code that does not start with 0, at most 15 digits in all.
	e164RE = regexp.MustCompile(`^\+[1-9][0-9]{7,14}$`)
	// yaml.v3 reports syntax errors as "yaml: line N: msg", sometimes without the line.
	yamlErrRE = regexp.MustCompile(`^yaml: (?:line ([0-9]+): )?(.*)$`)
)

type refKind int

const (
	refPrompt refKind = iota
	refMenu
	refQueue
)

// ref is a use of an id, checked once the whole file has been read: ids may be used before
// they are defined.
type ref struct {
	kind refKind
	id   string
	node *yaml.Node
	path string
}

// field is a key and its value in a mapping; both nil when the key is absent. A field with a
// key and no value stands for a misspelt key (reported as unknown) so that the "is required"
// problem is not reported a second time.
type field struct{ key, val *yaml.Node }

// missing reports whether a required fl deserves an "is required" problem: absent or empty, but
// not misspelt nor of the wrong shape, which are reported already.
func missing(fl field) bool {
	switch {
	case fl.key == nil:
		return true
	case fl.val == nil:
		return false
	}
	return isNull(fl.val) || fl.val.Kind == yaml.ScalarNode && strings.TrimSpace(fl.val.Value) == ""
}

// misspelt reports whether fl stands for a misspelt key.
func misspelt(fl field) bool { return fl.key != nil && fl.val == nil }

type parser struct {
	file     string
	data     []byte
	problems []Problem
	refs     []ref
	// the value nodes of menus' menu fallbacks and queues' queue on-timeouts, for the cycle check
	fallbacks, overflows map[string]*yaml.Node
}

func (p *parser) errorf(n *yaml.Node, format string, args ...any) {
	p.problems = append(p.problems, Problem{File: p.file, Line: n.Line, Column: n.Column, Msg: fmt.Sprintf(format, args...)})
}

func (p *parser) syntax(err error) {
	m := yamlErrRE.FindStringSubmatch(err.Error())
	if m == nil || m[1] == "" {
		// The YAML reader's own errors (bad UTF-8, a control character) name no line: find the
		// byte it stopped at (a file saved as Latin-1 is the usual cause).
		if line, col := badByte(p.data); line > 0 {
			p.problems = append(p.problems, Problem{File: p.file, Line: line, Column: col, Msg: err.Error()})
			return
		}
	}
	msg := err.Error()
	if m != nil {
		msg = "yaml: " + m[2]
	}
	// The line yaml.v3 names is where the enclosing block or flow collection began, for most
	// errors the line before it, and none for an error on the first line: find the line itself.
	p.problems = append(p.problems, Problem{File: p.file, Line: syntaxLine(p.data), Msg: msg})
}

// syntaxLine is the line (1-based) of the syntax error in data: the line after the longest run
// of whole lines from the start that is valid YAML.
func syntaxLine(data []byte) int {
	lines := bytes.SplitAfter(data, []byte("\n"))
	end := len(data)
	for k := len(lines) - 1; k > 0; k-- {
		end -= len(lines[k])
		if validYAML(data[:end]) {
			return k + 1
		}
	}
	return 1
}

// validYAML reports whether data is a stream of well-formed YAML documents.
func validYAML(data []byte) bool {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for {
		var n yaml.Node
		if err := dec.Decode(&n); err != nil {
			return errors.Is(err, io.EOF)
		}
	}
}

// badByte is the line and column (1-based) of the first byte that is not UTF-8 text YAML takes
// (invalid UTF-8, or a control character other than tab, newline and carriage return); 0, 0
// when there is none.
func badByte(data []byte) (line, col int) {
	line, col = 1, 1
	for len(data) > 0 {
		r, n := utf8.DecodeRune(data)
		switch {
		case r == utf8.RuneError && n <= 1, r < 0x20 && r != '\t' && r != '\n' && r != '\r', r == 0x7f:
			return line, col
		case r == '\n':
			line, col = line+1, 1
		default:
			col++
		}
		data = data[n:]
	}
	return 0, 0
}

func (p *parser) parse(data []byte) *Flow {
	p.data = data
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			p.problems = append(p.problems, Problem{File: p.file, Line: 1, Msg: "flow file is empty"})
		} else {
			p.syntax(err)
		}
		return nil
	}
	var next yaml.Node
	if err := dec.Decode(&next); err == nil {
		p.errorf(&next, "a flow file holds one YAML document, found a second")
	} else if !errors.Is(err, io.EOF) {
		p.syntax(err)
	}
	if len(doc.Content) == 0 {
		p.errorf(&doc, "flow file is empty")
		return nil
	}
	root := deref(doc.Content[0])
	f := &Flow{Prompts: map[string]graph.MediaPrompt{}, Menus: map[string]*Menu{}, Queues: map[string]*Queue{}}
	fs, _ := p.object(root, "", flowKeys)

	if f.Name = p.str(fs["name"], "name"); missing(fs["name"]) {
		p.errorf(at(fs["name"], root), "name is required")
	}
	p.prompts(f, fs["prompts"])
	f.Greeting = p.ref(refPrompt, fs["greeting"], "greeting")
	if f.Start = p.ref(refMenu, fs["start"], "start"); missing(fs["start"]) {
		p.errorf(at(fs["start"], root), "start is required: the id of the first menu")
	}
	if menus, ok := p.mapping(fs["menus"].val, "menus"); ok && len(menus) == 0 && !misspelt(fs["menus"]) {
		p.errorf(at(fs["menus"], root), "menus: at least one menu is required")
	} else {
		for _, e := range menus {
			if id, ok := p.id(e, "menus"); ok {
				f.Menus[id] = p.menu(id, e)
			}
		}
	}
	queues, _ := p.mapping(fs["queues"].val, "queues")
	for _, e := range queues {
		if id, ok := p.id(e, "queues"); ok {
			f.Queues[id] = p.queue(id, e)
		}
	}
	p.resolve(f)
	p.cycles(f)
	p.commentedKeys()
	return f
}

// hashKeyRE matches a line that is an option for the # key written without quotes, which YAML
// reads as a comment: `#: {queue: sales}`.
var hashKeyRE = regexp.MustCompile(`^(\s*)#\s*:\s*\{\s*(menu|queue|transfer|disconnect)\s*:`)

// commentedKeys reports options for the # key that YAML took for comments: the option would be
// lost without a word, and callers pressing # would hear the invalid-key prompt.
func (p *parser) commentedKeys() {
	for i, line := range strings.Split(string(p.data), "\n") {
		if m := hashKeyRE.FindStringSubmatch(line); m != nil {
			p.problems = append(p.problems, Problem{File: p.file, Line: i + 1, Column: len(m[1]) + 1,
				Msg: `an option for the # key is read as a comment in YAML: quote the key ("#": ...)`})
		}
	}
}

// cycles reports menus whose fallbacks lead back to themselves and queues whose on-timeouts do:
// a caller who never presses a valid key would go round the menus forever, one nobody answers
// round the queues, and max-wait would never end the wait. A chain must end in a queue, a
// transfer or a disconnect. Each cycle is reported once, at its first member by id.
func (p *parser) cycles(f *Flow) {
	next := func(id string, menus bool) (string, bool) {
		if menus {
			if m := f.Menus[id]; m != nil && m.Fallback.Kind == ActionMenu {
				return m.Fallback.Target, true
			}
			return "", false
		}
		if q := f.Queues[id]; q != nil && q.MaxWait > 0 && q.OnTimeout.Kind == ActionQueue {
			return q.OnTimeout.Target, true
		}
		return "", false
	}
	for _, menus := range []bool{true, false} {
		nodes, what, via := p.fallbacks, "menus", "fallback"
		if !menus {
			nodes, what, via = p.overflows, "queues", "on-timeout"
		}
		for _, id := range slices.Sorted(maps.Keys(nodes)) {
			chain := []string{id}
			for cur := id; ; {
				n, ok := next(cur, menus)
				if !ok || slices.Contains(chain[1:], n) {
					break
				}
				if n == id {
					if slices.Min(chain) == id {
						p.errorf(nodes[id], "%s.%s.%s: leads back to %s through %s %s: a caller could go round them forever; end the chain with a queue, a transfer or a disconnect",
							what, id, via, id, what, strings.Join(chain[1:], ", "))
					}
					break
				}
				chain, cur = append(chain, n), n
			}
		}
	}
}

func (p *parser) prompts(f *Flow, fl field) {
	entries, _ := p.mapping(fl.val, "prompts")
	byResource := map[string]*yaml.Node{} // resource id -> the uri node of its first prompt
	for _, e := range entries {
		id, ok := p.id(e, "prompts")
		if !ok {
			continue
		}
		path := "prompts." + id
		if v := deref(e.val); v != nil && v.Kind == yaml.ScalarNode && !isNull(v) {
			// the URL alone: say how to write it, once (the prompt stays known to what plays it)
			p.errorf(v, "%s: want a mapping such as {uri: %s}, got a string", path, v.Value)
			f.Prompts[id] = graph.MediaPrompt{URI: v.Value, ResourceID: id}
			continue
		}
		fs, _ := p.object(e.val, path, promptKeys)
		uri := p.str(fs["uri"], path+".uri")
		if missing(fs["uri"]) {
			p.errorf(at(fs["uri"], e.key), "%s: uri is required", path)
		} else if msg := checkURI(uri); uri != "" && msg != "" {
			p.errorf(fs["uri"].val, "%s.uri: %s", path, msg)
		}
		rid := p.str(fs["resource-id"], path+".resource-id")
		if rid == "" {
			rid = id
		}
		if first, ok := byResource[rid]; ok && uri != "" && first.Value != uri {
			p.errorf(at(fs["resource-id"], e.key), "%s: resource id %q is already used for %s (line %d): Graph would play the wrong audio from its cache", path, rid, first.Value, first.Line)
		} else if !ok && uri != "" {
			byResource[rid] = fs["uri"].val
		}
		f.Prompts[id] = graph.MediaPrompt{URI: uri, ResourceID: rid}
	}
}

func checkURI(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Sprintf("%q is not a valid URL", s)
	}
	if u.Scheme != "https" {
		return fmt.Sprintf("%q: want an https URL (Graph fetches service-hosted media over https only)", s)
	}
	if u.Host == "" {
		return fmt.Sprintf("%q has no host", s)
	}
	return ""
}

func (p *parser) menu(id string, e field) *Menu {
	path := "menus." + id
	m := &Menu{ID: id, Timeout: DefaultTimeout, Retries: DefaultRetries, Fallback: Action{Kind: ActionDisconnect}}
	fs, _ := p.object(e.val, path, menuKeys)
	if m.Prompt = p.ref(refPrompt, fs["prompt"], path+".prompt"); missing(fs["prompt"]) {
		p.errorf(at(fs["prompt"], e.key), "%s: prompt is required", path)
	}
	if fl := fs["timeout"]; fl.val != nil {
		if d, ok := p.duration(fl, path+".timeout"); ok {
			if d < MinTimeout || d > MaxTimeout {
				p.errorf(fl.val, "%s.timeout: %s is out of range %gs-%gs", path, fl.val.Value, MinTimeout.Seconds(), MaxTimeout.Seconds())
			} else {
				m.Timeout = d
			}
		}
	}
	if fl := fs["retries"]; fl.val != nil {
		if n, ok := p.int(fl, path+".retries"); ok {
			if n < 0 || n > MaxRetries {
				p.errorf(fl.val, "%s.retries: %d is out of range 0-%d", path, n, MaxRetries)
			} else {
				m.Retries = n
			}
		}
	}
	m.Invalid = p.ref(refPrompt, fs["invalid"], path+".invalid")
	m.NoInput = p.ref(refPrompt, fs["no-input"], path+".no-input")

	opath := path + ".options"
	options, ok := p.mapping(fs["options"].val, opath)
	if ok && len(options) == 0 && !misspelt(fs["options"]) {
		p.errorf(at(fs["options"], e.key), "%s: at least one option is required", opath)
	}
	m.Options = make(map[string]Action, len(options))
	for _, o := range options {
		k := o.key.Value
		if len(k) != 1 || !strings.Contains("0123456789*#", k) {
			p.errorf(o.key, "%s: key %q is not one of 0-9, * or # (quote * and # in YAML)", opath, k)
			continue
		}
		m.Options[k] = p.action(o, opath+"."+k, true)
	}
	if fl := fs["fallback"]; fl.val != nil {
		m.Fallback = p.action(fl, path+".fallback", true)
		if m.Fallback.Kind == ActionNone {
			m.Fallback = Action{Kind: ActionDisconnect} // already reported
		}
		if m.Fallback.Kind == ActionMenu && m.Fallback.Target == id {
			p.errorf(fl.val, "%s.fallback: names its own menu, so callers could never leave it", path)
		} else if m.Fallback.Kind == ActionMenu {
			if p.fallbacks == nil {
				p.fallbacks = map[string]*yaml.Node{}
			}
			p.fallbacks[id] = fl.val
		}
	}
	return m
}

func (p *parser) queue(id string, e field) *Queue {
	path := "queues." + id
	q := &Queue{ID: id, OnTimeout: Action{Kind: ActionDisconnect}}
	fs, _ := p.object(e.val, path, queueKeys)
	if q.Name = p.str(fs["name"], path+".name"); q.Name == "" {
		q.Name = id
	}
	q.Welcome = p.ref(refPrompt, fs["welcome"], path+".welcome")
	if q.Hold = p.ref(refPrompt, fs["hold"], path+".hold"); missing(fs["hold"]) {
		p.errorf(at(fs["hold"], e.key), "%s: hold is required: the prompt looped while callers wait", path)
	}
	maxWaitOK := true
	if fl := fs["max-wait"]; fl.val != nil {
		d, ok := p.duration(fl, path+".max-wait")
		switch {
		case !ok:
			maxWaitOK = false
		case d < 0:
			p.errorf(fl.val, "%s.max-wait: %s is negative: use 0 for no limit", path, fl.val.Value)
			maxWaitOK = false
		case d > 0 && (d < MinMaxWait || d > MaxMaxWait):
			// a caller passed on (or hung up) before a hold prompt could play is a typo's doing
			p.errorf(fl.val, "%s.max-wait: %s is not between %s and %s (0: no limit)", path, fl.val.Value, MinMaxWait, MaxMaxWait)
			maxWaitOK = false
		default:
			q.MaxWait = d
		}
	}
	if fl := fs["on-timeout"]; fl.val != nil {
		a := p.action(fl, path+".on-timeout", false)
		switch {
		case a.Kind == ActionNone:
			// reported by action
		case a.Kind == ActionQueue && a.Target == id:
			p.errorf(fl.val, "%s.on-timeout: names its own queue", path)
		case q.MaxWait == 0 && maxWaitOK:
			p.errorf(fl.key, "%s.on-timeout: has no effect without max-wait", path)
		default:
			q.OnTimeout = a
			if a.Kind == ActionQueue {
				if p.overflows == nil {
					p.overflows = map[string]*yaml.Node{}
				}
				p.overflows[id] = fl.val
			}
		}
	}

	q.Handoff = HandoffTransfer
	if fl := fs["handoff"]; fl.val != nil {
		switch h := Handoff(p.str(fl, path+".handoff")); h {
		case HandoffTransfer, HandoffInvite:
			q.Handoff = h
		case "":
			// reported by str
		default:
			p.errorf(fl.val, "%s.handoff: %q is neither transfer nor invite", path, h)
		}
	}
	if fl := fs["wrap-up"]; fl.val != nil {
		if d, ok := p.duration(fl, path+".wrap-up"); ok {
			switch {
			case d < 0 || d > 10*time.Minute:
				p.errorf(fl.val, "%s.wrap-up: %s is not between 0s and 10m", path, fl.val.Value)
			case q.Handoff != HandoffInvite:
				p.errorf(fl.key, "%s.wrap-up: has no effect without handoff: invite (after a transfer callbot cannot see the conversation end)", path)
			default:
				q.WrapUp = d
			}
		}
	}

	apath := path + ".agents"
	agents, ok := p.sequence(fs["agents"].val, apath)
	if ok && len(agents) == 0 && !misspelt(fs["agents"]) {
		p.errorf(at(fs["agents"], e.key), "%s: at least one agent is required", apath)
	}
	seen := map[string]*yaml.Node{}
	for _, n := range agents {
		a := p.str(field{val: n}, apath)
		switch {
		case n.Kind != yaml.ScalarNode:
			// reported by str
		case !guidRE.MatchString(a):
			p.errorf(n, "%s: %q is not an Entra object id (GUID)", apath, a)
		case seen[strings.ToLower(a)] != nil:
			p.errorf(n, "%s: agent %s is listed twice (first at line %d)", apath, a, seen[strings.ToLower(a)].Line)
		default:
			a = strings.ToLower(a)
			seen[a] = n
			q.Agents = append(q.Agents, a)
		}
	}
	return q
}

// action decodes an action mapping such as {queue: sales}. It returns the zero Action after
// reporting a problem.
func (p *parser) action(e field, path string, menuAllowed bool) Action {
	fs, clean := p.object(e.val, path, actionKeys)
	var kinds []string
	for _, k := range actionKeys {
		if fs[k].val != nil {
			kinds = append(kinds, k)
		}
	}
	switch {
	case len(kinds) == 0:
		if clean { // otherwise the stray key or the wrong type is the problem to report
			p.errorf(e.key, "%s: no action: want one of menu, queue, transfer or disconnect", path)
		}
		return Action{}
	case len(kinds) > 1:
		p.errorf(e.key, "%s: several actions (%s): want exactly one", path, strings.Join(kinds, ", "))
		return Action{}
	}
	k := kinds[0]
	fl, vpath := fs[k], path+"."+k
	switch k {
	case "menu":
		if !menuAllowed {
			p.errorf(fl.key, "%s: a menu is not allowed here: want queue, transfer or disconnect", path)
			return Action{}
		}
		if t := p.ref(refMenu, fl, vpath); t != "" {
			return Action{Kind: ActionMenu, Target: t}
		}
		p.errorf(fl.key, "%s: want a menu id", vpath)
	case "queue":
		if t := p.ref(refQueue, fl, vpath); t != "" {
			return Action{Kind: ActionQueue, Target: t}
		}
		p.errorf(fl.key, "%s: want a queue id", vpath)
	case "transfer":
		t := p.str(fl, vpath)
		switch {
		case guidRE.MatchString(t):
			return Action{Kind: ActionTransfer, Target: strings.ToLower(t)}
		case e164RE.MatchString(t):
			return Action{Kind: ActionTransfer, Target: t}
		case fl.val.Kind == yaml.ScalarNode:
			p.errorf(fl.val, "%s: %q is neither a user object id (GUID) nor an E.164 number (+ and 8-15 digits)", vpath, t)
		}
	case "disconnect":
		if v := fl.val; v.Kind == yaml.ScalarNode && v.ShortTag() == "!!bool" {
			if b, _ := strconv.ParseBool(v.Value); b {
				return Action{Kind: ActionDisconnect}
			}
		} else if t := p.ref(refPrompt, fl, vpath); t != "" {
			return Action{Kind: ActionDisconnect, Prompt: t}
		} else if v.Kind != yaml.ScalarNode {
			return Action{} // reported by str
		}
		p.errorf(fl.val, "%s: want a prompt id to play before hanging up, or true for none", vpath)
	}
	return Action{}
}

// resolve checks every id used against the ids defined.
func (p *parser) resolve(f *Flow) {
	for _, r := range p.refs {
		var ok bool
		var what string
		var known []string
		switch r.kind {
		case refPrompt:
			_, ok = f.Prompts[r.id]
			what, known = "prompt", keys(f.Prompts)
		case refMenu:
			_, ok = f.Menus[r.id]
			what, known = "menu", keys(f.Menus)
		case refQueue:
			_, ok = f.Queues[r.id]
			what, known = "queue", keys(f.Queues)
		}
		if !ok {
			p.errorf(r.node, "%s: unknown %s %q%s", r.path, what, r.id, suggest(r.id, known))
		}
	}
}

// mapping returns the entries of mapping n in file order. A missing or null n is an empty
// mapping; anything else but a mapping is reported and gives false.
func (p *parser) mapping(n *yaml.Node, path string) ([]field, bool) {
	n = deref(n)
	if n == nil || isNull(n) {
		return nil, true
	}
	if n.Kind != yaml.MappingNode {
		p.errorf(n, "%s: want a mapping, got %s", orTop(path), describe(n))
		return nil, false
	}
	var out []field
	seen := map[string]*yaml.Node{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := deref(n.Content[i]), deref(n.Content[i+1])
		if k.Kind != yaml.ScalarNode {
			p.errorf(k, "%s: a key must be a plain value, got %s", orTop(path), describe(k))
			continue
		}
		if k.ShortTag() == "!!merge" {
			p.errorf(k, "%s: merge keys (<<) are not supported", orTop(path))
			continue
		}
		if first := seen[k.Value]; first != nil {
			p.errorf(k, "%s: key %q is defined twice (first at line %d)", orTop(path), k.Value, first.Line)
			continue
		}
		seen[k.Value] = k
		out = append(out, field{key: k, val: v})
	}
	return out, true
}

// object is mapping for a mapping with a fixed set of keys; the result is indexed by key.
// clean is false when n was not a mapping or held unknown keys.
func (p *parser) object(n *yaml.Node, path string, known []string) (fs map[string]field, clean bool) {
	entries, clean := p.mapping(n, path)
	fs = make(map[string]field, len(entries))
	for _, e := range entries {
		if !slices.Contains(known, e.key.Value) {
			s := closest(e.key.Value, known)
			p.errorf(e.key, "%s: unknown key %q%s", orTop(path), e.key.Value, didYouMean(s))
			if _, ok := fs[s]; s != "" && !ok {
				fs[s] = field{key: e.key} // misspelt
			}
			clean = false
			continue
		}
		fs[e.key.Value] = e
	}
	return fs, clean
}

func (p *parser) sequence(n *yaml.Node, path string) ([]*yaml.Node, bool) {
	n = deref(n)
	if n == nil || isNull(n) {
		return nil, true
	}
	if n.Kind != yaml.SequenceNode {
		p.errorf(n, "%s: want a list, got %s", path, describe(n))
		return nil, false
	}
	out := make([]*yaml.Node, len(n.Content))
	for i, c := range n.Content {
		out[i] = deref(c)
	}
	return out, true
}

// str returns the scalar value of fl, "" when absent or null.
func (p *parser) str(fl field, path string) string {
	n := fl.val
	if n == nil || isNull(n) {
		return ""
	}
	if n.Kind != yaml.ScalarNode {
		p.errorf(n, "%s: want a single value, got %s", path, describe(n))
		return ""
	}
	return n.Value
}

// ref records a use of an id, to be checked by resolve, and returns the id.
func (p *parser) ref(kind refKind, fl field, path string) string {
	id := p.str(fl, path)
	if id != "" {
		p.refs = append(p.refs, ref{kind: kind, id: id, node: fl.val, path: path})
	}
	return id
}

// id returns the key of a mapping entry that defines something with an id.
func (p *parser) id(e field, path string) (string, bool) {
	if strings.TrimSpace(e.key.Value) == "" || isNull(e.key) {
		p.errorf(e.key, "%s: an id must not be empty", path)
		return "", false
	}
	return e.key.Value, true
}

func (p *parser) duration(fl field, path string) (time.Duration, bool) {
	s := p.str(fl, path)
	if fl.val.Kind != yaml.ScalarNode {
		return 0, false
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		p.errorf(fl.val, "%s: %q is not a duration: want a number with a unit, like 5s or 10m", path, s)
		return 0, false
	}
	return d, true
}

func (p *parser) int(fl field, path string) (int, bool) {
	s := p.str(fl, path)
	if fl.val.Kind != yaml.ScalarNode {
		return 0, false
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		p.errorf(fl.val, "%s: %q is not a whole number", path, s)
		return 0, false
	}
	return n, true
}

// deref follows aliases to the node they name.
func deref(n *yaml.Node) *yaml.Node {
	for n != nil && n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool { return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" }

func describe(n *yaml.Node) string {
	switch {
	case n.Kind == yaml.MappingNode:
		return "a mapping"
	case n.Kind == yaml.SequenceNode:
		return "a list"
	case isNull(n):
		return "nothing"
	}
	return strconv.Quote(n.Value)
}

// at is where to report a problem about fl: its key, or def when fl is absent.
func at(fl field, def *yaml.Node) *yaml.Node {
	if fl.key != nil {
		return fl.key
	}
	return def
}

func orTop(path string) string {
	if path == "" {
		return "flow"
	}
	return path
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// suggest returns ` (did you mean "x"?)` for the known word closest to s, if one is close.
func suggest(s string, known []string) string { return didYouMean(closest(s, known)) }

func didYouMean(s string) string {
	if s == "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", s)
}

// closest returns the known word at most 2 edits from s (and not made up of edits), or "".
func closest(s string, known []string) string {
	best, bestDist := "", 3
	for _, k := range known {
		if d := distance(s, k); d < bestDist && d < len(k) {
			best, bestDist = k, d
		}
	}
	return best
}

// distance is the Levenshtein distance between a and b.
func distance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
