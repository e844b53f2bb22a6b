package main

import (
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/go-chi/chi/v5"
	"go.uber.org/zap"
	"go.yaml.in/yaml/v3"
)

const openAPIFile = "../../api/openapi.yaml"

// webhookStatuses maps every http.Status constant the webhook handler may write to its code.
// TestOpenAPIMatchesRoutes reads internal/graph/webhook.go and fails on a constant missing here,
// so a new status code cannot ship undocumented.
var webhookStatuses = map[string]string{
	"StatusAccepted":              "202",
	"StatusNoContent":             "204",
	"StatusBadRequest":            "400",
	"StatusUnauthorized":          "401",
	"StatusForbidden":             "403",
	"StatusRequestEntityTooLarge": "413",
	"StatusInternalServerError":   "500",
	"StatusServiceUnavailable":    "503",
}

type openAPIDoc struct {
	OpenAPI string                          `yaml:"openapi"`
	Paths   map[string]map[string]yaml.Node `yaml:"paths"`
}

type openAPIOperation struct {
	Responses map[string]yaml.Node `yaml:"responses"`
}

var httpMethods = []string{"get", "put", "post", "delete", "options", "head", "patch", "trace"}

// TestOpenAPIMatchesRoutes keeps api/openapi.yaml true: the routes it documents are exactly the
// routes the production router serves, and the webhook's every status code is documented.
func TestOpenAPIMatchesRoutes(t *testing.T) {
	raw, err := os.ReadFile(openAPIFile)
	if err != nil {
		t.Fatal(err)
	}
	var doc openAPIDoc
	if err := yaml.Unmarshal(raw, &doc); err != nil {
		t.Fatalf("%s: %v", openAPIFile, err)
	}
	if !strings.HasPrefix(doc.OpenAPI, "3.1") {
		t.Errorf("%s: openapi %q, want 3.1.x", openAPIFile, doc.OpenAPI)
	}

	documented := map[string]openAPIOperation{}
	for path, item := range doc.Paths {
		if _, ok := item["$ref"]; ok {
			t.Errorf("%s: path %s is a $ref; write its operations out so this test can see them", openAPIFile, path)
		}
		for key, node := range item {
			if !slices.Contains(httpMethods, key) {
				continue
			}
			var op openAPIOperation
			if err := node.Decode(&op); err != nil {
				t.Fatalf("%s: %s %s: %v", openAPIFile, key, path, err)
			}
			documented[strings.ToUpper(key)+" "+path] = op
		}
	}

	// The router exactly as production builds it. routes() only reads the logger and the
	// metrics while building; the other dependencies are used when a request arrives.
	b := &bot{deps: botDeps{Log: zap.NewNop()}, metrics: newMetrics()}
	h := b.routes()
	routes, ok := h.(chi.Routes)
	if !ok {
		t.Fatalf("routes() returned %T, not a chi.Routes", h)
	}
	served := map[string]bool{}
	err = chi.Walk(routes, func(method, route string, _ http.Handler, _ ...func(http.Handler) http.Handler) error {
		if r, ok := strings.CutSuffix(route, "/*"); ok {
			route = r + "/{hint}" // the catch-all suffix is documented as the {hint} parameter
		}
		served[method+" "+route] = true
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(served) == 0 {
		t.Fatal("chi.Walk found no routes")
	}

	for _, r := range slices.Sorted(maps.Keys(served)) {
		if _, ok := documented[r]; !ok {
			t.Errorf("route %s is served but not documented in %s", r, openAPIFile)
		}
	}
	for _, r := range slices.Sorted(maps.Keys(documented)) {
		if !served[r] {
			t.Errorf("%s documents %s, which routes() does not serve", openAPIFile, r)
		}
	}

	// Every status the webhook can write, for both webhook routes.
	used := webhookStatusConstants(t, "../../internal/graph/webhook.go")
	for _, name := range used {
		if _, ok := webhookStatuses[name]; !ok {
			t.Errorf("internal/graph/webhook.go writes http.%s: document it in %s and add it to webhookStatuses", name, openAPIFile)
		}
	}
	for _, r := range []string{"POST /api/calls", "POST /api/calls/{hint}"} {
		op, ok := documented[r]
		if !ok {
			continue // reported above
		}
		for _, name := range slices.Sorted(maps.Keys(webhookStatuses)) {
			code := webhookStatuses[name]
			if _, ok := op.Responses[code]; !ok {
				t.Errorf("%s: %s does not document response %s (http.%s)", openAPIFile, r, code, name)
			}
		}
		for code := range op.Responses {
			if !slices.Contains(slices.Collect(maps.Values(webhookStatuses)), code) {
				t.Errorf("%s: %s documents response %s, which the webhook never writes", openAPIFile, r, code)
			}
		}
	}
}

// webhookStatusConstants returns the names of the net/http Status constants a Go file uses.
func webhookStatusConstants(t *testing.T, file string) []string {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), file, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	ast.Inspect(f, func(n ast.Node) bool {
		sel, ok := n.(*ast.SelectorExpr)
		if !ok {
			return true
		}
		if x, ok := sel.X.(*ast.Ident); ok && x.Name == "http" && strings.HasPrefix(sel.Sel.Name, "Status") {
			seen[sel.Sel.Name] = true
		}
		return true
	})
	if len(seen) == 0 {
		t.Fatalf("%s uses no http.Status constant; has the webhook moved?", file)
	}
	return slices.Sorted(maps.Keys(seen))
}

// The 503 of the in-flight cap is the webhook's documented Unavailable answer: a JSON Error body
// with Retry-After. It was written with http.Error: text/plain, its JSON as plain text.
func TestWebhookOverloadAnswerIsDocumented(t *testing.T) {
	h := limitInFlight(0, http.HandlerFunc(func(http.ResponseWriter, *http.Request) { t.Error("served past the cap") }))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "/api/calls", strings.NewReader("{}")))
	var body map[string]string
	if rec.Code != http.StatusServiceUnavailable || rec.Header().Get("Retry-After") != "1" ||
		rec.Header().Get("Content-Type") != "application/json" || json.Unmarshal(rec.Body.Bytes(), &body) != nil || body["error"] == "" || len(body) != 1 {
		t.Errorf("overload answered %d, Retry-After %q, Content-Type %q, body %q; want 503, 1, application/json and the Error schema (api/openapi.yaml, Unavailable)",
			rec.Code, rec.Header().Get("Retry-After"), rec.Header().Get("Content-Type"), rec.Body.String())
	}
}
