package msgraph

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	abs "github.com/microsoft/kiota-abstractions-go"
	jsonser "github.com/microsoft/kiota-serialization-json-go"
	"github.com/microsoftgraph/msgraph-sdk-go/models/odataerrors"

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

// newError builds a *graph.Error from a failed response: status, Retry-After and request-id
// from the headers, code, message (and request-id when the header lacks it) from the Graph
// error body, decoded as the SDK's odataerrors.ODataError.
func newError(op string, status int, h http.Header, body []byte, now time.Time) *graph.Error {
	e := &graph.Error{
		Op:         op,
		Status:     status,
		RequestID:  h.Get("request-id"),
		RetryAfter: retryAfter(h.Get("Retry-After"), now),
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

// retryAfter reads a Retry-After header: delay seconds or an HTTP date (relative to now); 0
// when absent, bad or past.
func retryAfter(v string, now time.Time) time.Duration {
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
		if d := t.Sub(now); d > 0 {
			return d // not rounded: a retry must not go out before the date
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
