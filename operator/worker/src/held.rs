//! The running instances a replica holds in memory, within a budget.
//!
//! A held instance is the last revision this replica wrote, with its values
//! parsed for the next input; taking it out for an input and putting it
//! back after the write keeps the store's compare-and-set revision without
//! a read. The budget is an estimate of the memory they take (a multiple of
//! their stored JSON), so thousands of long-waiting instances cannot grow a
//! worker without bound; what does not fit is read from the store when its
//! next input comes.

use std::collections::HashMap;

use tallyman_core::engine::{Instance, Values};

/// The default budget: 256 MiB of estimated memory.
pub const DEFAULT_BUDGET: usize = 256 << 20;

/// At most this many instances, whatever their size.
const MAX_INSTANCES: usize = 200_000;

/// Memory per byte of stored JSON: the instance's own strings and maps,
/// plus its parsed values. Measured (docs/benchmarks.md, "Memory of held
/// instances"): a waiting shipment-to-invoice instance stored as 1 683
/// bytes raised the worker's resident memory by 4.0 times that with 20 000
/// to 25 000 held, 5.0 times with 10 000 (where fixed costs still count).
/// Set at the high end, as the budget is an upper bound to stay under, not
/// an accounting.
const BYTES_PER_STORED_BYTE: usize = 5;

/// One held instance.
pub(crate) struct Held {
    pub revision: u64,
    pub inst: Instance,
    pub values: Values,
    size: usize,
}

impl Held {
    /// `stored`: the length of the JSON it was stored as.
    pub fn new(revision: u64, inst: Instance, values: Values, stored: usize) -> Self {
        Self {
            revision,
            inst,
            values,
            size: stored.saturating_mul(BYTES_PER_STORED_BYTE),
        }
    }
}

pub(crate) struct HeldInstances {
    map: HashMap<String, Held>,
    bytes: usize,
    budget: usize,
}

impl HeldInstances {
    pub fn new(budget: usize) -> Self {
        Self {
            map: HashMap::new(),
            bytes: 0,
            budget,
        }
    }

    /// Take `key` out for an input (the instance lock keeps every other
    /// message for it waiting until it is put back).
    pub fn take(&mut self, key: &str) -> Option<Held> {
        let held = self.map.remove(key)?;
        self.bytes -= held.size;
        Some(held)
    }

    /// Hold `key`, making room by letting go of about half of the others
    /// when the budget is reached; one larger than the whole budget is not
    /// held.
    pub fn put(&mut self, key: String, held: Held) {
        if let Some(old) = self.map.remove(&key) {
            self.bytes -= old.size;
        }
        if held.size > self.budget {
            return;
        }
        while self.bytes + held.size > self.budget || self.map.len() >= MAX_INSTANCES {
            // Every other one, starting with the first: a single one goes too.
            let mut keep = true;
            self.map.retain(|_, _| {
                keep = !keep;
                keep
            });
            self.bytes = self.map.values().map(|h| h.size).sum();
        }
        self.bytes += held.size;
        self.map.insert(key, held);
    }

    /// Instances held and their estimated memory in bytes.
    pub fn usage(&self) -> (usize, usize) {
        (self.map.len(), self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(stored: usize) -> Held {
        Held::new(1, Instance::new("k", "r", 0), Values::default(), stored)
    }

    #[test]
    fn taking_and_putting_back_keeps_the_account() {
        let mut h = HeldInstances::new(1000);
        h.put("a".into(), held(10));
        h.put("b".into(), held(20));
        assert_eq!(h.usage(), (2, 150));
        let a = h.take("a").unwrap();
        assert_eq!(h.usage(), (1, 100));
        assert!(h.take("a").is_none());
        h.put("a".into(), a);
        h.put("a".into(), held(5));
        assert_eq!(h.usage(), (2, 125));
    }

    #[test]
    fn the_budget_is_never_exceeded() {
        let mut h = HeldInstances::new(1000);
        for i in 0..100 {
            h.put(format!("k{i}"), held(10 + i % 7));
            let (n, bytes) = h.usage();
            assert!(bytes <= 1000, "{bytes} bytes held");
            assert_eq!(bytes, h.map.values().map(|x| x.size).sum::<usize>());
            assert!(n >= 1);
        }
        // The newest is always held; older ones made room.
        assert!(h.take("k99").is_some());
        assert!(h.usage().0 < 100);
    }

    #[test]
    fn room_is_made_even_when_only_one_is_held() {
        let mut h = HeldInstances::new(100);
        h.put("a".into(), held(15));
        h.put("b".into(), held(15));
        assert!(h.take("a").is_none());
        assert_eq!(h.usage(), (1, 75));
    }

    #[test]
    fn an_instance_larger_than_the_budget_is_not_held() {
        let mut h = HeldInstances::new(100);
        h.put("small".into(), held(10));
        h.put("huge".into(), held(26));
        assert!(h.take("huge").is_none());
        assert_eq!(h.usage(), (1, 50));
    }
}
