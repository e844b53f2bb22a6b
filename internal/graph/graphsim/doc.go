// Package graphsim is a mocked Microsoft Graph calling endpoint: one HTTPS server that
// callbot's production code (the msgraph-sdk-go adapter with an azidentity client-secret
// credential, and the webhook that validates callback tokens) talks to unchanged. It is used by
// tests, by `callbot demo`, and standalone by `callbot graphsim` beside a real `callbot serve`
// (docs/graphsim.md).
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
//     (blind), playPrompt, subscribeToTone, cancelMediaProcessing, keepAlive, participants/invite
//     (one agent at a time, into an established call), GET .../participants (once an agent
//     joined; 400 for a peer-to-peer call, as Graph lists none), GET and DELETE of a call, and POST
//     /communications/getPresencesByUserId, with the status codes, bodies and headers
//     (request-id, Location, Retry-After) of Microsoft's Graph reference (docs/graphsim.md lists
//     the pages under "Sources").
//   - Conference-style hand-off: an invited agent rings (their AgentSpec.Answer decides); on
//     accept the inviteParticipantsOperation completes (deleted, 200/0) and a roster update on
//     /participants lists the caller, the bot and the agent; after the agent's TalkTime the
//     agent leaves (a roster without them) and the bot is expected to hang up. A declined,
//     unanswered or unknown invitee fails the operation: 486/0, 408/10057 or 480/10037
//     (graphsim's choice: Graph documents no failed invite).
//   - The notifications Graph posts to the bot (commsNotifications envelopes, one call's
//     notifications in order, retried on 5xx, 429 and transport errors), signed RS256 with
//     aud = the bot's client id, iss, tid and a Scenario-Id per call, and the documented ends
//     of a call: transfer 0/7015, failed transfer 500/7000, bot hang-up 200/7000, caller
//     hang-up 200/540000 or 200/4097, not answered 408/1106, redirect not taken 480/10076, no
//     keepAlive 408/8537, the bare deleted after a reject.
//   - Callers (PSTN or Teams users) who dial a resource account, listen to prompts, press keys
//     and hang up; agents with Teams presence who accept, decline or ignore transfers,
//     redirects and invites, and are Busy/InACall while connected.
//   - Faults, per endpoint and per notification (AddFault, FailNext): latency; error statuses
//     with Graph error bodies and Retry-After; dropped, duplicated, reordered and batched
//     notifications (several in one request, as Graph may send them); expired callback tokens, tokens signed with an unpublished key, and
//     signing-key rollover (RolloverKey). Rules apply to the next N events or with a
//     probability drawn from a source seeded with Options.Seed; Injected records every fault.
//   - A control API under /_sim/ on the same server (JSON, no authentication: the server
//     listens on loopback unless Options.Addr says otherwise) to place calls, press keys, hang
//     up, manage agents and presence, read requests and deliveries, and inject faults.
//
// What it does not simulate: audio (a prompt "plays" for Options.PromptDuration, or for what
// Options.PromptDurations gives its URI, whatever its file, unless Options.PromptFailures or
// FailPrompt makes it fail, in the response or in a notification), recordResponse, outbound calls (POST /communications/calls), group calls and
// meetings (but for a call an invited agent joined), inviting several participants at once,
// a transfer while an invitee rings or is joined, delta rosters, hold music, consultative
// transfer semantics (replacesCallId is ignored, also in invites), presence subscriptions,
// multiple tenants and the legacy (Skype) notification format. A redirect's timeout is validated but unanswered targets ring for
// Options.RingTimeout. Every id it hands out is a lowercase GUID; ids are accepted in any case,
// with or without hyphens. As Graph does, some notifications write them in the other form, upper
// case without hyphens: establishing, established and prompt completions (docs/graphsim.md).
package graphsim
