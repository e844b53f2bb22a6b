package msgraph

import (
	"context"
	"testing"

	"github.com/microsoftgraph/msgraph-sdk-go/communications"
)

// The URLs callbot builds for a call's actions are the ones the SDK's URI templates expand to,
// whatever the call id holds (a Graph id is a GUID; an id from a forged or broken notification
// must still land on a path of its own, escaped).
func TestCallURLMatchesTheSDKTemplate(t *testing.T) {
	c, err := New(Config{TenantID: "t", ClientID: "c", ClientSecret: "s", GraphURL: "https://graph.example.test/v1.0/"})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	body := communications.NewCallsItemPlayPromptPostRequestBody()
	for _, id := range []string{
		"57dab8b1-894c-409a-b240-bd8beae78896", "421F0000AAAA4B6B9D0E0E0E0E0E0E0E",
		"a/b", "../x", "a b", "ü", "%41", "a?b#c", "~._-", "a+b&c=d;e,f:g@h$i!j'k(l)m*n", "",
	} {
		viaTemplate, err := c.call(id).PlayPrompt().ToPostRequestInformation(ctx, body, nil)
		if err != nil {
			t.Fatal(err)
		}
		viaTemplate.PathParameters["baseurl"] = c.adapter.GetBaseUrl() // what the adapter adds when it sends
		want, err := viaTemplate.GetUri()
		if err != nil {
			t.Fatal(err)
		}
		viaURL, err := communications.NewCallsItemPlayPromptRequestBuilder(c.callURL(id, "playPrompt"), c.adapter).ToPostRequestInformation(ctx, body, nil)
		if err != nil {
			t.Fatal(err)
		}
		got, err := viaURL.GetUri()
		if err != nil {
			t.Fatalf("id %q: %s: %v", id, c.callURL(id, "playPrompt"), err)
		}
		if got.String() != want.String() {
			t.Errorf("id %q: %s, the SDK's template gives %s", id, got, want)
		}
	}
}
