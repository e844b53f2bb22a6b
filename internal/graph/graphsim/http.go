package graphsim

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"
)

// routes lists every endpoint the simulator serves.
func (s *Sim) routes() http.Handler {
	mux := http.NewServeMux()
	// Entra ID (MSAL, client credentials).
	mux.HandleFunc("GET /{tenant}/v2.0/.well-known/openid-configuration", s.handleOpenIDConfig)
	mux.HandleFunc("POST /{tenant}/oauth2/v2.0/token", s.handleToken)
	mux.HandleFunc("GET /{tenant}/discovery/v2.0/keys", s.handleTokenKeys)
	// Calling platform's callback-token metadata.
	mux.HandleFunc("GET /botauth/.well-known/OpenIdConfiguration", s.handleBotAuthConfig)
	mux.HandleFunc("GET /botauth/keys", s.handleBotAuthKeys)
	// Graph.
	mux.HandleFunc("POST /v1.0/communications/calls/{id}/{action}", s.graph(s.handleCallAction))
	mux.HandleFunc("POST /v1.0/communications/calls/{id}/participants/invite", s.graph(s.handleInvite))
	mux.HandleFunc("GET /v1.0/communications/calls/{id}", s.graph(s.handleGetCall))
	mux.HandleFunc("GET /v1.0/communications/calls/{id}/participants", s.graph(s.handleParticipants))
	mux.HandleFunc("DELETE /v1.0/communications/calls/{id}", s.graph(s.handleDeleteCall))
	mux.HandleFunc("POST /v1.0/communications/calls", s.graph(s.handleCreateCall))
	mux.HandleFunc("POST /v1.0/communications/getPresencesByUserId", s.graph(s.handlePresences))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.graphError(w, r, http.StatusNotFound, "NotFound", "graphsim does not serve "+r.Method+" "+r.URL.Path)
	})
	top := http.NewServeMux()
	top.Handle(ControlPrefix, s.control())
	top.Handle("/", s.middleware(mux))
	return top
}

type reqInfoKey struct{}

// reqInfo is what the middleware and the handler share about one request.
type reqInfo struct {
	index           int
	requestID       string
	clientRequestID string
	action          string
	callID          string
}

func reqInfoFrom(r *http.Request) *reqInfo {
	if i, ok := r.Context().Value(reqInfoKey{}).(*reqInfo); ok {
		return i
	}
	return &reqInfo{index: -1}
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// middleware gives every response a request-id (and echoes client-request-id), decodes gzip
// bodies and records the request.
func (s *Sim) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		info := &reqInfo{requestID: newID(), clientRequestID: r.Header.Get("client-request-id")}
		w.Header().Set("request-id", info.requestID)
		if info.clientRequestID != "" {
			w.Header().Set("client-request-id", info.clientRequestID)
		}
		r = r.WithContext(context.WithValue(r.Context(), reqInfoKey{}, info))
		body, err := readBody(r)
		rec := Request{
			Time: time.Now(), Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery,
			Header: r.Header.Clone(), Body: body, RequestID: info.requestID,
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			s.graphError(w, r, http.StatusServiceUnavailable, "ServiceUnavailable", "graphsim is shutting down.")
			return
		}
		s.handlers.Add(1)
		defer s.handlers.Done()
		info.index = len(s.requests)
		s.requests = append(s.requests, rec)
		s.mu.Unlock()

		sw := &statusWriter{ResponseWriter: w}
		if err != nil {
			s.graphError(sw, r, http.StatusBadRequest, "BadRequest", "unreadable body: "+err.Error())
		} else {
			r.Body = io.NopCloser(bytes.NewReader(body))
			r.ContentLength = int64(len(body))
			r.Header.Del("Content-Encoding")
			next.ServeHTTP(sw, r)
		}
		if sw.status == 0 {
			sw.status = http.StatusOK
		}
		s.mu.Lock()
		s.requests[info.index].Status = sw.status
		s.requests[info.index].Action = info.action
		s.requests[info.index].CallID = info.callID
		s.mu.Unlock()
		s.log.Debug("request", zap.String("method", r.Method), zap.String("path", r.URL.Path),
			zap.String("action", info.action), zap.String("call_id", info.callID),
			zap.Int("status", sw.status), zap.String("request_id", info.requestID))
	})
}

// graphHandler handles an authenticated Graph request. It names the action in info (for the
// request record and fault injection) before doing anything with effect.
type graphHandler func(w http.ResponseWriter, r *http.Request, info *reqInfo)

// graph wraps a Graph endpoint: bearer-token check, then the handler.
func (s *Sim) graph(h graphHandler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		info := reqInfoFrom(r)
		info.callID = r.PathValue("id")
		if err := s.authorize(r); err != nil {
			code, msg := "InvalidAuthenticationToken", "Access token validation failure. "+err.Error()
			if err == errNoBearer {
				msg = "Access token is empty."
			}
			s.graphError(w, r, http.StatusUnauthorized, code, msg)
			return
		}
		h(w, r, info)
	}
}

func errorCode(status int) string {
	switch status {
	case http.StatusBadRequest:
		return "BadRequest"
	case http.StatusUnauthorized:
		return "InvalidAuthenticationToken"
	case http.StatusForbidden:
		return "Forbidden"
	case http.StatusNotFound:
		return "NotFound"
	case http.StatusConflict:
		return "Conflict"
	case http.StatusTooManyRequests:
		return "TooManyRequests"
	case http.StatusServiceUnavailable:
		return "ServiceUnavailable"
	case http.StatusGatewayTimeout:
		return "GatewayTimeout"
	}
	if status >= 500 {
		return "InternalServerError"
	}
	return "BadRequest"
}

func setRetryAfter(w http.ResponseWriter, d time.Duration) {
	if d > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(int((d+time.Second-1)/time.Second)))
	}
}

// graphError writes a Graph error body (learn.microsoft.com/graph/errors).
func (s *Sim) graphError(w http.ResponseWriter, r *http.Request, status int, code, msg string) {
	info := reqInfoFrom(r)
	crid := info.clientRequestID
	if crid == "" {
		crid = info.requestID // Graph does the same when the client sent none
	}
	inner := map[string]string{
		"date":              time.Now().UTC().Format("2006-01-02T15:04:05"),
		"request-id":        info.requestID,
		"client-request-id": crid,
	}
	writeJSON(w, status, map[string]any{"error": map[string]any{
		"code": code, "message": msg, "innerError": inner,
	}})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}
