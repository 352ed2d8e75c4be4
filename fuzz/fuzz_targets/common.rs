// Shared by the event targets: the built-in catalogue and the default time rules, at a fixed
// "now" so that runs are reproducible.
use std::sync::LazyLock;

use tally_schemas::{Catalog, TimePolicy};

pub static CATALOG: LazyLock<Catalog> = LazyLock::new(Catalog::builtin);
pub const POLICY: TimePolicy = TimePolicy {
    late_window_ms: 35 * 86_400_000,
    future_tolerance_ms: 300_000,
};
/// 2026-11-21T10:00:00Z
pub const NOW_MS: i64 = 1_795_255_200_000;
