package callstate

// GiveUp is giveUp, for the tests of what it does in states no timer of today's table leaves
// refused (a bug it guards against would).
func (m *Machine) GiveUp(tenant, key string, from State) { m.giveUp(tenant, key, from) }

// ReconcileParallel is how many calls a reconciler's pass checks at once.
const ReconcileParallel = reconcileParallel

// RedriveParallel is how many claimed outboxes RunOutbox re-drives at once.
const RedriveParallel = redriveParallel
