// Package callstate is the life of a call: its record in Redis, its states, the table of legal
// transitions, the pure decision that maps (call, event, flow, time) to the next record and the
// commands that carry it out, durable timers, and the Machine that ties them together.
//
// A call's life:
//
//	incoming notification ──► answering ──(established)──► in_menu ──(key)──► queued ──(agent free)──► transferring ──(0/7015)──► terminated
//	                              │                         │  ▲ (invalid key / no input: replay, then fallback)   │
//	                              │                         │  └──────────── direct transfer failed ◄──────────────┤ (500/7000: back to
//	                              │                         └──(disconnect)──► terminating ──(goodbye played)──► hang up    the head of the queue)
//	                              └──────────────── any state ──(terminated / deleted / 404)──► terminated (terminal)
//
// Answering sends answer (with every prompt of the flow to prefetch). Established subscribes to
// tones and plays greeting and menu. A key press cancels the prompt still playing (barge-in) and
// the IVR interpreter decides: replay, submenu, queue, transfer or disconnect. When a menu prompt
// ends, a durable no-input timer starts. Queued plays the queue's hold music in a loop until the
// dispatcher reserves an agent and offers the call (EvAgentOffer), which sends a blind transfer
// and starts a transfer timer. Graph reports the outcome: established with a failure result puts
// the caller back in its queue with its original arrival score; terminated with 7015 ends the call
// as transferred and frees the agent. A direct transfer (a menu's, or a queue's on-timeout) that
// fails takes the caller back to the start menu; the third to fail in a row with no key pressed
// since ends the call with the menu's goodbye (OutcomeTransferFailed), so that a caller nobody
// is serving does not go round a failing fallback transfer until they hang up (one Graph never
// processed, throttled or without a token, did not try the target and does not count).
//
// A queue with handoff: invite brings the agent into the call instead (inviting), and callbot
// stays in it (connected): it sees the agent in the call's roster, hangs up when the agent
// leaves (a notified roster without them is confirmed by a roster read first: Graph's rosters
// carry no order that would tell the one after their leaving from a late one from before their
// joining), and gives the agent the queue's wrap-up time before the next offer. An invite's
// failure, or its timer, is checked against the roster read from Graph (CmdCheckRoster) before
// the caller goes back to the queue, since a re-driven second invite can fail while the agent
// talks to the caller after the first; and a connected call reads its roster every minute, in
// case the roster that shows the agent leaving was lost. A read applies only while the call
// waits for it (Call.RosterCtx), and one superseded before it is sent is not sent. The re-drive of an invite
// reads the roster first: an agent already in the call is not invited again. An invite Graph
// never processed (throttled, no token: Call.InviteNotSent) is checked against the roster too;
// its agent, who never rang, is then released as after a transfer Graph never processed (their
// idle place kept, held back a while), where a failed or declined invite cools them down.
//
// Notifications can be lost, repeated or reordered. Guards cover the losses: no established 10 s
// after answer, no outcome of a transfer in time, a menu prompt whose end is never reported, hold
// music whose end is never reported, a hangup with no terminated notification after it (Graph
// refused it, or the notification was lost: callbot hangs up again every hang-up grace until the
// call ends); each either asks Graph for the call's state (EvCallState) or acts as if the
// notification had come. A hangup that fails (throttled, failing, refused: EvHangupFailed, for
// the hangup the call waits on, Call.HangupCtx) brings the hang-up timer forward, 1 s later and
// then with backoff to the grace, or after Graph's Retry-After; a refused one is sent again so
// three times at most. A hold prompt Graph refuses, or whose operation fails (in a
// notification, or already in the playPrompt response, after which none comes), is tried again
// 5 s later, never at once. A tone subscription that fails (refused, or its operation failed in
// the response; the caller's keys would do nothing for the whole call) is made
// again by a durable timer, 1 s later and then with backoff, six times at most; a key press
// disarms it, and a call being hung up subscribes no more.
//
// A transfer failure is acted on only once Graph shows the call established again, since one from
// an earlier attempt may arrive late or twice; and only once Graph said the current attempt is
// under way (transferring, Call.Transferring), since a repeat of an earlier attempt's failure can
// arrive before the current attempt's request reached Graph (another instance may be sending
// it), when Graph still has the call established. Without that, callbot reads the call again
// 5 s later, and that read settles it (as the transfer timer's does). A read settles only the
// attempt it was made for (Call.TransferCtx): one answered late, after the caller went back to
// the queue and on to another agent, may predate the new attempt's request.
// A 404 to any other command while the call is being transferred (hold music another instance
// started before the offer, reaching Graph after the transfer took and ended callbot's leg)
// ends nothing: the terminated notification says how the call ended, or the transfer's timer.
//
// Every change is one compare-and-set on the call's version, and saves the commands it decided
// with it (the outbox): any instance may apply any notification, a lost race is retried on the
// fresh record, and what an instance decided but did not carry out (it died) is re-driven by
// another once its lease runs out (RunOutbox, redriveParallel calls at once); while an instance
// lives it renews the leases of the commands it is still carrying out, so a slow Graph is not
// mistaken for a dead instance. A save that decides no command leaves the lease as it is, so
// the commands of an instance that died are re-driven when its lease runs out, however many
// notifications come meanwhile; nor does a create that finds the record made (an incoming
// delivered again, or queued behind a stalled Redis): a create's outbox entry and timers only
// ever lower an entry's due. The reconciler (RunReconcile) closes calls Graph
// has forgotten, keeps long calls alive and repairs queues (a queued caller missing is put back, an
// entry whose call ended is removed, in any queue of the tenant, its flow's or one a flow edit
// removed) and agent reservations. It walks every live call, reconcileParallel at a time, and
// renews its lease through a long pass. Events with no row for the
// call's state (repeats, late arrivals) change nothing; terminated stays terminated.
//
// A notification Redis refused is answered 503 for Graph to deliver again; an incoming call, a
// key press with a sequenceId, a transfer's failure, a call's end and the others whose repeat is
// harmless whenever it comes are also kept in memory and applied again by the instance that refused them, until Redis takes
// them or 15 s have passed (keep, RunKept): an outage may outlast Graph's retries.
//
// Graph's refusal of an answer has the call read before it ends the call: one refused because
// another answer of ours took (a re-drive and the answer's timer both found the call incoming)
// carries on.
//
// A decision the table refuses (ErrInvalidTransition, a *TransitionError) is a bug, never
// input: it is logged as an error and counted (Machine.InvalidTransitions), and a notification's
// is dropped. A timer's is removed, not left to be claimed and refused again every lease, and
// its call given up on where nothing else may move it on (answering, transferring, inviting,
// connected): if Graph shows the caller alone with callbot, callbot hangs up (EvAbort, on the
// record Graph was read for, not one that moved on meanwhile); a call with others in it is never
// hung up. A caller in the menu or a queue stays there.
//
// A call's Graph commands go out in the order of the transitions that decided them, one at a
// time, on the call's executor; a transition takes its place there before its save makes the new
// state visible, so the dispatcher offering a caller it has just seen in the queue cannot send the
// transfer ahead of the hold music. Media commands a transfer decided after them makes moot (the
// transfer takes the caller's media) are not sent at all.
//
// Redis data can be lost (a failover that loses unreplicated writes, a host crash within the AOF's
// second). A call whose record is gone is taken back when its next notification comes, if Graph
// has it established with the caller alone with callbot (EvAdopt: its menu starts again). With Store.WaitForReplicas a change is
// acknowledged only once the replicas have it (a WAIT in the write's round trip; Store.Sync for a
// notification delivered again whose change the master already has), so a failover loses none.
// The dispatcher's offer is no notification's change, and none delivers it again: one refused as
// unreplicated but applied on the master stands, and the dispatcher follows it up (CheckOffer,
// OfferFate, queue.Dispatcher.FollowUpOffers): if a failover loses it, the caller goes back to
// their place in the queue and the agent is freed; the reconciler does that if the dispatcher's
// instance dies first.
// On Redis Cluster each master a change writes to is waited on, the record's last, and what
// depends on the change on another master waits for it (nodes.go).
//
// The hot path is built for few round trips: each instance caches the records it saved, and
// ignores on the cached copy an event no later version could take (Stale); a save carries its
// timers, outbox-index entry and harmless queue writes in its own pipeline; acknowledgements go
// in batches.
//
// An instance that does not reach Graph while the others do (Config.CutOff, decided by callbot
// from what each instance reports in Redis) leaves Graph's work to them: it hands back the
// outboxes it is carrying out and each batch of commands it decides (due at once, and only a
// lease it wrote itself: HandOverCarried, handOver), and claims no timer or outbox. A command
// that fails without an answer from Graph while another instance has just had one
// (Config.OthersReachGraph) is handed back too, not taken for Graph's failure.
//
// Every time the machine writes for the other instances (a timer's due time, an outbox's lease)
// comes from Config.Now, which callbot sets to Redis's clock (internal/clock), so that instances
// whose hosts' clocks disagree still agree on when a timer is due or a lease has run out.
package callstate
