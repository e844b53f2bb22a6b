package main

import (
	"bytes"
	"go/ast"
	"go/parser"
	"go/token"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// The documentation and the deployment files name what the binary reads and writes; these tests
// keep them true where a mistake is cheap to see: the variables and their defaults, the flow the
// Kubernetes manifests ship, and the metrics (with the outcomes a call can end with).

// TestDocsNameEveryVariable: the README's configuration table, the list in compose.yaml and the
// Kubernetes ConfigMap name every variable of envVars, with its default where they show one.
func TestDocsNameEveryVariable(t *testing.T) {
	known := map[string]string{}
	for _, e := range envVars {
		known[e.name] = e.def
	}

	// README: | `CALLBOT_X` | default | meaning |
	readme := readDoc(t, "../../README.md")
	row := regexp.MustCompile("(?m)^\\| `(CALLBOT_[A-Z_]+)` \\|([^|]*)\\|")
	inTable := map[string]string{}
	for _, m := range row.FindAllStringSubmatch(readme, -1) {
		inTable[m[1]] = strings.TrimSpace(m[2])
	}
	for _, name := range slices.Sorted(maps.Keys(known)) {
		cell, ok := inTable[name]
		switch def := known[name]; {
		case !ok:
			t.Errorf("README.md: the configuration table has no row for %s", name)
		case def != "" && cell != "`"+def+"`":
			t.Errorf("README.md: %s default %s, want `%s`", name, cell, def)
		}
	}
	for name := range inTable {
		if _, ok := known[name]; !ok {
			t.Errorf("README.md documents %s, which callbot serve does not read", name)
		}
	}

	// compose.yaml: the commented .env, "#   CALLBOT_X=default"; CALLBOT_REDIS_URL is set by the
	// compose file itself.
	compose := readDoc(t, "../../deployments/compose.yaml")
	for _, name := range slices.Sorted(maps.Keys(known)) {
		if name == "CALLBOT_REDIS_URL" {
			if !strings.Contains(compose, "CALLBOT_REDIS_URL: ") {
				t.Errorf("deployments/compose.yaml does not set CALLBOT_REDIS_URL")
			}
			continue
		}
		m := regexp.MustCompile(`(?m)^#\s+` + name + `=(.*)$`).FindStringSubmatch(compose)
		switch def := known[name]; {
		case m == nil:
			t.Errorf("deployments/compose.yaml: the list of variables lacks %s", name)
		case def != "" && m[1] != def && !required(name):
			t.Errorf("deployments/compose.yaml: %s=%s, want its default %s", name, m[1], def)
		}
	}

	// configmap.yaml: "  CALLBOT_X: value" or "  # CALLBOT_X: value"; the secret comes from the
	// Secret, through deployment.yaml.
	cm := readDoc(t, "../../deployments/kubernetes/configmap.yaml")
	dep := readDoc(t, "../../deployments/kubernetes/deployment.yaml")
	for _, name := range slices.Sorted(maps.Keys(known)) {
		if name == "CALLBOT_CLIENT_SECRET" {
			if !strings.Contains(dep, "name: "+name) {
				t.Errorf("deployments/kubernetes/deployment.yaml does not set %s", name)
			}
			continue
		}
		m := regexp.MustCompile(`(?m)^  (?:# )?` + name + `: (.*)$`).FindStringSubmatch(cm)
		if m == nil {
			t.Errorf("deployments/kubernetes/configmap.yaml does not name %s", name)
			continue
		}
		v := strings.TrimSpace(m[1])
		if u, err := strconv.Unquote(v); err == nil {
			v = u
		}
		if def := known[name]; def != "" && !strings.HasPrefix(v, "(") && v != def && !required(name) &&
			name != "CALLBOT_REDIS_REPLICAS" { // shown as the value to set, commented out
			t.Errorf("deployments/kubernetes/configmap.yaml: %s: %s, want its default %s", name, v, def)
		}
	}
}

func required(name string) bool {
	return slices.Contains([]string{"CALLBOT_PUBLIC_URL", "CALLBOT_TENANT_ID", "CALLBOT_CLIENT_ID", "CALLBOT_REDIS_URL", "CALLBOT_FLOW_FILE"}, name)
}

// TestKubernetesFlowIsTheExample: the ConfigMap callbot-flow says it is a copy of
// deployments/examples/flow.yaml (docs/deployment.md too); it had fallen behind (its support
// queue handed callers off by blind transfer, the example's by invite).
func TestKubernetesFlowIsTheExample(t *testing.T) {
	example, err := os.ReadFile("../../deployments/examples/flow.yaml")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile("../../deployments/kubernetes/configmap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	var found bool
	for {
		var doc struct {
			Kind     string                `yaml:"kind"`
			Metadata struct{ Name string } `yaml:"metadata"`
			Data     map[string]string     `yaml:"data"`
		}
		if err := dec.Decode(&doc); err != nil {
			break
		}
		if doc.Kind != "ConfigMap" || doc.Metadata.Name != "callbot-flow" {
			continue
		}
		found = true
		if got := doc.Data["flow.yaml"]; got != string(example) {
			t.Errorf("deployments/kubernetes/configmap.yaml: flow.yaml of ConfigMap callbot-flow is not a copy of deployments/examples/flow.yaml:\n%s",
				firstDifference(got, string(example)))
		}
	}
	if !found {
		t.Fatal("deployments/kubernetes/configmap.yaml has no ConfigMap callbot-flow")
	}
}

func firstDifference(got, want string) string {
	g, w := strings.Split(got, "\n"), strings.Split(want, "\n")
	for i := range max(len(g), len(w)) {
		var a, b string
		if i < len(g) {
			a = g[i]
		}
		if i < len(w) {
			b = w[i]
		}
		if a != b {
			return "line " + strconv.Itoa(i+1) + ": ConfigMap " + strconv.Quote(a) + ", example " + strconv.Quote(b)
		}
	}
	return "(same lines)"
}

// TestOpenAPIListsEveryMetric: every metric GET /metrics writes is named in api/openapi.yaml,
// and the outcomes listed for callbot_calls_ended_total are exactly those a call can end with.
func TestOpenAPIListsEveryMetric(t *testing.T) {
	doc := readDoc(t, openAPIFile)
	src := readDoc(t, "metrics.go")
	names := regexp.MustCompile(`"(callbot_[a-z_]+)"|# (?:HELP|TYPE) (callbot_[a-z_]+) `).FindAllStringSubmatch(src, -1)
	if len(names) == 0 {
		t.Fatal("metrics.go names no callbot_ metric; has writeMetrics moved?")
	}
	for _, m := range names {
		name := m[1] + m[2]
		if !strings.Contains(doc, "`"+name+"`") && !strings.Contains(doc, "`"+name+"{") {
			t.Errorf("%s does not name the metric %s", openAPIFile, name)
		}
	}

	m := regexp.MustCompile("`callbot_calls_ended_total\\{outcome\\}` \\(([^)]*)\\)").FindStringSubmatch(doc)
	if m == nil {
		t.Fatalf("%s: no list of outcomes after `callbot_calls_ended_total{outcome}`", openAPIFile)
	}
	var listed []string
	for _, o := range strings.Split(m[1], ",") {
		listed = append(listed, strings.Join(strings.Fields(o), " "))
	}
	slices.Sort(listed)
	if produced := producedOutcomes(t); !slices.Equal(listed, produced) {
		t.Errorf("%s lists the outcomes %v; calls end with %v (internal/callstate)", openAPIFile, listed, produced)
	}
}

// producedOutcomes returns the values of the Outcome constants of internal/callstate that its
// code assigns (a constant defined and never assigned is no outcome a call ends with).
func producedOutcomes(t *testing.T) []string {
	t.Helper()
	dir := "../../internal/callstate"
	files, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	values := map[string]string{} // constant -> value
	used := map[string]bool{}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(af, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.ValueSpec:
				for i, id := range n.Names {
					if strings.HasPrefix(id.Name, "Outcome") && i < len(n.Values) {
						if lit, ok := n.Values[i].(*ast.BasicLit); ok && lit.Kind == token.STRING {
							values[id.Name], _ = strconv.Unquote(lit.Value)
						}
					}
				}
			case *ast.AssignStmt:
				for _, r := range n.Rhs {
					if id, ok := r.(*ast.Ident); ok && strings.HasPrefix(id.Name, "Outcome") {
						used[id.Name] = true
					}
				}
			}
			return true
		})
	}
	if len(values) == 0 {
		t.Fatal("internal/callstate defines no Outcome constant; have they moved?")
	}
	var out []string
	for name := range used {
		if v, ok := values[name]; ok {
			out = append(out, v)
		}
	}
	slices.Sort(out)
	return out
}

func readDoc(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
