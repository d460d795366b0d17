//! The task interface's rules for parameter values, which both sides of the wire apply: the
//! gateway refuses a call that breaks them before calling the controller (`service`), the
//! simulator answers such a call with the controller's faults, and a simulator layout may only
//! name ports and bins inside them. They are facts about the AutoStore domain, not about how
//! messages are encoded, so they live here rather than in `codec`.

use std::ops::RangeInclusive;

/// Valid `port_id` values on every task-interface method.
pub(crate) const PORT_ID_RANGE: RangeInclusive<u32> = 1..=2000;

/// Valid `bin_id` values on every task-interface method.
pub(crate) const BIN_ID_RANGE: RangeInclusive<u32> = 1..=4_000_000;
