package graphsim

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"go.uber.org/zap"
)

// Delivery policy: a notification is tried once and retried up to maxRetries times on a 5xx,
// a 429 or a transport error, after retryBackoff, then twice that, and so on (or the bot's
// Retry-After when it asks for at most maxRetryAfter).
const (
	maxRetries    = 3
	retryBackoff  = 50 * time.Millisecond
	maxRetryAfter = 2 * time.Second
	maxRedirects  = 3
)

// Wire shapes of what the simulator sends (the commsNotifications envelope around them is
// envelopeOf's). graph's types are reused where they marshal to the documented shape; these add
// the @odata annotations and the `subCode` spelling.
type notification struct {
	ODataType    string           `json:"@odata.type"`
	ChangeType   graph.ChangeType `json:"changeType"`
	ResourceURL  string           `json:"resourceUrl"`
	ResourceData any              `json:"resourceData"`
}

// callData is a #microsoft.graph.call resource: in notifications and in GET responses.
type callData struct {
	ODataType           string                  `json:"@odata.type"`
	ODataID             string                  `json:"@odata.id,omitempty"`
	ETag                string                  `json:"@odata.etag,omitempty"`
	ID                  string                  `json:"id,omitempty"`
	State               graph.CallState         `json:"state,omitempty"`
	Direction           string                  `json:"direction,omitempty"`
	CallbackURI         string                  `json:"callbackUri,omitempty"`
	Source              *graph.ParticipantInfo  `json:"source,omitempty"`
	Targets             []graph.ParticipantInfo `json:"targets,omitempty"`
	RequestedModalities []string                `json:"requestedModalities,omitempty"`
	TenantID            string                  `json:"tenantId,omitempty"`
	MyParticipantID     string                  `json:"myParticipantId,omitempty"`
	CallChainID         string                  `json:"callChainId,omitempty"`
	MediaState          *graph.MediaState       `json:"mediaState,omitempty"`
	ToneInfo            *toneInfo               `json:"toneInfo,omitempty"`
	ResultInfo          *resultInfo             `json:"resultInfo,omitempty"`
	AnsweredBy          *graph.ParticipantInfo  `json:"answeredBy,omitempty"`
}

type toneInfo struct {
	ODataType  string `json:"@odata.type"`
	SequenceID int64  `json:"sequenceId"`
	Tone       string `json:"tone"`
}

// resultInfo marshals as Graph's resultInfo. camel spells the subcode key "subCode", as the
// documented transfer-failed notification does; quoted writes code and subcode as JSON strings,
// as the documented terminated notification after a DELETE does.
type resultInfo struct {
	code, subcode int
	message       string
	camel         bool
	quoted        bool
}

func (r resultInfo) MarshalJSON() ([]byte, error) {
	msg, err := json.Marshal(r.message)
	if err != nil {
		return nil, err
	}
	key := "subcode"
	if r.camel {
		key = "subCode"
	}
	format := `{"@odata.type":"#microsoft.graph.resultInfo","code":%d,"%s":%d,"message":%s}`
	if r.quoted {
		format = `{"@odata.type":"#microsoft.graph.resultInfo","code":"%d","%s":"%d","message":%s}`
	}
	return fmt.Appendf(nil, format, r.code, key, r.subcode, msg), nil
}

// opData is a commsOperation (playPromptOperation...), in responses and notifications.
type opData struct {
	ODataType     string                `json:"@odata.type"`
	ODataID       string                `json:"@odata.id,omitempty"`
	ID            string                `json:"id,omitempty"`
	Status        graph.OperationStatus `json:"status"`
	ClientContext string                `json:"clientContext,omitempty"`
	ResultInfo    *resultInfo           `json:"resultInfo,omitempty"`
}

// outNote is a notification waiting in a call's outbox.
type outNote struct {
	url         string
	changeType  graph.ChangeType
	resourceURL string
	state       string
	item        []byte        // the notification
	body        []byte        // the request body: an envelope of item, or of batch's items
	ack         chan error    // receives the delivery result; nil when nobody waits
	fault       FaultKind     // the injected fault that shapes this delivery
	hold        time.Duration // FaultReorder, FaultBatch: the longest the notification is held
	batch       []outNote     // the notifications a batched request carries (FaultBatch)
}

// sendCall queues a call notification. A zero State sends the bare form (@odata.type and
// @odata.id only) Graph uses after a reject. Called with s.mu held.
func (s *Sim) sendCall(c *call, ct graph.ChangeType, d callData, ack chan error) {
	s.sendCallAt(c, c.path(), ct, d, ack)
}

// sendCallCompact queues a call notification naming the call in the other form Graph writes
// ids in, upper case without hyphens, and without the id in resourceData: as the establishing
// and established notifications of the call-answer page do
// (https://learn.microsoft.com/en-us/graph/api/call-answer). Called with s.mu held.
func (s *Sim) sendCallCompact(c *call, ct graph.ChangeType, d callData, ack chan error) {
	d.ID = ""
	s.sendCallAt(c, c.compactPath(), ct, d, ack)
}

func (s *Sim) sendCallAt(c *call, path string, ct graph.ChangeType, d callData, ack chan error) {
	d.ODataType = graph.TypeCall
	d.ODataID = path
	if d.State != "" {
		c.etag++
		d.ETag = fmt.Sprintf(`W/"%d"`, c.etag)
	}
	s.enqueue(c, ct, path, string(d.State), d, ack)
}

// compactID writes a GUID the other way Graph writes ids: upper case, without hyphens.
func compactID(id string) string { return strings.ToUpper(strings.ReplaceAll(id, "-", "")) }

// sendOp queues the final notification of a media operation. As the call-playprompt page's
// completion does (https://learn.microsoft.com/en-us/graph/api/call-playprompt), it names the
// call and the operation upper case without hyphens and has no id in resourceData: the operation
// id the response gave is in resourceUrl, in its other form. Called with s.mu held.
func (s *Sim) sendOp(c *call, op *mediaOp, status graph.OperationStatus, r resultInfo) {
	p := c.compactPath() + "/operations/" + compactID(op.id)
	s.enqueue(c, graph.Deleted, p, string(status), opData{
		ODataType: graph.TypePlayPromptOperation, ODataID: p,
		Status: status, ClientContext: op.clientContext, ResultInfo: &r,
	}, nil)
}

func (s *Sim) enqueue(c *call, ct graph.ChangeType, resourceURL, state string, data any, ack chan error) {
	item, err := json.Marshal(notification{
		ODataType: "#microsoft.graph.commsNotification", ChangeType: ct,
		ResourceURL: resourceURL, ResourceData: data,
	})
	if err != nil { // only our own types are marshalled: a bug
		s.log.DPanic("marshal notification", zap.Error(err))
		return
	}
	u := s.opts.WebhookURL
	if c.callbackURI != "" {
		u = c.callbackURI
	}
	c.outbox = append(c.outbox, outNote{url: u, changeType: ct, resourceURL: resourceURL, state: state,
		item: item, body: envelopeOf(item), ack: ack})
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// envelopeOf is the commsNotifications body carrying these notifications, in order.
func envelopeOf(items ...[]byte) []byte {
	b := fmt.Appendf(nil, `{"@odata.type":%q,"value":[`, graph.TypeNotifications)
	for i, it := range items {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, it...)
	}
	return append(b, "]}"...)
}

// batched is one request carrying the notifications of batch, in order.
func batched(batch []outNote) outNote {
	if len(batch) == 1 {
		return batch[0]
	}
	items := make([][]byte, len(batch))
	for i, n := range batch {
		items[i] = n.item
	}
	return outNote{url: batch[0].url, body: envelopeOf(items...), fault: FaultBatch, batch: batch}
}

// runOutbox delivers a call's notifications one at a time, in order, until the call has ended
// and everything queued was delivered (or given up), or the simulator closes. Notification
// faults are applied here: a dropped notification is skipped, a duplicated one posted twice, a
// reordered one held until the next one was posted, batched ones held and posted in one request
// with the next one.
func (s *Sim) runOutbox(c *call) {
	defer s.wg.Done()
	defer c.doneOnce.Do(func() { close(c.done) })
	var (
		held       *outNote
		heldUntil  time.Time
		batch      []outNote // batched notifications waiting for the next one
		batchUntil time.Time
	)
	for {
		s.mu.Lock()
		if len(c.outbox) == 0 {
			ended := c.ended
			s.mu.Unlock()
			now := time.Now()
			if held != nil && (ended || !now.Before(heldUntil)) {
				s.deliverNote(c, *held)
				held = nil
				continue
			}
			if len(batch) > 0 && (ended || !now.Before(batchUntil)) {
				s.deliverNote(c, batched(batch))
				batch = nil
				continue
			}
			if ended && held == nil && len(batch) == 0 {
				return
			}
			var until time.Time
			if held != nil {
				until = heldUntil
			}
			if len(batch) > 0 && (until.IsZero() || batchUntil.Before(until)) {
				until = batchUntil
			}
			var (
				expired <-chan time.Time
				t       *time.Timer
			)
			if !until.IsZero() {
				t = time.NewTimer(time.Until(until))
				expired = t.C
			}
			select {
			case <-c.wake:
			case <-expired:
			case <-s.ctx.Done():
			}
			if t != nil {
				t.Stop()
			}
			if s.ctx.Err() != nil {
				return
			}
			continue
		}
		n := c.outbox[0]
		c.outbox = c.outbox[1:]
		n.fault = s.noteFault(c, &n, held != nil, len(batch) > 0)
		s.mu.Unlock()
		if len(batch) > 0 && (n.url != batch[0].url || (n.fault != "" && n.fault != FaultBatch)) {
			// The next notification goes elsewhere, or a fault of its own shapes it: the batch
			// goes without it.
			s.deliverNote(c, batched(batch))
			batch = nil
		}
		switch n.fault {
		case FaultDrop:
			s.log.Debug("notification dropped", zap.String("call_id", c.id), zap.String("scenario_id", c.scenarioID),
				zap.String("resource_url", n.resourceURL), zap.String("state", n.state))
			if n.ack != nil {
				n.ack <- ErrDropped
			}
			continue
		case FaultReorder:
			held, heldUntil = &n, time.Now().Add(n.hold)
			continue
		case FaultBatch:
			if len(batch) == 0 {
				batchUntil = time.Now().Add(n.hold)
			}
			batch = append(batch, n)
			continue
		}
		switch {
		case len(batch) > 0:
			s.deliverNote(c, batched(append(batch, n)))
			batch = nil
		case n.fault == FaultDuplicate:
			first := n
			first.fault, n.ack = "", nil
			s.deliverNote(c, first)
			s.deliverNote(c, n)
		default:
			s.deliverNote(c, n)
		}
		if held != nil {
			s.deliverNote(c, *held)
			held = nil
		}
		if s.ctx.Err() != nil {
			return
		}
	}
}

// deliverNote delivers one notification and reports the result to whoever waits for it.
func (s *Sim) deliverNote(c *call, n outNote) {
	err := s.deliver(c, n)
	if err != nil {
		s.log.Warn("notification not delivered", zap.String("call_id", c.id),
			zap.String("scenario_id", c.scenarioID), zap.String("tenant_id", s.opts.TenantID), zap.Error(err))
	}
	if n.ack != nil {
		n.ack <- err
	}
	for _, b := range n.batch {
		if b.ack != nil {
			b.ack <- err
		}
	}
}

// deliver posts one notification, following redirects and retrying transient failures.
func (s *Sim) deliver(c *call, n outNote) error {
	target := n.url
	clientRequestID := newID()
	redirects := 0
	for attempt := 1; ; {
		status, hdr, err := s.post(c, n, target, attempt, clientRequestID)
		switch {
		case err == nil && status >= 200 && status < 300:
			return nil
		case err == nil && (status == http.StatusFound || status == http.StatusTemporaryRedirect ||
			status == http.StatusPermanentRedirect) && hdr.Get("Location") != "" && redirects < maxRedirects:
			loc, perr := url.Parse(hdr.Get("Location"))
			base, _ := url.Parse(target)
			if perr != nil || base == nil {
				return fmt.Errorf("deliver to %s: bad Location %q", target, hdr.Get("Location"))
			}
			target = base.ResolveReference(loc).String()
			redirects++
			continue
		case err == nil && status < 500 && status != http.StatusTooManyRequests:
			return fmt.Errorf("deliver to %s: status %d", target, status)
		}
		if err == nil {
			err = fmt.Errorf("deliver to %s: status %d", target, status)
		}
		if attempt > maxRetries || s.ctx.Err() != nil {
			return err
		}
		wait := retryBackoff << (attempt - 1)
		if sec, perr := strconv.Atoi(hdr.Get("Retry-After")); perr == nil && sec >= 0 &&
			time.Duration(sec)*time.Second <= maxRetryAfter {
			wait = time.Duration(sec) * time.Second
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-s.ctx.Done():
			t.Stop()
			return errors.Join(err, ErrClosed)
		}
		attempt++
	}
}

// post makes one delivery attempt and records it: a Delivery for each notification the
// request carries.
func (s *Sim) post(c *call, n outNote, target string, attempt int, clientRequestID string) (int, http.Header, error) {
	rec := Delivery{
		Time: time.Now(), CallID: c.id, URL: target, Attempt: attempt, ChangeType: string(n.changeType),
		ResourceURL: n.resourceURL, State: n.state, Body: n.body, Fault: n.fault,
	}
	status, hdr, err := s.doPost(c, n, target, clientRequestID, &rec)
	rec.Status = status
	if err != nil {
		rec.Err = err.Error()
	}
	recs := []Delivery{rec}
	if len(n.batch) > 0 {
		recs = recs[:0]
		for _, b := range n.batch {
			r := rec
			r.ChangeType, r.ResourceURL, r.State = string(b.changeType), b.resourceURL, b.state
			recs = append(recs, r)
		}
	}
	s.mu.Lock()
	s.deliveries = append(s.deliveries, recs...)
	s.mu.Unlock()
	for _, r := range recs {
		s.log.Debug("notification", zap.String("call_id", c.id), zap.String("scenario_id", c.scenarioID),
			zap.String("tenant_id", s.opts.TenantID), zap.String("change_type", r.ChangeType),
			zap.String("resource_url", r.ResourceURL), zap.String("state", r.State), zap.String("url", target),
			zap.Int("attempt", attempt), zap.Int("in_request", len(recs)), zap.Int("status", status), zap.Error(err))
	}
	return status, hdr, err
}

func (s *Sim) doPost(c *call, n outNote, target, clientRequestID string, rec *Delivery) (int, http.Header, error) {
	tok, err := s.callbackToken(n.fault)
	if err != nil {
		return 0, nil, err
	}
	req, err := http.NewRequestWithContext(s.ctx, http.MethodPost, target, bytes.NewReader(n.body))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Scenario-Id", c.scenarioID)
	req.Header.Set("client-request-id", clientRequestID)
	req.Header.Set("User-Agent", "graphsim")
	rec.Header = req.Header.Clone()
	resp, err := s.notify.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, resp.Header, nil
}
