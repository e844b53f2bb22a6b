package msgraph

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	abs "github.com/microsoft/kiota-abstractions-go"
	jsonser "github.com/microsoft/kiota-serialization-json-go"
	"github.com/microsoftgraph/msgraph-sdk-go/models/odataerrors"
	"go.uber.org/zap"

	"github.com/callbot/callbot/internal/graph"
)

// maxBody bounds how much of a response body is read.
const maxBody = 4 << 20

// reply is what a response handler captured of a successful response.
type reply struct {
	status int
	header http.Header
	body   []byte
}

// sendFunc runs one SDK request builder call with the given headers and options.
type sendFunc func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error

// do runs send under the client's per-request deadline, with the Scenario-Id header when ctx
// carries one and a response handler that keeps the raw reply. The SDK never sees the response:
// its enum parsers drop the lowercase values Graph sends, so bodies are decoded by the caller
// with encoding/json. A Graph failure is returned as *graph.Error (wrapped with op and callID).
func (c *Client) do(ctx context.Context, op, callID string, send sendFunc) (reply, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()

	h := abs.NewRequestHeaders()
	scenario := graph.ScenarioID(ctx)
	if scenario != "" {
		h.Add("Scenario-Id", scenario)
	}
	var r reply
	handler := abs.NewRequestHandlerOption()
	handler.SetResponseHandler(func(resp any, _ abs.ErrorMappings) (any, error) {
		hr, ok := resp.(*http.Response)
		if !ok || hr == nil {
			return nil, fmt.Errorf("unexpected response type %T", resp)
		}
		defer hr.Body.Close()
		body, err := io.ReadAll(io.LimitReader(hr.Body, maxBody))
		r = reply{status: hr.StatusCode, header: hr.Header, body: body}
		if hr.StatusCode >= 300 {
			return nil, newError(op, hr.StatusCode, hr.Header, body)
		}
		if err != nil {
			return nil, fmt.Errorf("read response: %w", err)
		}
		return nil, nil
	})

	start := time.Now()
	err := send(ctx, h, []abs.RequestOption{handler})
	c.log.Debug("graph request",
		zap.String("op", op), zap.String("call_id", callID), zap.String("scenario_id", scenario),
		zap.Int("status", r.status), zap.String("request_id", r.header.Get("request-id")),
		zap.String("client_request_id", r.header.Get("client-request-id")),
		zap.Duration("elapsed", time.Since(start)), zap.Error(err))
	if err != nil {
		if callID == "" {
			return r, fmt.Errorf("%s: %w", op, err)
		}
		return r, fmt.Errorf("%s call %s: %w", op, callID, err)
	}
	return r, nil
}

// newError builds a *graph.Error from a failed response: status, Retry-After and request-id
// from the headers, code, message (and request-id when the header lacks it) from the Graph
// error body, decoded as the SDK's odataerrors.ODataError.
func newError(op string, status int, h http.Header, body []byte) *graph.Error {
	e := &graph.Error{
		Op:         op,
		Status:     status,
		RequestID:  h.Get("request-id"),
		RetryAfter: retryAfter(h.Get("Retry-After")),
	}
	if b := bytes.TrimSpace(body); len(b) > 0 && b[0] == '{' {
		if oe, err := decodeODataError(b); err == nil && oe != nil {
			if me := oe.GetErrorEscaped(); me != nil {
				e.Code = deref(me.GetCode())
				e.Message = deref(me.GetMessage())
				if ie := me.GetInnerError(); ie != nil && e.RequestID == "" {
					e.RequestID = deref(ie.GetRequestId())
				}
			}
		}
	}
	if e.Message == "" {
		e.Message = http.StatusText(status)
	}
	return e
}

func decodeODataError(body []byte) (*odataerrors.ODataError, error) {
	node, err := jsonser.NewJsonParseNode(body)
	if err != nil {
		return nil, err
	}
	v, err := node.GetObjectValue(odataerrors.CreateODataErrorFromDiscriminatorValue)
	if err != nil {
		return nil, err
	}
	oe, ok := v.(*odataerrors.ODataError)
	if !ok {
		return nil, errors.New("not an odata error")
	}
	return oe, nil
}

// retryAfter reads a Retry-After header: delay seconds or an HTTP date; 0 when absent or bad.
func retryAfter(v string) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil {
		if s < 0 {
			return 0
		}
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := time.Until(t); d > 0 {
			return d.Round(time.Second)
		}
	}
	return 0
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
