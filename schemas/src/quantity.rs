//! The usage cap: every quantity Tally keeps is a whole number from 0 to [`MAX`]
//! (2^63 - 1 = 9,223,372,036,854,775,807) in the meter's unit.
//!
//! - An event's `data.value` above [`MAX`] is refused (`value_out_of_range`).
//! - A stored cell (one customer, meter and minute) and a customer's total over any range are
//!   held at [`MAX`] ([`add`]); they never wrap or turn negative. Where the process counting
//!   the customer's period sees an event that would push the period total past [`MAX`]
//!   (the embedded default, where ingest and the enforcer share the process), the event is
//!   refused (`usage_cap_exceeded`).
//! - Totals over several customers (a meter's total) are exact up to `u64::MAX` and held there.
//!
//! SQL engines sum 64-bit integers in 64 bits (SQLite fails with "integer overflow",
//! ClickHouse's `sum(UInt64)` wraps), so stores sum the high and the low 32 bits of each value
//! separately (`value >> SPLIT_BITS`, `value & LOW_MASK`) and [`join`] the two sums here: each part
//! stays exact for more than 2^31 summed rows.

/// The largest quantity: of one event, one stored cell, one customer's total.
pub const MAX: u64 = i64::MAX as u64;

/// `a + b`, held at [`MAX`].
pub fn add(a: u64, b: u64) -> u64 {
    a.saturating_add(b).min(MAX)
}

/// The shift that splits a value into the parts summed separately.
pub const SPLIT_BITS: u32 = 32;
/// The mask of the low part (`value & LOW_MASK`).
pub const LOW_MASK: u64 = (1 << SPLIT_BITS) - 1;

/// The sum of the high parts and the sum of the low parts, joined: exact, held at `u64::MAX`.
/// Negative parts (impossible for stored values) count as 0.
pub fn join(high_sum: i128, low_sum: i128) -> u64 {
    let total = (high_sum.max(0) << SPLIT_BITS) + low_sum.max(0);
    u64::try_from(total).unwrap_or(u64::MAX)
}

/// [`join`], held at [`MAX`]: a customer's total.
pub fn join_capped(high_sum: i128, low_sum: i128) -> u64 {
    join(high_sum, low_sum).min(MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_is_held_at_the_cap() {
        assert_eq!(add(MAX, 1), MAX);
        assert_eq!(add(MAX - 1, 1), MAX);
        assert_eq!(add(u64::MAX, u64::MAX), MAX);
        assert_eq!(add(2, 3), 5);
    }

    #[test]
    fn split_sums_are_exact_beyond_64_bits() {
        let values = [MAX, MAX, MAX, 7, 1 << 40];
        let high: i128 = values.iter().map(|v| (v >> SPLIT_BITS) as i128).sum();
        let low: i128 = values.iter().map(|v| (v & LOW_MASK) as i128).sum();
        let exact: u128 = values.iter().map(|&v| v as u128).sum();
        assert!(exact > u64::MAX as u128);
        assert_eq!(join(high, low), u64::MAX);
        assert_eq!(join_capped(high, low), MAX);
        let small = [5u64, 1 << 33, (1 << 32) + 3];
        let high: i128 = small.iter().map(|v| (v >> SPLIT_BITS) as i128).sum();
        let low: i128 = small.iter().map(|v| (v & LOW_MASK) as i128).sum();
        assert_eq!(join(high, low), small.iter().sum::<u64>());
        assert_eq!(join(-1, -1), 0);
    }
}
