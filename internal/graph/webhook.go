package graph

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Sink applies the notifications of one webhook request, in order. It returns after their
// effect on call state is durable; slow work (Graph commands) happens after it returns. An error
// wrapping ErrUnavailable makes the webhook answer 503 so Graph delivers the request again.
type Sink interface {
	Notify(ctx context.Context, tenantID string, ns []Notification) error
}

// ErrUnavailable marks a failure of callbot's own storage: the notification was not applied and
// should be sent again.
var ErrUnavailable = errors.New("temporarily unavailable")

// ErrWrongTenant marks a notification about a call of another tenant than the token's: the
// webhook answers 403 and the call is not changed.
var ErrWrongTenant = errors.New("call belongs to another tenant than the token")

// Authenticator verifies the bearer token of a webhook request.
type Authenticator interface {
	VerifyRequest(r *http.Request) (Claims, error)
}

// Webhook is the HTTP handler Graph posts call notifications to.
type Webhook struct {
	Auth    Authenticator
	Sink    Sink
	Log     *zap.Logger
	MaxBody int64         // default 1 MiB
	Timeout time.Duration // time allowed to apply a request's notifications; default 5s
}

func (h *Webhook) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// Graph's correlation headers go with every line about this request (built only when a line
	// is written: the accepted path logs nothing).
	log := func() *zap.Logger {
		return h.Log.With(zap.String("scenario_id", r.Header.Get("Scenario-Id")),
			zap.String("client_request_id", r.Header.Get("client-request-id")), zap.String("request_id", r.Header.Get("request-id")))
	}
	verifyStart := time.Now()
	claims, err := h.Auth.VerifyRequest(r)
	if waited := time.Since(verifyStart); waited > slowVerify && err == nil {
		// The token waited (for the signing keys): the server's read deadline, counted from the
		// request's start, may have passed with the body unread. Give the body its own time.
		http.NewResponseController(w).SetReadDeadline(time.Now().Add(bodyReadTime))
	}
	if errors.Is(err, ErrUnavailable) {
		log().Warn("webhook: token not verifiable yet, asking for a retry", zap.Error(err))
		w.Header().Set("Retry-After", "5")
		writeProblem(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	if err != nil {
		status := http.StatusForbidden
		if errors.Is(err, ErrNoToken) {
			// RFC 9110: a 401 names the scheme that would be accepted
			w.Header().Set("WWW-Authenticate", "Bearer")
			status = http.StatusUnauthorized
		}
		log().Warn("webhook: rejected token", zap.Error(err), zap.String("remote", r.RemoteAddr))
		writeProblem(w, status, err.Error())
		return
	}
	maxBody := h.MaxBody
	if maxBody <= 0 {
		maxBody = 1 << 20
	}
	bp := bodyPool.Get().(*[]byte)
	body := (*bp)[:0]
	if n := r.ContentLength; n >= int64(cap(body)) && n <= maxBody {
		body = make([]byte, 0, n+1) // +1: room to read the EOF without growing
	}
	body, err = readAll(http.MaxBytesReader(w, r.Body, maxBody), body)
	defer func() {
		// Decode copies what it keeps out of body, so the buffer is free once ServeHTTP returns.
		if cap(body) <= maxPooledBody {
			*bp = body[:0]
			bodyPool.Put(bp)
		}
	}()
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeProblem(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("body larger than %d bytes", maxBody))
			return
		}
		// Graph sent a body callbot could not read (a timeout, a connection cut): nothing was
		// applied, and a 4xx would make Graph drop the notification. Ask for it again.
		log().Warn("webhook: body not read, asking for a retry", zap.Error(err))
		w.Header().Set("Retry-After", "1")
		writeProblem(w, http.StatusServiceUnavailable, "read body: "+err.Error())
		return
	}
	ns, bad, err := DecodeEach(body)
	if errors.Is(err, ErrLegacyFormat) {
		// Graph resends the first notification of a call in Graph format after a 204.
		log().Info("webhook: legacy notification format, asking for Graph format")
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if err == nil && len(ns) == 0 && len(bad) > 0 {
		err = bad[0] // nothing in the request decodes
	}
	if err != nil {
		log().Warn("webhook: malformed notification", zap.Error(err))
		writeProblem(w, http.StatusBadRequest, err.Error())
		return
	}
	if len(bad) > 0 {
		// Sending the request again would not make them decode; the others are applied.
		log().Warn("webhook: malformed notifications skipped, the others applied", zap.Errors("skipped", bad), zap.Int("applied", len(ns)))
	}
	for i := range ns {
		if n := &ns[i]; n.Call != nil && n.Call.TenantID != "" && n.Call.TenantID != claims.TenantID {
			writeProblem(w, http.StatusForbidden, fmt.Sprintf("notification %d: tenant %s does not match token tenant %s", i, n.Call.TenantID, claims.TenantID))
			return
		}
	}
	timeout := h.Timeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	ctx, cancel := context.WithTimeout(WithScenarioID(r.Context(), r.Header.Get("Scenario-Id")), timeout)
	defer cancel()
	if err := h.Sink.Notify(ctx, claims.TenantID, ns); err != nil {
		log().Error("webhook: notifications not applied", zap.Error(err))
		if errors.Is(err, ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) {
			w.Header().Set("Retry-After", strconv.Itoa(1))
			writeProblem(w, http.StatusServiceUnavailable, "notifications not applied, retry")
			return
		}
		if errors.Is(err, ErrWrongTenant) {
			writeProblem(w, http.StatusForbidden, err.Error())
			return
		}
		writeProblem(w, http.StatusInternalServerError, "notifications not applied")
		return
	}
	w.WriteHeader(http.StatusAccepted)
}

// A token verification longer than slowVerify (it waited for the signing keys) gives the body
// bodyReadTime of its own to be read.
const (
	slowVerify   = time.Second
	bodyReadTime = 10 * time.Second
)

// bodyPool holds request body buffers, so reading a body allocates only when it is larger than
// any read before (io.ReadAll would start at 512 bytes and grow for every request).
var bodyPool = sync.Pool{New: func() any {
	b := make([]byte, 0, 4<<10)
	return &b
}}

// maxPooledBody is the largest body whose buffers (here and in Decode's json.Decoder pool) are
// pooled: a rare large body is not worth holding on to.
const maxPooledBody = 64 << 10

// readAll is io.ReadAll reading into buf.
func readAll(r io.Reader, buf []byte) ([]byte, error) {
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err != nil {
			if err == io.EOF {
				err = nil
			}
			return buf, err
		}
	}
}

// writeProblem writes a small JSON error body: {"error":"..."}.
func writeProblem(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	b, _ := json.Marshal(map[string]string{"error": msg})
	w.Write(append(b, '\n'))
}
