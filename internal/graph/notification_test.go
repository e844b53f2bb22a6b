package graph

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// Every documented notification example must decode, with the call id found.
func TestDecodeEveryDocumentedNotification(t *testing.T) {
	files, _ := filepath.Glob("testdata/payloads/notification-*.json")
	if len(files) < 20 {
		t.Fatalf("found %d notification examples, want the documented set", len(files))
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			body, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			ns, err := Decode(body)
			if errors.Is(err, ErrLegacyFormat) && strings.Contains(f, "presence") {
				return // a Graph change notification, not a calling one: answered 204
			}
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if len(ns) == 0 {
				t.Fatal("no notifications")
			}
			for _, n := range ns {
				if n.Kind != ResourceOther && n.CallID == "" {
					t.Errorf("no call id in %+v", n)
				}
			}
		})
	}
}

func decodeFile(t *testing.T, name string) Notification {
	t.Helper()
	body, err := os.ReadFile(filepath.Join("testdata/payloads", name))
	if err != nil {
		t.Fatal(err)
	}
	ns, err := Decode(body)
	if err != nil {
		t.Fatalf("Decode %s: %v", name, err)
	}
	return ns[0]
}

func TestDecodeShapes(t *testing.T) {
	in := decodeFile(t, "notification-incoming-to-app-instance-pstn-bot.json")
	caller, _ := in.Call.Source.Identity.Primary()
	dialled, _ := in.Call.Targets[0].Identity.Primary()
	if in.ChangeType != Created || in.Call.State != CallIncoming || in.CallID != "491f0b00-ffff-4bc9-a43e-b226498ec22a" {
		t.Errorf("incoming: %+v", in)
	}
	if diff := cmp.Diff(caller, Party{Kind: KindUser, ID: "8d1e6ab6-26c5-4e22-a1bc-06ea7343958e", TenantID: "632899f8-2ea1-4604-8413-27bd2892079f"}); diff != "" {
		t.Errorf("caller (-got +want):\n%s", diff)
	}
	if dialled.Kind != KindApplicationInstance || dialled.ID != "7629bdce-046c-4903-86b4-a8f718277e1a" {
		t.Errorf("dialled = %+v", dialled)
	}

	tone := decodeFile(t, "notification-tone.json")
	if tone.Call.ToneInfo.Digit() != "1" || tone.Call.ToneInfo.SequenceID != 1 {
		t.Errorf("tone = %+v", tone.Call.ToneInfo)
	}

	// subCode spelled with a capital C, code as a number
	failed := decodeFile(t, "notification-transfer-failed.json")
	if got := *failed.Call.ResultInfo; got.Code != 500 || got.Subcode != 7000 {
		t.Errorf("transfer failed result = %+v", got)
	}
	// code and subcode as strings
	term := decodeFile(t, "notification-terminated.json")
	if got := *term.Call.ResultInfo; got.Code != 200 || got.Subcode != 5001 || !term.Ended() {
		t.Errorf("terminated = %+v ended=%v", got, term.Ended())
	}
	// bare deleted after reject: no state, still the end of the call
	if !decodeFile(t, "notification-deleted-after-reject.json").Ended() {
		t.Error("deleted after reject is not an end")
	}
	// uppercase 32-hex ids in operation URLs
	op := decodeFile(t, "notification-playprompt-completed.json")
	if op.Kind != ResourceOperation || op.OperationID != "0FE0623FD62842EDB4BD8AC290072CC5" || op.Operation.Status != OpCompleted ||
		op.Operation.ClientContext != "d45324c1-fcb5-430a-902c-f20af696537c" {
		t.Errorf("operation = %+v %+v", op, op.Operation)
	}
	if CallKey(op.CallID) != CallKey("57dab8b1-894c-409a-b240-bd8beae78896") {
		t.Errorf("the two id formats of one call do not match: %s", op.CallID)
	}
	roster := decodeFile(t, "notification-participants-roster-updated.json")
	if roster.Kind != ResourceParticipants || len(roster.Participants) == 0 {
		t.Errorf("roster = %+v", roster)
	}
	hold := decodeFile(t, "notification-startholdmusic-completed.json") // resourceUrl without the leading slash
	if hold.Kind != ResourceOperation || hold.CallID == "" {
		t.Errorf("hold music = %+v", hold)
	}
}

func TestDecodeRejectsMalformed(t *testing.T) {
	for name, body := range map[string]string{
		"not json":          `{"value": [`,
		"trailing":          `{"value": []} {}`,
		"value not array":   `{"@odata.type":"#microsoft.graph.commsNotifications","value": {}}`,
		"bad change type":   `{"value":[{"changeType":"exploded","resourceUrl":"/communications/calls/1"}]}`,
		"no resource":       `{"value":[{"changeType":"updated"}]}`,
		"bad resource data": `{"value":[{"changeType":"updated","resourceUrl":"/communications/calls/1","resourceData":"x"}]}`,
		"bad code":          `{"value":[{"changeType":"updated","resourceUrl":"/communications/calls/1","resourceData":{"resultInfo":{"code":"abc"}}}]}`,
		"envelope no value": `{"@odata.type":"#microsoft.graph.commsNotifications"}`,
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Decode([]byte(body))
			var de *DecodeError
			if !errors.As(err, &de) {
				t.Fatalf("Decode = %v, want a *DecodeError", err)
			}
		})
	}
	if _, err := Decode([]byte(`{"type":"call","id":"legacy"}`)); !errors.Is(err, ErrLegacyFormat) {
		t.Errorf("legacy body: %v, want ErrLegacyFormat", err)
	}
}

func TestPresenceRoutable(t *testing.T) {
	for _, c := range []struct {
		p    Presence
		want bool
	}{
		{Presence{Availability: "Available", Activity: "Available"}, true},
		{Presence{Availability: "availableIdle", Activity: "Inactive"}, true},
		{Presence{Availability: "Available", Activity: "InACall"}, false},
		{Presence{Availability: "Busy", Activity: "InAMeeting"}, false},
		{Presence{Availability: "PresenceUnknown", Activity: "PresenceUnknown"}, false},
		{Presence{Availability: "Offline", Activity: "OffWork"}, false},
	} {
		if got := c.p.Routable(); got != c.want {
			t.Errorf("%+v routable = %v, want %v", c.p, got, c.want)
		}
	}
}

func FuzzDecode(f *testing.F) {
	files, _ := filepath.Glob("testdata/payloads/notification-*.json")
	for _, file := range files {
		b, _ := os.ReadFile(file)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		ns, err := Decode(b)
		if err == nil {
			for _, n := range ns {
				_ = n.Ended()
				if n.Kind == ResourceCall && n.Call == nil {
					t.Fatal("call notification without call data")
				}
			}
		}
	})
}
