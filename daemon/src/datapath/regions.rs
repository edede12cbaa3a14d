//! Allocation of regions in the slot array.
//!
//! Every table (the binding table, each account's allowlist) occupies one contiguous region
//! of `SLOTS`. Freed regions wait out a quarantine before reuse: a packet that read the old
//! table's descriptor just before it was replaced may still be probing the old region, and
//! must find it intact (see `ipaccess_common::table`).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

/// How long a freed region stays untouched. XDP programs run for microseconds with
/// preemption disabled; a second covers even a virtual CPU descheduled mid-packet.
pub const QUARANTINE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u32,
    pub len: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegionError {
    #[error("regions overlap at slot {0}: the pinned maps are inconsistent")]
    Overlap(u32),
    #[error("region {start}+{len} lies outside the {capacity}-slot array")]
    OutOfRange { start: u32, len: u32, capacity: u32 },
}

pub struct Regions {
    capacity: u32,
    /// Free ranges by start; adjacent ranges are always merged.
    free: BTreeMap<u32, u32>,
    quarantined: Vec<(Region, Instant)>,
}

impl Regions {
    /// An allocator over `capacity` slots in which `used` regions are already taken (found
    /// by scanning the pinned maps when the daemon starts).
    pub fn with_used(capacity: u32, used: impl IntoIterator<Item = Region>) -> Result<Self, RegionError> {
        let mut used: Vec<Region> = used.into_iter().collect();
        used.sort_by_key(|r| r.start);
        let mut free = BTreeMap::new();
        let mut cursor = 0u32;
        for region in used {
            let end = region.start as u64 + region.len as u64;
            if end > capacity as u64 {
                return Err(RegionError::OutOfRange { start: region.start, len: region.len, capacity });
            }
            if region.start < cursor {
                return Err(RegionError::Overlap(region.start));
            }
            if region.start > cursor {
                free.insert(cursor, region.start - cursor);
            }
            cursor = end as u32;
        }
        if cursor < capacity {
            free.insert(cursor, capacity - cursor);
        }
        Ok(Self { capacity, free, quarantined: Vec::new() })
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Slots free now or after quarantine.
    pub fn free_slots(&self) -> u64 {
        let free: u64 = self.free.values().map(|&len| len as u64).sum();
        free + self.quarantined.iter().map(|(r, _)| r.len as u64).sum::<u64>()
    }

    /// Best fit among the free ranges (keeps large ranges whole for large tables).
    pub fn allocate(&mut self, len: u32) -> Option<Region> {
        self.release_quarantined(Instant::now());
        let (&start, &free_len) = self.free.iter().filter(|&(_, &l)| l >= len).min_by_key(|&(_, &l)| l)?;
        self.free.remove(&start);
        if free_len > len {
            self.free.insert(start + len, free_len - len);
        }
        Some(Region { start, len })
    }

    /// When the oldest quarantined region becomes reusable, if any is waiting.
    pub fn next_release(&self) -> Option<Instant> {
        self.quarantined.iter().map(|(_, at)| *at + QUARANTINE).min()
    }

    /// Returns a region; it becomes reusable after [`QUARANTINE`].
    pub fn free(&mut self, region: Region) {
        self.quarantined.push((region, Instant::now()));
    }

    /// Returns a region that was never visible to the kernel: reusable at once.
    pub fn free_unpublished(&mut self, region: Region) {
        self.insert_free(region);
    }

    fn release_quarantined(&mut self, now: Instant) {
        let (ready, waiting): (Vec<_>, Vec<_>) =
            self.quarantined.drain(..).partition(|(_, at)| now.duration_since(*at) >= QUARANTINE);
        self.quarantined = waiting;
        for (region, _) in ready {
            self.insert_free(region);
        }
    }

    fn insert_free(&mut self, region: Region) {
        let mut start = region.start;
        let mut len = region.len;
        if let Some((&prev_start, &prev_len)) = self.free.range(..start).next_back()
            && prev_start + prev_len == start
        {
            self.free.remove(&prev_start);
            start = prev_start;
            len += prev_len;
        }
        if let Some(next_len) = self.free.remove(&(start + len)) {
            len += next_len;
        }
        self.free.insert(start, len);
    }

    #[cfg(test)]
    fn age_quarantine(&mut self) {
        for (_, at) in &mut self.quarantined {
            *at -= QUARANTINE;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_best_fit_and_merges_on_release() {
        let mut regions = Regions::with_used(100, [Region { start: 10, len: 10 }]).unwrap();
        let small = regions.allocate(5).unwrap();
        assert_eq!(small, Region { start: 0, len: 5 }, "best fit is the 10-slot gap");
        let big = regions.allocate(70).unwrap();
        assert_eq!(big.start, 20);
        assert!(regions.allocate(20).is_none());
        regions.free(big);
        assert!(regions.allocate(20).is_none(), "quarantined regions are not reused at once");
        regions.age_quarantine();
        assert_eq!(regions.allocate(81), None, "ranges 5..10 and 20..100 are not adjacent");
        assert_eq!(regions.allocate(80).map(|r| r.start), Some(20));
    }

    #[test]
    fn refuses_overlapping_or_out_of_range_regions() {
        let overlap = Regions::with_used(100, [Region { start: 0, len: 10 }, Region { start: 5, len: 10 }]);
        assert_eq!(overlap.err(), Some(RegionError::Overlap(5)));
        let outside = Regions::with_used(100, [Region { start: 95, len: 10 }]);
        assert!(matches!(outside, Err(RegionError::OutOfRange { .. })));
    }

    #[test]
    fn coalesces_neighbours() {
        let mut regions = Regions::with_used(30, []).unwrap();
        let a = regions.allocate(10).unwrap();
        let b = regions.allocate(10).unwrap();
        let c = regions.allocate(10).unwrap();
        regions.free(a);
        regions.free(c);
        regions.free(b);
        regions.age_quarantine();
        assert_eq!(regions.allocate(30), Some(Region { start: 0, len: 30 }));
    }
}
