package graph

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// sameDecode fails t unless Decode and decodeReference agree on body: the same notifications
// (reflect.DeepEqual), or errors of the same kind (ErrLegacyFormat, or a *DecodeError with the
// same index) and the same text.
func sameDecode(t *testing.T, body []byte) {
	t.Helper()
	got, gotErr := Decode(body)
	want, wantErr := decodeReference(body)
	if (gotErr == nil) != (wantErr == nil) {
		t.Fatalf("Decode(%q)\nerror %v\nreference error %v", body, gotErr, wantErr)
	}
	if gotErr != nil {
		if errors.Is(gotErr, ErrLegacyFormat) != errors.Is(wantErr, ErrLegacyFormat) {
			t.Fatalf("Decode(%q) = %v, reference %v", body, gotErr, wantErr)
		}
		var gotDE, wantDE *DecodeError
		if errors.As(gotErr, &gotDE) != errors.As(wantErr, &wantDE) || gotDE != nil && gotDE.Index != wantDE.Index {
			t.Fatalf("Decode(%q) = %#v, reference %#v", body, gotErr, wantErr)
		}
		if gotErr.Error() != refTypeNames.Replace(wantErr.Error()) {
			t.Fatalf("Decode(%q)\nerror     %v\nreference %v", body, gotErr, wantErr)
		}
		return
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Decode(%q)\n= %#v\nreference %#v", body, got, want)
	}
}

// refTypeNames turns the reference's type names in JSON errors into the ones the decoder before
// the single-pass decoder used.
var refTypeNames = strings.NewReplacer("refWireNotification", "wireNotification", "refCallResource", "CallResource",
	"refOperationResource", "OperationResource", "refParticipant", "Participant")

// differentialSeeds are the documented payloads, the fuzz corpus of FuzzDecode, and bodies
// aimed at the places where a one-pass decoder could differ from the reference.
func differentialSeeds(t testing.TB) [][]byte {
	var seeds [][]byte
	files, _ := filepath.Glob("testdata/payloads/notification-*.json")
	corpus, _ := filepath.Glob("testdata/fuzz/FuzzDecode/*")
	if len(files) < 20 || len(corpus) == 0 {
		t.Fatalf("found %d payloads and %d corpus entries", len(files), len(corpus))
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		seeds = append(seeds, b)
	}
	for _, f := range corpus {
		b, err := readCorpusEntry(f)
		if err != nil {
			t.Fatal(err)
		}
		seeds = append(seeds, b)
	}
	const call = `"changeType":"updated","resourceUrl":"/communications/calls/1"`
	const op = `"changeType":"deleted","resourceUrl":"/communications/calls/1/operations/2"`
	for _, s := range []string{
		``, ` `, `null`, `[]`, `{}`, `"x"`, `1`, `{"value":null}`, `{"value":[]}`,
		`{"value":[]}}`, `{"value":[]}]]`, `{"value":[]} {}`, `{"value":[]}x`, `{"value":[]}` + "\n",
		`{"@odata.type":"#microsoft.graph.commsNotifications"}`,
		`{"@odata.type":"#MICROSOFT.graph.commsnotifications","value":null}`,
		`{"@odata.type":5,"value":[]}`, `{"value":[null]}`, `{"value":[1]}`, `{"value":[[]]}`,
		`{"value":[{` + call + `}],"@odata.type":1}`,
		`{"value":[{"changeType":1},{"resourceData":{"resultInfo":{"code":"x"}}}]}`,
		// repeated raw members: the last wins whole in the reference
		`{"value":[{` + call + `}],"value":[{"resourceData":{}}]}`,
		`{"value":[{` + call + `}],"VALUE":[{` + op + `}]}`,
		`{"value":[{` + call + `}],"valu\u0065":null}`,
		`{"value":[{` + call + `,"resourceData":{"id":"a"},"resourceData":{"state":"x"}}]}`,
		`{"value":[{` + call + `,"resourceData":{"id":"a"},"resourceDATA":null}]}`,
		`{"value":[{` + call + `,"resourceData":{"id":"a"},"re\u017fourceData":{}}]}`,
		`{"value":[{` + call + `,"resourceData":{"id":"a","id":"b","source":{"id":"x"},"source":{"region":"y"}}}]}`,
		// kind decides which members are decoded
		`{"value":[{"changeType":"updated","resourceUrl":"/x","resourceData":{"state":5}}]}`,
		`{"value":[{` + op + `,"resourceData":{"state":5,"status":"Running"}}]}`,
		`{"value":[{` + call + `,"resourceData":{"status":5,"state":"TransferAccepted"}}]}`,
		`{"value":[{"changeType":"updated","resourceUrl":"/communications/calls/1/participants","resourceData":{"id":5}}]}`,
		`{"value":[{"changeType":"updated","resourceUrl":"/communications/calls/1/participants","resourceData":{"@odata.type":"t"}}]}`,
		`{"value":[{"changeType":"updated","resourceUrl":"/communications/calls/1/participants","resourceData":[{"@odata.type":"p","id":"1"}]}]}`,
		`{"value":[{` + call + `,"resourceData":[{"id":"1"}]}]}`,
		`{"value":[{` + call + `,"resourceData":[]}]}`,
		`{"value":[{` + call + `,"resourceData":"x"}]}`,
		`{"value":[{` + call + `,"resourceData":true}]}`,
		`{"value":[{` + call + `,"resourceData":null}]}`,
		`{"value":[{` + op + `,"resourceData":null}]}`,
		`{"value":[{` + op + `,"resourceData":{}}]}`,
		`{"value":[{` + op + `,"resourceData":{"id":"own","recordingAccessToken":"t","CompletionReason":"r"}}]}`,
		// casing and Unicode folding
		`{"value":[{"changeType":"UPDATED","resourceUrl":"/communications/calls/1","resourceData":{"state":"ESTABLISHED"}}]}`,
		`{"value":[{"changeType":"updat\u0130d","resourceUrl":"/communications/calls/1"}]}`,
		`{"value":[{"changeType":"created","resourceUrl":"/communications/calls/1","resourceData":{"state":"\u0130ncoming"}}]}`,
		`{"value":[{"changeType":"created","resourceUrl":"/communications/calls/1","resourceData":{"state":"incomin\u212a"}}]}`,
		`{"value":[{"CHANGETYPE":"created","ResourceURL":"/communications/CALLS/1","RESOURCEDATA":{"STATE":"incoming","TONEINFO":{"SEQUENCEID":"7"}}}]}`,
		// resource URLs
		`{"value":[{` + call + `,"resource":"/app/calls/2"}]}`,
		`{"value":[{"changeType":"updated","resource":"/app/calls/2"}]}`,
		`{"value":[{"changeType":"updated","resourceUrl":"communications/calls/1/operations/2/"}]}`,
		`{"value":[{"changeType":"updated","resourceUrl":"/communications/calls//operations/2"}]}`,
		`{"value":[{"changeType":"updated","resourceUrl":"/communications/calls/","resourceData":{"id":"from-data"}}]}`,
		`{"value":[{"changeType":"updated","resourceUrl":"/calls/1/operations/2/3"}]}`,
		`{"value":[{"changeType":"updated","resourceUrl":"/calls/1/participants/2/x?y#z"}]}`,
		`{"value":[{"changeType":"updated","resourceUrl":"calls/calls/calls"}]}`,
		`{"value":[{"changeType":"updated","resourceUrl":"/x/calls"}]}`,
		`{"value":[{"changeType":"updated","resourceUrl":"//"}]}`,
		// numbers
		`{"value":[{` + call + `,"resourceData":{"resultInfo":{"code":"200","subCode":1e3,"message":null}}}]}`,
		`{"value":[{` + call + `,"resourceData":{"resultInfo":{"code":1.5}}}]}`,
		`{"value":[{` + call + `,"resourceData":{"toneInfo":{"sequenceId":"","tone":"Tone1"}}}]}`,
		"{\"value\":[{" + call + ",\"callbackUri\":\"\xff\"}]}",
	} {
		seeds = append(seeds, []byte(s))
	}
	return seeds
}

// readCorpusEntry reads a "go test fuzz v1" file holding one []byte.
func readCorpusEntry(name string) ([]byte, error) {
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	v, err := parseCorpusBytes(string(b))
	if err != nil {
		return nil, errors.New(name + ": " + err.Error())
	}
	return v, nil
}

// parseCorpusBytes reads the body of a corpus file: a version line and one []byte("...") line.
func parseCorpusBytes(s string) ([]byte, error) {
	version, arg, _ := strings.Cut(strings.TrimSpace(s), "\n")
	arg = strings.TrimSpace(arg)
	if version != "go test fuzz v1" || !strings.HasPrefix(arg, "[]byte(") || !strings.HasSuffix(arg, ")") {
		return nil, errors.New("not a []byte corpus entry")
	}
	v, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(arg, "[]byte("), ")"))
	return []byte(v), err
}

func TestDecodeDifferential(t *testing.T) {
	for _, b := range differentialSeeds(t) {
		sameDecode(t, b)
		// and each of them cut short, which reaches most error paths
		for n := range len(b) {
			if n%7 == 0 || strings.ContainsRune("{}[]\",:", rune(b[n])) {
				sameDecode(t, b[:n])
			}
		}
	}
}

func TestParseResourceURLMatchesReference(t *testing.T) {
	for _, u := range []string{"", "/", "//", "calls", "calls/", "/calls/1", "calls/1/", "a/calls/1/operations/2",
		"a/calls/1/operations/2/3", "a/calls/1/operations", "a/calls/1/Participants", "a/calls/1/participants/x/y",
		"a/CALLS/1/x", "/app/calls/abc?x=1", "/calls/1#frag", "x/y/z", "calls/calls/operations/x", "/callſ/1"} {
		k, c, o := parseResourceURL(u)
		wk, wc, wo := refParseResourceURL(u)
		if k != wk || c != wc || o != wo {
			t.Errorf("parseResourceURL(%q) = %v %q %q, reference %v %q %q", u, k, c, o, wk, wc, wo)
		}
	}
}

func TestParseCallStateMatchesReference(t *testing.T) {
	for _, s := range []string{"", "incoming", "Incoming", "TRANSFERACCEPTED", "transferAccepted", "estab",
		"\u0130ncoming", "establi\u017fhed", "established ", "notAState", "ringinG"} {
		if got, want := ParseCallState(s), refParseCallState(s); got != want {
			t.Errorf("ParseCallState(%q) = %q, reference %q", s, got, want)
		}
	}
}

func FuzzDecodeDifferential(f *testing.F) {
	for _, b := range differentialSeeds(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		sameDecode(t, b)
		k, c, o := parseResourceURL(string(b))
		wk, wc, wo := refParseResourceURL(string(b))
		if k != wk || c != wc || o != wo {
			t.Fatalf("parseResourceURL(%q) = %v %q %q, reference %v %q %q", b, k, c, o, wk, wc, wo)
		}
		if got, want := ParseCallState(string(b)), refParseCallState(string(b)); got != want {
			t.Fatalf("ParseCallState(%q) = %q, reference %q", b, got, want)
		}
	})
}

// The documented payloads, except a roster (resourceData an array), decode in one pass: a change
// that sends them to decodeExact would pass every other test and lose the speed.
func TestDecodeTakesOnePass(t *testing.T) {
	files, _ := filepath.Glob("testdata/payloads/notification-*.json")
	for _, f := range files {
		body, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		_, err = decodeFast(body)
		if slow := err == errNotFast; slow != strings.Contains(f, "roster") {
			t.Errorf("%s: left to decodeExact = %v", filepath.Base(f), slow)
		}
	}
}
