//go:build chaos

package chaos

import (
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph/graphsim"
)

// A notification given up with every attempt answered 503 within an election is the
// election's; one with an attempt outside it, or answered otherwise, or whose attempts are not
// all on record, is callbot's to answer for.
func TestInElection(t *testing.T) {
	t0 := time.Now()
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	body := []byte(`{"n":1}`)
	tries := func(status int, times ...float64) []graphsim.Delivery {
		var ds []graphsim.Delivery
		for i, s := range times {
			ds = append(ds, graphsim.Delivery{CallID: "c", Body: body, Attempt: i + 1, Time: at(s), Status: status})
		}
		return ds
	}
	elections := [][2]time.Time{{at(10), at(13)}}
	for _, tc := range []struct {
		name string
		ds   []graphsim.Delivery
		want bool
	}{
		{"all within", tries(503, 10.1, 11.1, 12.1, 12.9), true},
		{"the last after the election", tries(503, 10.1, 11.1, 12.1, 13.5), false},
		{"the first before the kill", tries(503, 9.5, 10.5, 11.5, 12.5), false},
		{"answered 500", tries(500, 10.1, 11.1, 12.1, 12.9), false},
		{"attempts not all recorded", tries(503, 10.1, 11.1, 12.1, 12.9)[1:], false},
	} {
		given := tc.ds[len(tc.ds)-1]
		if got := inElection(tc.ds, given, elections); got != tc.want {
			t.Errorf("%s: inElection %v, want %v", tc.name, got, tc.want)
		}
	}
}
