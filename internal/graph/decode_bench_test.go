package graph

import (
	"os"
	"path/filepath"
	"testing"
)

// The payloads a call sends most: the incoming call, state changes, key presses, and the end of
// a transfer or a media operation.
var benchPayloads = []struct{ name, file string }{
	{"incoming", "notification-incoming.json"},
	{"established", "notification-established.json"},
	{"tone", "notification-tone.json"},
	{"transferFailed", "notification-transfer-failed.json"},
	{"playPromptCompleted", "notification-playprompt-completed.json"},
	{"terminated", "notification-terminated.json"},
}

func BenchmarkDecode(b *testing.B) {
	for _, p := range benchPayloads {
		body, err := os.ReadFile(filepath.Join("testdata/payloads", p.file))
		if err != nil {
			b.Fatal(err)
		}
		b.Run(p.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(body)))
			for b.Loop() {
				if _, err := Decode(body); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
