//! A usage event as read back from the event log: where it sits (partition, offset) and what it
//! is. Offsets only grow within a partition; one customer's events share one partition.

use crate::UsageEvent;

/// One record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition: u32,
    pub offset: u64,
    pub event: UsageEvent,
}
