// Package graphsim is a mocked Microsoft Graph calling endpoint: one HTTPS server on
// 127.0.0.1 that callbot's production code (the msgraph-sdk-go adapter with an azidentity
// client-secret credential, and the webhook that validates callback tokens) talks to unchanged,
// used by tests and by `callbot demo`.
//
// What it simulates:
//
//   - Entra ID for the client-credentials flow as MSAL uses it with instance discovery disabled:
//     GET /{tenant}/v2.0/.well-known/openid-configuration, POST /{tenant}/oauth2/v2.0/token
//     (RS256 access tokens for https://graph.microsoft.com) and the keys at
//     /{tenant}/discovery/v2.0/keys.
//   - The calling platform's inbound-token metadata: /botauth/.well-known/OpenIdConfiguration
//     and /botauth/keys, the JWKS that verifies the bearer token on every notification.
//   - Graph v1.0 call control for service-hosted media: answer, reject, redirect, transfer
//     (blind), playPrompt, subscribeToTone, cancelMediaProcessing, keepAlive, GET and DELETE of
//     a call, and POST /communications/getPresencesByUserId, with the status codes, bodies and
//     headers (request-id, Location, Retry-After) documented in shared/graph/WIRE.md.
//   - The notifications Graph posts to the bot (commsNotifications envelopes, one call's
//     notifications in order, retried on 5xx, 429 and transport errors), signed RS256 with
//     aud = the bot's client id, iss, tid and a Scenario-Id per call.
//   - Callers (PSTN or Teams users) who dial a resource account, listen to prompts, press keys
//     and hang up; agents with Teams presence who accept, decline or ignore transfers.
//
// What it does not simulate: audio (a prompt "plays" for Options.PromptDuration, whatever
// its file), recordResponse, outbound calls (POST /communications/calls), group calls,
// participants and invite, hold music, consultative transfer semantics (replacesCallId is
// ignored), presence subscriptions, throttling other than what FailNext injects, multiple
// tenants, the legacy (Skype) notification format, and reordering or duplication of
// notifications. Every id it hands out is a lowercase GUID; ids are accepted in any case,
// with or without hyphens.
package graphsim
